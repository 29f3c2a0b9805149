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

#include "idem/adapters/loop_core.hpp"
#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/consumer.hpp"
#include "idem/message.hpp"
#include "idem/metrics.hpp"
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
  /// This delivery's attempt, 1-based: earlier failed attempts (header idem-attempts, set on
  /// the copies the consumer republishes) plus earlier deliveries of this copy (a quorum
  /// queue's x-delivery-count), plus one.
  unsigned attempt = 1;

  /// @brief The value of the header called name, if it is a string header.
  std::optional<std::string_view> header(std::string_view name) const noexcept;
};

/// @brief Where the biz-id (idem::Message::key) of a delivery comes from.
enum class KeySource {
  header,          ///< the header named ConsumerOptions::key_header (default)
  message_id,      ///< the message_id property
  correlation_id,  ///< the correlation_id property
};

/// @brief How a delivery whose handler failed (Outcome::failed) goes back for another attempt.
enum class RetryMode {
  /// Publish a copy to the queue (default exchange, routing key = queue) with the same
  /// properties, message_id and headers and header idem-attempts = failed attempts so far;
  /// ack the original once the broker confirmed the copy. The count travels with the message:
  /// it survives consumer restarts and is shared by every consumer of the queue. The copy
  /// goes to the back of the queue.
  republish,
  /// basic.nack(requeue=true), as before: the message keeps its place, but attempts are
  /// counted in this process (plus x-delivery-count and idem-attempts when present), so a
  /// restart on a classic queue starts the count again.
  requeue,
};

/// @brief The consume step (idem::ConsumeFunction): normally IdempotentConsumer::consume. It
/// may throw idem::InvalidMessage (dead-letter) and idem::StoreUnavailable (no ack, retry later).
using ConsumeFunction = idem::ConsumeFunction;

/// @brief Policy of a rabbitmq::Consumer. Designated-initialiser friendly.
struct ConsumerOptions {
  /// Queue to consume from.
  std::string queue{};
  /// Declare the queue (durable, classic) on every connect, with x-dead-letter-exchange set
  /// when dead_letter_exchange is: the same arguments as declare_queue_with_dead_letters()
  /// with QueueType::classic. Off: the queue must exist (turn it off for a quorum queue).
  bool declare_queue = true;
  /// Exchange that messages which cannot be processed go to (failed max_attempts times,
  /// conflicting payload, invalid or missing biz-id): the consumer publishes a copy there with
  /// header idem-dlq-reason (and idem-dlq-queue, idem-dlq-attempts), waits for the broker's
  /// confirm, then acks the original. declare_queue_with_dead_letters() declares it and its
  /// queue. Empty: nothing is dead-lettered; such messages are requeued after retry_delay
  /// forever and reported through on_error.
  std::string dead_letter_exchange{};
  /// Routing key of dead-letter copies; empty: the delivery's own routing key (what the
  /// broker's x-dead-letter-exchange would use). Irrelevant for a fanout exchange.
  std::string dead_letter_routing_key{};
  /// basic.qos prefetch count: unacked deliveries in flight. 0: unlimited.
  std::uint16_t prefetch = 64;
  KeySource key_source = KeySource::header;
  std::string key_header = std::string(default_biz_id_header);
  /// The inner id (idem::Message::inner_id) is the message_id property (idem::rabbitmq::
  /// Publisher puts the InnerMsgId there); set this to read a header instead.
  std::string inner_id_header{};

