#pragma once
/// @file
/// @brief idem::PrometheusMetrics: an idem::Metrics that counts in lock-free atomics and
/// renders the Prometheus text exposition format (version 0.0.4) for a /metrics endpoint.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "idem/dedup_store.hpp"
#include "idem/metrics.hpp"

namespace idem {

class MemoryStore;

/// @brief Construction-time settings of a PrometheusMetrics.
struct PrometheusOptions {
  /// Labels added to every sample, e.g. {{"service", "billing"}, {"consumer", "cards"}}.
  /// Names must match [a-zA-Z_][a-zA-Z0-9_]* and not start with "__"; values are escaped.
  std::vector<std::pair<std::string, std::string>> const_labels{};
  /// Upper bounds of the latency histogram buckets in seconds, strictly increasing (+Inf is
  /// implicit). Empty: 50 µs .. 10 s (default_buckets()).
  std::vector<double> buckets{};
};

/// @brief A point-in-time copy of one latency histogram.
struct HistogramSnapshot {
  /// Upper bounds in seconds (the implicit +Inf bucket is not listed).
  std::vector<double> bounds;
  /// Cumulative counts: cumulative[i] observations were <= bounds[i]; one more element than
  /// bounds, the last being the +Inf bucket (== count).
  std::vector<std::uint64_t> cumulative;
  double sum_seconds = 0;
  std::uint64_t count = 0;
};

/// @brief Counts what a consumer reports (Options::metrics) and renders it for Prometheus.
///
/// The message path (add, observe) is one or two relaxed atomic increments on a per-thread
/// stripe: no lock, no allocation, no shared cache line between threads in the common case.
/// render() reads the atomics without stopping writers, so one scrape may see a message
/// counted but its latency not yet observed (or a _sum a moment ahead of its _count); the
/// buckets it prints are always cumulative (never decreasing) and +Inf always equals _count.
///
/// Store gauges (records, bytes, evictions) are pulled at render time from the stores
/// registered with add_store(); those callbacks run on the scraping thread.
///
/// One instance may be shared by many consumers (they then add up); give each its own
/// instance and a const label to tell them apart. Metric names:
/// - idem_messages_total{outcome} — processed, duplicate, in_progress, conflict, failed
/// - idem_store_errors_total, idem_lease_takeovers_total, idem_lease_lost_total
/// - idem_duration_seconds{op} — histogram, op = store_claim | store_complete | handler |
///   outbox_publish
/// - idem_outbox_published_total, idem_outbox_publish_failed_total, idem_outbox_purged_total,
///   idem_outbox_pending, idem_outbox_oldest_pending_seconds (the outbox relay)
/// - idem_store_up, idem_store_records, idem_store_in_progress, idem_store_done,
///   idem_store_bytes, idem_store_evictions_total — labelled {store="<name>"}
class PrometheusMetrics final : public Metrics {
 public:
  /// @brief Where a registered store's numbers come from; called on every render().
  using StatsSource = std::function<StoreStats()>;

  /// @throws idem::ConfigError for an invalid label name or buckets that do not increase.
  explicit PrometheusMetrics(PrometheusOptions options = {});
  ~PrometheusMetrics() override;
  PrometheusMetrics(const PrometheusMetrics&) = delete;
  PrometheusMetrics& operator=(const PrometheusMetrics&) = delete;

  /// @brief Adds n to a counter. Lock-free.
  void add(Counter counter, std::uint64_t n = 1) noexcept override;
  /// @brief Records one latency in the timing's histogram. Lock-free.
  void observe(Timing timing, std::chrono::nanoseconds elapsed) noexcept override;
  /// @brief Sets a gauge (the outbox relay's backlog). Lock-free.
  void set(Gauge gauge, double value) noexcept override;
  /// @brief The current value of a gauge.
  double value(Gauge gauge) const noexcept;

  /// @brief The current value of a counter.
  std::uint64_t value(Counter counter) const noexcept;
  /// @brief A copy of one histogram.
  HistogramSnapshot histogram(Timing timing) const;

  /// @brief Publishes the gauges of a store under {store="<label>"}; source is called on
  /// every render() and must stay valid (and thread-safe) as long as this object renders.
  /// A source that throws is shown as idem_store_up 0 for that scrape; one that throws
  /// idem::ConfigError (a store without the stats hook) is left out of the output.
  /// @throws idem::ConfigError when label is already registered.
  void add_store(std::string label, StatsSource source);
  /// @brief add_store() for any DedupStore, through its stats() operator hook.
  /// The store must outlive this object (or be removed with remove_store()).
  void add_store(DedupStore& store, std::string label = {});
  /// @brief add_store() for a MemoryStore through its cheap counters() (no scan of records;
  /// in_progress and done stay 0). The store must outlive this object.
  void add_store(const MemoryStore& store, std::string label = "memory");
  /// @brief Stops publishing a store. False when no store had that label.
  bool remove_store(const std::string& label);

  /// @brief Everything in the Prometheus text exposition format (serve it with
  /// Content-Type: text/plain; version=0.0.4).
  std::string render() const;

  /// @brief The default bucket bounds in seconds: 50 µs .. 10 s, roughly 1-2.5-5 steps.
  static std::vector<double> default_buckets();

 private:
  // Cells are striped (like Java's LongAdder): each thread writes the stripe picked for it on
  // first use, so consumers on different cores do not bounce one cache line between them on
  // every message. render() adds the stripes up. Layout of one stripe, in cells:
  //   [counters: kCounterCount][per timing: buckets + 1 (+Inf), then sum_ns]
  // padded to whole cache lines.
  static constexpr std::size_t kStripes = 16;
  struct alignas(64) Line {
    std::atomic<std::uint64_t> cells[8];
  };
  std::atomic<std::uint64_t>& cell(std::size_t stripe, std::size_t index) const noexcept {
    return lines_[stripe * stripe_lines_ + index / 8].cells[index % 8];
  }
  std::size_t histogram_cell(Timing timing) const noexcept {
    return kCounterCount + static_cast<std::size_t>(timing) * (bounds_ns_.size() + 2);
  }
  static std::size_t this_thread_stripe() noexcept;

  struct Store {
    std::string label;
    StatsSource source;
  };

  std::size_t bucket_of(std::chrono::nanoseconds elapsed) const noexcept;
  std::string labels(std::string_view extra_name = {}, std::string_view extra_value = {}) const;

  std::vector<double> bounds_s_;
  std::vector<std::int64_t> bounds_ns_;  // the same bounds, compared on the hot path
  std::string const_labels_;             // rendered once: name="value",...
  std::size_t stripe_lines_ = 0;
  std::unique_ptr<Line[]> lines_;
  mutable std::mutex stores_mutex_;  // guards stores_ only; never taken on the message path
  std::vector<Store> stores_;
  std::atomic<double> gauges_[kGaugeCount] = {};
};

}  // namespace idem
