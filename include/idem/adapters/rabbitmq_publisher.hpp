#pragma once
/// @file
/// @brief idem::rabbitmq::Publisher: publisher confirms, message_id = one InnerMsgId per
/// logical message, republished with the same id when the confirm does not arrive.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/inner_msg_id.hpp"

namespace idem::rabbitmq {

/// @brief One logical message to publish.
struct OutgoingMessage {
  std::string exchange{};  ///< "" is the default exchange (routing_key = queue name)
  std::string routing_key{};
  /// The business id, sent in the biz-id header.
  std::string biz_id{};
  std::string body{};
  std::string content_type{};
  std::optional<std::string> correlation_id{};
  /// Extra string headers.
  std::vector<std::pair<std::string, std::string>> headers{};
  /// Set once by the publisher; keep it when you publish the same message again.
  std::optional<InnerMsgId> inner_id{};
};

/// @brief Policy of a rabbitmq::Publisher.
struct PublisherOptions {
  std::string biz_id_header = std::string(default_biz_id_header);
  /// delivery_mode 2: the broker writes the message to disk before confirming.
  bool persistent = true;
  /// How long to wait for a confirm before republishing on a fresh connection.
  std::chrono::milliseconds confirm_timeout{std::chrono::seconds{5}};
  /// Publish attempts per message before publish() throws. 0: forever.
  unsigned max_attempts = 5;
  /// First reconnect delay; doubles up to max_backoff.
  std::chrono::milliseconds backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_backoff{std::chrono::seconds{5}};
  std::function<void(std::string_view)> on_error{};
  /// Testing seam: return true to act as if the confirm of this attempt (1-based) was lost.
  std::function<bool(const InnerMsgId&, unsigned attempt)> lose_confirm{};
};

/// @brief Publishes with confirms on (confirm.select). publish() returns once the broker has
/// confirmed the message; when the confirm is missing (timeout, nack, lost connection) it
/// reconnects and publishes again with the same message_id, so the queue may hold two copies
/// and the consumer side (idem) runs the effect once. Not thread-safe.
class Publisher {
 public:
  /// @throws idem::rabbitmq::RabbitError when the first connection fails.
  explicit Publisher(ConnectionOptions connection, PublisherOptions options = {});
  ~Publisher();
  Publisher(Publisher&&) noexcept;
  Publisher& operator=(Publisher&&) noexcept;

  /// @brief Publishes and waits for the confirm, assigning the InnerMsgId (message_id) unless
  /// the message has one. @return that id.
  /// @throws idem::rabbitmq::RabbitError after max_attempts unconfirmed attempts.
  InnerMsgId publish(OutgoingMessage message);
  /// @brief Attempts made by the last publish() (1 when the first confirm arrived).
  unsigned last_attempts() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::rabbitmq
