#pragma once
/// @file
/// @brief idem::Metrics and idem::Logger: the hooks a consumer reports to. Both default to
/// nothing; idem::PrometheusMetrics and idem::StderrLogger are ready implementations.

#include <chrono>
#include <cstdint>
#include <string_view>

namespace idem {

/// @brief What the consumer counts.
enum class Counter {
  processed,              ///< Outcome::processed
  duplicate,              ///< Outcome::duplicate
  in_progress,            ///< Outcome::in_progress
  conflict,               ///< Outcome::conflict
  failed,                 ///< Outcome::failed (handler threw)
  store_errors,           ///< the store threw StoreUnavailable
  lease_takeovers,        ///< a claim taken over from a holder whose lease expired
  lease_lost,             ///< complete() refused: our lease expired and another worker took over
  cache_hits,             ///< a CachedStore answered a claim without calling its store
  cache_misses,           ///< a CachedStore passed a claim on to its store
  outbox_published,       ///< outbox rows the broker confirmed (marked sent)
  outbox_publish_failed,  ///< outbox rows a publish attempt did not get confirmed (retried)
  outbox_purged,          ///< sent outbox rows deleted after their retention
  // Broker adapters (kafka::Consumer, rabbitmq::Consumer):
  retries,       ///< a delivery held back for another attempt (failed, in progress, store down)
  redeliveries,  ///< a delivery given back to the broker (RabbitMQ nack or republish, Kafka seek)
  dead_letters_conflict,     ///< dead-lettered: the key came again with a different payload
  dead_letters_invalid,      ///< dead-lettered: idem::InvalidMessage (empty or oversized key)
  dead_letters_missing_key,  ///< dead-lettered: no biz-id to deduplicate on
  dead_letters_exhausted,    ///< dead-lettered: the handler failed max_attempts times
  dead_letter_failures,  ///< a delivery due for dead-lettering that could not be (kept, retried)
  rebalances,            ///< Kafka partitions assigned or revoked (one per rebalance callback)
  commits,               ///< Kafka offset commits that succeeded
  commit_failures,       ///< Kafka offset commits that failed (the offsets stay pending)
  reconnects,            ///< RabbitMQ connections reopened after a loss
};
inline constexpr int kCounterCount = 24;

/// @brief What the consumer times.
enum class Timing {
  store_claim,     ///< one claim (or a batch's claim round)
  store_complete,  ///< one complete (or a batch's completion round)
  handler,         ///< one handler call
  outbox_publish,  ///< one relay batch: first publish to the last confirm
};
inline constexpr int kTimingCount = 4;

/// @brief Levels the outbox relay reports (set, not added).
enum class Gauge {
  outbox_pending,                ///< outbox rows not yet confirmed by the broker
  outbox_oldest_pending_seconds  ///< age of the oldest of them; 0 when none
};
inline constexpr int kGaugeCount = 2;

std::string_view to_string(Counter counter) noexcept;
std::string_view to_string(Timing timing) noexcept;
std::string_view to_string(Gauge gauge) noexcept;

/// @brief Receives counters and latencies. Implementations must be thread-safe and cheap:
/// they are called on the message path.
class Metrics {
 public:
  virtual ~Metrics() = default;
  virtual void add(Counter counter, std::uint64_t n = 1) noexcept = 0;
  virtual void observe(Timing timing, std::chrono::nanoseconds elapsed) noexcept = 0;
  /// @brief Sets a level (the outbox relay's backlog). Default: ignored.
  virtual void set(Gauge /*gauge*/, double /*value*/) noexcept {}
};

/// @brief Severity of a log line.
enum class LogLevel { debug, info, warning, error };

/// @brief Receives the few events worth a line (store errors, lost leases, handler failures).
class Logger {
 public:
  virtual ~Logger() = default;
  virtual void log(LogLevel level, std::string_view line) noexcept = 0;
};

}  // namespace idem