  /// Handler failures of one message before it is dead-lettered with reason "attempts
  /// exhausted: ..."; counted as retry_mode says. 0: never.
  unsigned max_attempts = 5;
  /// How a failed delivery goes back to the queue and how its attempts are counted.
  RetryMode retry_mode = RetryMode::republish;
  /// Delay before a failed or in-progress delivery goes back to the queue (republished or
  /// nacked); it stays unacked meanwhile.
  std::chrono::milliseconds retry_delay{std::chrono::milliseconds{200}};
  /// Longest wait for the broker's confirm of a republished or dead-lettered copy; without
  /// it the original is requeued instead (basic.nack) and the failure reported.
  std::chrono::milliseconds publish_timeout{std::chrono::seconds{5}};
  /// First delay before retrying a delivery whose store was unavailable (held, not acked);
  /// doubles per retry up to max_retry_backoff.
  std::chrono::milliseconds retry_backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_retry_backoff{std::chrono::seconds{5}};
  /// First delay before reconnecting after a failed reconnect; doubles up to
  /// max_reconnect_backoff. (The first reconnect after a loss is immediate.)
  std::chrono::milliseconds reconnect_backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_reconnect_backoff{std::chrono::seconds{5}};
  /// Longest wait for a delivery in one poll().
  std::chrono::milliseconds poll_timeout{std::chrono::milliseconds{100}};

  /// Sees every delivery's Result before it is acked or requeued (metrics, logs). Deliveries
  /// that never reach the consume function (no biz-id) have no Result: see on_error.
  std::function<void(const Delivery&, const Result&)> on_result{};
  /// One line for every delivery that is not simply acked — each retry, dead-letter (with its
  /// reason), hold, and failure to dead-letter — and for lost connections and failed
  /// reconnects. Requeues of keys in progress elsewhere (not a failure) go to logger only.
  std::function<void(std::string_view)> on_error{};
  /// The same lines with a level (debug: in progress elsewhere; warning: retries, holds,
  /// lost connections; error: dead-letters, failures to dead-letter, failed reconnects),
  /// e.g. an idem::StderrLogger. Must outlive the consumer.
  Logger* logger = nullptr;
  /// Counts retries, redeliveries (basic.nack and republished copies), dead-letters by
  /// reason, failures to dead-letter and reconnects (idem::Counter), e.g. an
  /// idem::PrometheusMetrics. Must outlive the consumer.
  Metrics* metrics = nullptr;
};

/// @brief Counters of a rabbitmq::Consumer.
struct ConsumerStats {
  std::uint64_t deliveries = 0;     ///< deliveries handed to the consume function
  std::uint64_t acked = 0;          ///< processed or duplicate, basic.ack sent
  std::uint64_t requeued = 0;       ///< sent back for another attempt: failed or in progress
  std::uint64_t dead_lettered = 0;  ///< copies confirmed by the dead-letter exchange (then acked)
  std::uint64_t reconnects = 0;     ///< connections opened after the first
  std::uint64_t republished = 0;  ///< of requeued: copies with idem-attempts (RetryMode::republish)
  std::uint64_t in_progress = 0;  ///< of requeued: the key was in progress elsewhere
  std::uint64_t held = 0;         ///< times a delivery was held: the store was unavailable
  /// Why messages had to be dead-lettered (counted whether or not that then succeeded):
  std::uint64_t missing_key = 0;         ///< no biz-id (header, message_id or correlation_id)
  std::uint64_t invalid = 0;             ///< idem::InvalidMessage (empty or oversized key)
  std::uint64_t conflicts = 0;           ///< Outcome::conflict
  std::uint64_t attempts_exhausted = 0;  ///< failed max_attempts times
  /// Dead-letters that did not happen — no dead_letter_exchange, the copy routed nowhere or
  /// unconfirmed: the delivery was requeued instead (and reported).
  std::uint64_t dead_letter_failures = 0;
};

/// @brief A RabbitMQ queue consumer that acks only deliveries whose outcome is processed or
/// duplicate, or whose dead-letter copy the broker confirmed. Deliveries are handled one at a
/// time on the thread calling poll()/run(). A dropped connection is reopened with backoff; its
/// unacked deliveries come back from the broker and are recognised as duplicates if they were
/// processed. Republished and dead-lettered copies go out on a second connection with
/// publisher confirms, opened when first needed. Not thread-safe except request_stop().
class Consumer {
 public:
  /// @brief Connects, declares (by option) and starts consuming.
  /// @throws idem::rabbitmq::ConnectionError when the first connection fails;
  /// idem::rabbitmq::RabbitError when declaring or consuming the queue fails.
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
