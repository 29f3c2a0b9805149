#pragma once
/// @file
/// @brief idem::rabbitmq::Publisher: publisher confirms, message_id = one InnerMsgId per
/// logical message, republished with the same id when the confirm does not arrive; confirms
/// pipelined up to a window (send() / flush()) or awaited one by one (publish()).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/inner_msg_id.hpp"
#include "idem/metrics.hpp"

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
  /// Publish attempts per message before it is given up (publish() throws; send()'s messages
  /// go to take_failed() and flush() throws). 0: forever.
  unsigned max_attempts = 5;
  /// First reconnect delay; doubles up to max_reconnect_backoff.
  std::chrono::milliseconds reconnect_backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_reconnect_backoff{std::chrono::seconds{5}};
  /// send(): most messages published and not yet confirmed; send() waits for confirms while
  /// this many are outstanding. At least 1.
  std::size_t window = 256;
  /// Called with the id of every message the broker confirmed (an outbox marks it sent).
  std::function<void(const InnerMsgId&)> on_confirm{};
  /// Every unconfirmed attempt, reconnect and given-up message, with why.
  std::function<void(std::string_view)> on_error{};
  /// The same lines, with a level, when set (e.g. an idem::StderrLogger). Must outlive the
  /// publisher.
  Logger* logger = nullptr;
  /// Testing seam: return true to act as if the confirm of this attempt (1-based) was lost.
  std::function<bool(const InnerMsgId&, unsigned attempt)> lose_confirm{};
};

/// @brief Counters of a rabbitmq::Publisher.
struct PublisherStats {
  std::uint64_t published = 0;    ///< basic.publish calls, republishes included
  std::uint64_t confirmed = 0;    ///< messages the broker confirmed
  std::uint64_t republished = 0;  ///< publishes of a message whose earlier attempt went unconfirmed
  std::uint64_t reconnects = 0;   ///< connections opened after the first
  std::uint64_t failed = 0;       ///< messages given up after max_attempts
};

/// @brief Publishes with confirms on (confirm.select), message_id = the message's InnerMsgId.
///
/// send() pipelines: it publishes and returns while fewer than `window` messages are
/// unconfirmed, reading confirms (basic.ack, also multiple) only when the window is full;
/// flush() waits for the rest. publish() sends one message and waits for its confirm. When a
/// confirm is missing (confirm_timeout, a dropped connection, a basic.nack) the publisher
/// reconnects and publishes every unconfirmed message again, in order, with the same
/// message_id: the queue may then hold two copies and the consumer side (idem) runs the effect
/// once. Not thread-safe.
class Publisher {
 public:
  /// @throws idem::rabbitmq::ConnectionError when the first connection fails.
  explicit Publisher(ConnectionOptions connection, PublisherOptions options = {});
  /// @brief Closes the connection; messages still unconfirmed are not waited for (flush()
  /// first). Never throws.
  ~Publisher();
  Publisher(Publisher&&) noexcept;
  Publisher& operator=(Publisher&&) noexcept;

  /// @brief Publishes and waits for the confirm, assigning the InnerMsgId (message_id) unless
  /// the message has one. Messages send() left unconfirmed are confirmed along the way.
  /// @return that id.
  /// @throws idem::rabbitmq::RabbitError after max_attempts unconfirmed attempts.
  InnerMsgId publish(OutgoingMessage message);
  /// @brief Attempts made by the last publish() (1 when the first confirm arrived).
  unsigned last_attempts() const noexcept;

  /// @brief Publishes without waiting for this message's confirm, assigning the InnerMsgId
  /// unless the message has one; first waits for confirms while `window` are outstanding.
  /// Never throws for a message given up (see flush()). @return the message's id.
  InnerMsgId send(OutgoingMessage message);
  /// @brief Waits until every sent message is confirmed or given up, republishing after
  /// drops, timeouts and nacks.
  /// @throws idem::rabbitmq::RabbitError while messages given up after max_attempts are held
  /// (take_failed() returns them, to be published again later under the same id).
  void flush();
  /// @brief Messages sent and not yet confirmed.
  std::size_t unconfirmed() const noexcept;
  /// @brief The messages given up so far (with their inner_id), oldest first; clears the list.
  std::vector<OutgoingMessage> take_failed();

  PublisherStats stats() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::rabbitmq
