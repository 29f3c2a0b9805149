#pragma once
/// @file
/// @brief idem::kafka::Consumer: a librdkafka consumer loop that hands each record to an
/// idem::IdempotentConsumer and commits offsets only past records whose outcome is ack-able.

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
#include <vector>

#include "idem/adapters/kafka_common.hpp"
#include "idem/adapters/loop_core.hpp"
#include "idem/consumer.hpp"
#include "idem/message.hpp"
#include "idem/partition_offset.hpp"
#include "idem/result.hpp"

// Forward declarations: users who do not touch native handles never see librdkafka's header.
typedef struct rd_kafka_s rd_kafka_t;            // NOLINT(modernize-use-using): C type
typedef struct rd_kafka_conf_s rd_kafka_conf_t;  // NOLINT(modernize-use-using): C type

namespace idem::kafka {

/// @brief One Kafka header; a null value is seen as empty.
struct Header {
  std::string_view name{};
  std::string_view value{};
};

/// @brief A non-owning view of one consumed record, valid during the callback that sees it.
struct Record {
  std::string_view topic{};
  std::int32_t partition = 0;
  std::int64_t offset = 0;
  std::string_view key{};
  std::string_view payload{};
  std::span<const Header> headers{};

  /// @brief The value of the last header called name, if there is one.
  std::optional<std::string_view> header(std::string_view name) const noexcept;
};

/// @brief A partition and a position in it (idem::PartitionOffset; next_offset
/// PartitionOffset::kUnset: use the group's committed offset).
using PartitionOffset = idem::PartitionOffset;

/// @brief Where the biz-id (idem::Message::key) of a record comes from.
enum class KeySource {
  record_key,  ///< the Kafka record key
  header,      ///< the header named ConsumerOptions::key_header
};

/// @brief The consume step (idem::ConsumeFunction): normally IdempotentConsumer::consume. It
/// may throw idem::InvalidMessage (dead-letter) and idem::StoreUnavailable (retry, no commit).
using ConsumeFunction = idem::ConsumeFunction;

/// @brief The batch steps of a consumer built from an IdempotentConsumer: consume_batch of
/// one partition's records (with the offset after them, which a transactional store saves in
/// the same transaction and reports through *offsets_saved), and the offsets the store holds.
struct BatchSteps {
  std::function<std::vector<Result>(std::span<const Message> batch,
                                    std::span<const PartitionOffset> offsets, bool* offsets_saved)>
      consume_batch{};
  /// Empty unless the store is transactional (SqliteStore, PostgresStore).
  std::function<std::vector<PartitionOffset>()> stored_offsets{};
};

/// @brief Policy of a kafka::Consumer. Designated-initialiser friendly.
struct ConsumerOptions {
  /// Topics to subscribe to (the consumer joins the group of the config's group.id).
  std::vector<std::string> topics{};
  /// Where the biz-id comes from, unless key_of is set.
  KeySource key_source = KeySource::record_key;
  /// Header read when key_source is KeySource::header.
  std::string key_header = std::string(default_biz_id_header);
  /// Picks the biz-id from a record; overrides key_source. The view must stay valid for the
  /// callback (point into the record, or into storage you own).
  std::function<std::string_view(const Record&)> key_of{};
  /// Header read into idem::Message::inner_id; a missing header gives an empty inner id.
  std::string inner_id_header = std::string(default_inner_id_header);

  /// Longest wait in one rd_kafka_consumer_poll.
  std::chrono::milliseconds poll_timeout{100};
  /// Records handed to the store at once, per partition and in order, through consume_batch
  /// (one transaction per batch with a transactional store, a savepoint per record). 1: one
  /// record at a time. Needs a consumer built from an IdempotentConsumer.
  std::size_t batch_size = 1;
  /// After the first record of a poll, how long to wait for more to fill a batch. 0: take
  /// what is already buffered.
  std::chrono::milliseconds batch_wait{0};
  /// With a transactional inbox (a handler taking SqliteTx& or PostgresTx&): each batch's next
  /// offset is saved in the transaction of its effects, and on assign the consumer starts from the
  /// offsets the store holds (partitions it has none for start from the group's committed offset).
  /// Kafka commits continue, for lag monitoring, but correctness no longer depends on them: after a
  /// crash nothing the store committed is read again. idem::ConfigError with a store that is not
  /// transactional.
  bool offsets_in_store = false;
  /// How often settled offsets are committed. These periodic commits are asynchronous (their
  /// results are served by a later poll(); failed ones are sent again next time). 0: after
  /// every record. Offsets are also committed, synchronously, on revoke, commit() and close().
  std::chrono::milliseconds commit_interval{1000};

  /// Handler failures (Outcome::failed) of one record before it is dead-lettered. 0: retry
  /// forever. Without dead_letter_topic a record is retried forever either way.
  unsigned max_attempts = 5;
  /// Topic that receives records that failed max_attempts times, invalid messages and payload
  /// conflicts, with their headers plus idem-dlq-{reason,topic,partition,offset}.
  /// Empty: no dead-lettering; such a record blocks its partition (reported via on_error).
  std::string dead_letter_topic{};
  /// Extra properties for the dead-letter producer; bootstrap.servers defaults to the
  /// consumer's.
  Config dead_letter_config{};
  /// First retry delay of a blocked record (failed, in_progress, store unavailable); doubles
  /// per retry up to max_retry_backoff.
  std::chrono::milliseconds retry_backoff{100};
  std::chrono::milliseconds max_retry_backoff{std::chrono::seconds{10}};

