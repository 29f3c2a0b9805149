#pragma once
/// @file
/// @brief idem::rabbitmq::Consumer: basic.consume with manual acks; each delivery goes through
/// an idem::IdempotentConsumer and is acked, requeued or dead-lettered by its outcome.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/consumer.hpp"
#include "idem/message.hpp"
#include "idem/result.hpp"

namespace idem::rabbitmq {

/// @brief One string-valued AMQP header (other header types are not shown).
struct Header {
  std::string_view name{};
  std::string_view value{};
};

/// @brief A non-owning view of one delivery, valid during the callback that sees it.
struct Delivery {
  std::string_view exchange{};
  std::string_view routing_key{};
  std::string_view body{};
  std::string_view message_id{};
  std::string_view correlation_id{};
  std::uint64_t delivery_tag = 0;
  bool redelivered = false;
  std::span<const Header> headers{};

  /// @brief The value of the header called name, if it is a string header.
  std::optional<std::string_view> header(std::string_view name) const noexcept;
};

/// @brief Where the biz-id (idem::Message::key) of a delivery comes from.
enum class KeySource {
  header,          ///< the header named ConsumerOptions::key_header (default)
  message_id,      ///< the message_id property
  correlation_id,  ///< the correlation_id property
};

/// @brief The consume step: normally IdempotentConsumer::consume. It may throw
/// idem::InvalidMessage (dead-letter) and idem::StoreUnavailable (no ack, retry later).
using ConsumeFunction = std::function<Result(const Message&)>;

/// @brief Policy of a rabbitmq::Consumer. Designated-initialiser friendly.
struct ConsumerOptions {
  /// Queue to consume from.
  std::string queue{};
  /// Declare the queue (durable) on every connect, with x-dead-letter-exchange set when
  /// dead_letter_exchange is. Off: the queue must exist.
  bool declare_queue = true;
  /// Exchange that rejected messages go to (failed max_attempts times, invalid, conflicting),
  /// via the queue's x-dead-letter-exchange. Empty: nothing is rejected; such messages are
  /// requeued after retry_delay forever and reported through on_error.
  std::string dead_letter_exchange{};
  /// basic.qos prefetch count: unacked deliveries in flight. 0: unlimited.
  std::uint16_t prefetch = 64;
  KeySource key_source = KeySource::header;
  std::string key_header = std::string(default_biz_id_header);
  /// The inner id (idem::Message::inner_id) is the message_id property (idem::rabbitmq::
  /// Publisher puts the InnerMsgId there); set this to read a header instead.
  std::string inner_id_header{};

  /// Handler failures of one biz-id before the message is rejected to the dead-letter
  /// exchange; counted in process and from a quorum queue's x-delivery-count. 0: never.
  unsigned max_attempts = 5;
  /// Delay before a failed or in-progress delivery is nacked back onto the queue.
  std::chrono::milliseconds retry_delay{std::chrono::milliseconds{200}};
  /// First delay before retrying a delivery whose store was unavailable (held, not acked);
  /// doubles up to max_backoff. Also the reconnect backoff.
  std::chrono::milliseconds backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_backoff{std::chrono::seconds{5}};
  /// Longest wait for a delivery in one poll().
  std::chrono::milliseconds poll_timeout{std::chrono::milliseconds{100}};

  /// Sees every delivery's Result before it is acked or requeued (metrics, logs).
  std::function<void(const Delivery&, const Result&)> on_result{};
  /// Errors that do not stop the loop: lost connections, refused acks, blocked messages.
  std::function<void(std::string_view)> on_error{};
};

/// @brief Counters of a rabbitmq::Consumer.
struct ConsumerStats {
  std::uint64_t deliveries = 0;     ///< deliveries handed to the consume function
  std::uint64_t acked = 0;          ///< processed or duplicate, basic.ack sent
  std::uint64_t requeued = 0;       ///< basic.nack with requeue (failed, in progress)
  std::uint64_t dead_lettered = 0;  ///< basic.reject without requeue
  std::uint64_t reconnects = 0;     ///< connections opened after the first
};

/// @brief A RabbitMQ queue consumer that acks only deliveries whose outcome is processed or
/// duplicate. Deliveries are handled one at a time on the thread calling poll()/run().
/// A dropped connection is reopened with backoff; its unacked deliveries come back from the
/// broker and are recognised as duplicates if they were processed. Not thread-safe except
/// request_stop().
class Consumer {
 public:
  /// @brief Connects, declares (by option) and starts consuming.
  /// @throws idem::rabbitmq::RabbitError when the first connection fails.
  Consumer(ConnectionOptions connection, ConsumeFunction consume, ConsumerOptions options);
  /// @brief Same, consuming through an IdempotentConsumer that must outlive this object.
  template <class Handler, class Store>
  Consumer(ConnectionOptions connection, IdempotentConsumer<Handler, Store>& consumer,
           ConsumerOptions options)
      : Consumer(
            std::move(connection), [&consumer](const Message& m) { return consumer.consume(m); },
            std::move(options)) {}
  /// @brief Closes the connection; unacked deliveries return to the queue. Never throws.
  ~Consumer();
  Consumer(Consumer&&) noexcept;
  Consumer& operator=(Consumer&&) noexcept;

  /// @brief Waits up to timeout for a delivery and handles it (and due requeues, retries and
  /// reconnects). @return how many deliveries were handed to the consume function.
  std::size_t poll(std::chrono::milliseconds timeout);
  /// @brief poll()s until stop is true or request_stop() is called, then closes.
  void run(const std::atomic<bool>& stop);
  /// @brief run() until request_stop().
  void run();
  /// @brief Makes run() return soon. Safe from any thread and from a signal handler.
  void request_stop() noexcept;
  /// @brief Closes the connection; unacked deliveries return to the queue.
  void close() noexcept;

  ConsumerStats stats() const noexcept;
  /// @brief The socket of the current connection, -1 when disconnected.
  int native_socket() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::rabbitmq