  /// On assign: returns the offsets to start from (e.g. rows of a store's offsets table);
  /// partitions it leaves out start from the committed offset.
  std::function<std::vector<PartitionOffset>(std::span<const PartitionOffset> assigned)>
      on_assign{};
  /// On revoke, after the settled offsets were committed; each offset is the next to read.
  std::function<void(std::span<const PartitionOffset> revoked)> on_revoke{};
  /// Sees every record's Result before its offset is settled (metrics, logs).
  std::function<void(const Record&, const Result&)> on_result{};
  /// Errors that do not stop the loop, one line each: retries of failed records, holds while
  /// the store is down, dead-letters (with their reason) and failures to dead-letter, commit
  /// failures, broker errors, blocked records. Retries of keys in progress elsewhere (not a
  /// failure) and rebalances go to logger only.
  std::function<void(std::string_view)> on_error{};
  /// The same lines with a level (debug: in progress elsewhere; info: rebalances; warning:
  /// retries, holds, commit and broker errors; error: dead-letters and failures to
  /// dead-letter), e.g. an idem::StderrLogger. Must outlive the consumer.
  Logger* logger = nullptr;
  /// Counts retries, redeliveries (seeks back to a held record), dead-letters by reason,
  /// failures to dead-letter, rebalances and commits (idem::Counter), e.g. an
  /// idem::PrometheusMetrics. Must outlive the consumer.
  Metrics* metrics = nullptr;
};

/// @brief Counters of a kafka::Consumer.
struct ConsumerStats {
  std::uint64_t records = 0;        ///< records handed to the consume function
  std::uint64_t acked = 0;          ///< processed or duplicate: offset settled
  std::uint64_t retries = 0;        ///< times a record was held back for a retry
  std::uint64_t dead_lettered = 0;  ///< records produced to the dead-letter topic
  std::uint64_t commits = 0;        ///< successful offset commits
  std::uint64_t batches = 0;        ///< consume_batch calls (batch_size > 1 or offsets_in_store)
};

/// @brief A Kafka consumer-group member that runs every record through a consume function
/// and commits, per partition and in order, only offsets past records that were processed,
/// were duplicates, or were dead-lettered.
///
/// Records are handled one at a time on the thread that calls poll()/run(). A record that
/// fails, is in progress elsewhere, or meets an unavailable store pauses its partition and is
/// re-read after a backoff; later records of that partition wait, other partitions go on.
/// The consumer forces enable.auto.commit=false and enable.auto.offset.store=false.
/// Not thread-safe except request_stop().
class Consumer {
 public:
  /// @brief Builds a consumer from librdkafka properties (bootstrap.servers, group.id, ...).
  /// @throws idem::ConfigError for a bad property; idem::kafka::KafkaError when librdkafka
  /// refuses to start or subscribe.
  Consumer(const Config& config, ConsumeFunction consume, ConsumerOptions options);
  /// @brief Builds a consumer from a configuration you prepared; takes ownership of conf
  /// (even when it throws). Its rebalance callback and opaque are replaced.
  Consumer(rd_kafka_conf_t* conf, ConsumeFunction consume, ConsumerOptions options);
  /// @brief Same, consuming through an IdempotentConsumer that must outlive this object; the
  /// only form that supports batch_size > 1 and offsets_in_store.
  template <class Handler, class Store>
  Consumer(const Config& config, IdempotentConsumer<Handler, Store>& consumer,
           ConsumerOptions options)
      : Consumer(
            config, [&consumer](const Message& m) { return consumer.consume(m); },
            batch_steps_of(consumer), std::move(options)) {}
  /// @brief A consume function and its batch steps (see BatchSteps).
  Consumer(const Config& config, ConsumeFunction consume, BatchSteps batch,
           ConsumerOptions options);

  /// @brief close()s unless closed or abandoned; never throws.
  ~Consumer();
  Consumer(Consumer&&) noexcept;
  Consumer& operator=(Consumer&&) noexcept;

  /// @brief Polls once (up to timeout) and handles what arrived; commits when due.
  /// @return how many records were handed to the consume function.
  std::size_t poll(std::chrono::milliseconds timeout);
  /// @brief poll()s until stop is true or request_stop() is called, then close()s.
  void run(const std::atomic<bool>& stop);
  /// @brief run() until request_stop().
  void run();
  /// @brief Makes run() return after the record in hand. Safe from any thread and from a
  /// signal handler.
  void request_stop() noexcept;
  /// @brief Synchronously commits every settled offset not yet committed.
  /// @throws idem::kafka::KafkaError when the commit fails (the offsets stay pending).
  void commit();
  /// @brief Commits settled offsets and leaves the group. Idempotent.
  void close();
  /// @brief Drops the client without committing or leaving the group, as a crash would;
  /// the group takes the partitions back after session.timeout.ms. For tests and fatal paths.
  void abandon() noexcept;

  ConsumerStats stats() const noexcept;

  /// @brief The BatchSteps of an IdempotentConsumer (offsets go to the store when its handler
  /// runs in the store's transaction).
  template <class Handler, class Store>
  static BatchSteps batch_steps_of(IdempotentConsumer<Handler, Store>& consumer) {
    BatchSteps steps;
    if constexpr (detail::runs_in_transaction<Handler, Store>()) {
      steps.consume_batch = [&consumer](std::span<const Message> batch,
                                        std::span<const PartitionOffset> offsets, bool* saved) {
        return consumer.consume_batch_with_offsets(batch, offsets, saved);
      };
      steps.stored_offsets = [&consumer] { return consumer.store().committed_offsets(); };
    } else {
      steps.consume_batch = [&consumer](std::span<const Message> batch,
                                        std::span<const PartitionOffset>, bool* saved) {
        if (saved != nullptr) *saved = false;
        return consumer.consume_batch(batch);
      };
    }
    return steps;
  }
  /// @brief The librdkafka handle (nullptr after close() or abandon()).
  rd_kafka_t* native_handle() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::kafka
