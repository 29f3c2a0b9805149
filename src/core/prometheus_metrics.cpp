#include "idem/prometheus_metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <exception>
#include <string_view>
#include <system_error>
#include <utility>

#include "idem/error.hpp"
#include "idem/stores/memory_store.hpp"

namespace idem {

namespace {

bool valid_label_name(std::string_view name) {
  if (name.empty() || name.starts_with("__")) return false;
  auto alpha = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; };
  if (!alpha(name.front())) return false;
  return std::all_of(name.begin(), name.end(),
                     [&](char c) { return alpha(c) || (c >= '0' && c <= '9'); });
}

void append_escaped(std::string& out, std::string_view value) {
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
}

void append_number(std::string& out, double value) {
  if (std::isinf(value)) {
    out += value > 0 ? "+Inf" : "-Inf";
    return;
  }
  char buffer[32];
  auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, ec == std::errc{} ? end : buffer);
}

void append_number(std::string& out, std::uint64_t value) {
  char buffer[24];
  auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, ec == std::errc{} ? end : buffer);
}

void append_header(std::string& out, std::string_view name, std::string_view type,
                   std::string_view help) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

template <class Number>
void append_sample(std::string& out, std::string_view name, std::string_view labels, Number value) {
  out += name;
  if (!labels.empty()) {
    out += '{';
    out += labels;
    out += '}';
  }
  out += ' ';
  append_number(out, value);
  out += '\n';
}

constexpr std::array<Counter, 5> kOutcomeCounters = {Counter::processed, Counter::duplicate,
                                                     Counter::in_progress, Counter::conflict,
                                                     Counter::failed};

}  // namespace

std::vector<double> PrometheusMetrics::default_buckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
          0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10};
}

PrometheusMetrics::PrometheusMetrics(PrometheusOptions options)
    : bounds_s_(options.buckets.empty() ? default_buckets() : std::move(options.buckets)) {
  for (std::size_t i = 0; i < bounds_s_.size(); ++i) {
    const double bound = bounds_s_[i];
    if (!(bound > 0) || !std::isfinite(bound) || (i > 0 && bound <= bounds_s_[i - 1])) {
      throw ConfigError(
          "PrometheusOptions::buckets must be finite, positive and strictly increasing (bucket " +
          std::to_string(i) + " is not); +Inf is added for you");
    }
    bounds_ns_.push_back(static_cast<std::int64_t>(std::llround(bound * 1e9)));
  }
  for (const auto& [name, value] : options.const_labels) {
    if (!valid_label_name(name) || name == "outcome" || name == "op" || name == "store" ||
        name == "le") {
      throw ConfigError("PrometheusOptions::const_labels: \"" + name +
                        "\" is not a usable label name: use [a-zA-Z_][a-zA-Z0-9_]*, not starting "
                        "with __ and not one of outcome, op, store, le");
    }
    if (!const_labels_.empty()) const_labels_ += ',';
    const_labels_ += name;
    const_labels_ += "=\"";
    append_escaped(const_labels_, value);
    const_labels_ += '"';
  }
  const std::size_t cells = kCounterCount + kTimingCount * (bounds_ns_.size() + 2);
  stripe_lines_ = (cells + 7) / 8;
  lines_ = std::make_unique<Line[]>(kStripes * stripe_lines_);  // value-initialised: zeros
}

std::size_t PrometheusMetrics::this_thread_stripe() noexcept {
  // Round-robin on first use: N threads get N different stripes up to kStripes.
  static std::atomic<std::size_t> next{0};
  thread_local const std::size_t stripe = next.fetch_add(1, std::memory_order_relaxed) % kStripes;
  return stripe;
}

PrometheusMetrics::~PrometheusMetrics() = default;

void PrometheusMetrics::add(Counter counter, std::uint64_t n) noexcept {
  const auto index = static_cast<std::size_t>(counter);
  if (index >= kCounterCount) return;
  cell(this_thread_stripe(), index).fetch_add(n, std::memory_order_relaxed);
}

std::size_t PrometheusMetrics::bucket_of(std::chrono::nanoseconds elapsed) const noexcept {
  // Prometheus buckets are "less than or equal": lower_bound finds the first bound >= elapsed.
  auto it = std::lower_bound(bounds_ns_.begin(), bounds_ns_.end(), elapsed.count());
  return static_cast<std::size_t>(it - bounds_ns_.begin());
}

void PrometheusMetrics::observe(Timing timing, std::chrono::nanoseconds elapsed) noexcept {
  if (static_cast<std::size_t>(timing) >= kTimingCount) return;
  if (elapsed.count() < 0) elapsed = std::chrono::nanoseconds{0};  // a clock that stepped back
  const std::size_t base = histogram_cell(timing);
  const std::size_t stripe = this_thread_stripe();
  cell(stripe, base + bucket_of(elapsed)).fetch_add(1, std::memory_order_relaxed);
  cell(stripe, base + bounds_ns_.size() + 1)
      .fetch_add(static_cast<std::uint64_t>(elapsed.count()), std::memory_order_relaxed);
}

void PrometheusMetrics::set(Gauge gauge, double value) noexcept {
  const auto index = static_cast<std::size_t>(gauge);
  if (index < kGaugeCount) gauges_[index].store(value, std::memory_order_relaxed);
}

double PrometheusMetrics::value(Gauge gauge) const noexcept {
  const auto index = static_cast<std::size_t>(gauge);
  return index < kGaugeCount ? gauges_[index].load(std::memory_order_relaxed) : 0.0;
}

std::uint64_t PrometheusMetrics::value(Counter counter) const noexcept {
  const auto index = static_cast<std::size_t>(counter);
  if (index >= kCounterCount) return 0;
  std::uint64_t total = 0;
  for (std::size_t stripe = 0; stripe < kStripes; ++stripe) {
    total += cell(stripe, index).load(std::memory_order_relaxed);
  }
  return total;
}

HistogramSnapshot PrometheusMetrics::histogram(Timing timing) const {
  HistogramSnapshot snapshot;
  snapshot.bounds = bounds_s_;
  if (static_cast<std::size_t>(timing) >= kTimingCount) return snapshot;
  const std::size_t base = histogram_cell(timing);
  const std::size_t buckets = bounds_ns_.size() + 1;
  std::uint64_t sum_ns = 0;
  snapshot.cumulative.assign(buckets, 0);
  for (std::size_t stripe = 0; stripe < kStripes; ++stripe) {
    for (std::size_t i = 0; i < buckets; ++i) {
      snapshot.cumulative[i] += cell(stripe, base + i).load(std::memory_order_relaxed);
    }
    sum_ns += cell(stripe, base + buckets).load(std::memory_order_relaxed);
  }
  // Cumulative from one copy of the per-bucket counts: never decreasing, +Inf == count.
  std::uint64_t running = 0;
  for (std::uint64_t& count : snapshot.cumulative) {
    running += count;
    count = running;
  }
  snapshot.sum_seconds = static_cast<double>(sum_ns) / 1e9;
  snapshot.count = running;
  return snapshot;
}

void PrometheusMetrics::add_store(std::string label, StatsSource source) {
  if (!source) throw ConfigError("PrometheusMetrics::add_store: the stats source is empty");
  std::lock_guard lock(stores_mutex_);
  for (const Store& store : stores_) {
    if (store.label == label) {
      throw ConfigError("PrometheusMetrics::add_store: a store labelled \"" + label +
                        "\" is already registered; give each store its own label");
    }
  }
  stores_.push_back(Store{std::move(label), std::move(source)});
}

void PrometheusMetrics::add_store(DedupStore& store, std::string label) {
  if (label.empty()) label = std::string(store.name());
  add_store(std::move(label), [&store] { return store.stats(); });
}

void PrometheusMetrics::add_store(const MemoryStore& store, std::string label) {
  add_store(std::move(label), [&store] {
    const MemoryStoreStats s = store.counters();
    return StoreStats{.records = s.keys, .bytes = s.bytes, .evictions = s.evictions};
  });
}

bool PrometheusMetrics::remove_store(const std::string& label) {
  std::lock_guard lock(stores_mutex_);
  auto it = std::find_if(stores_.begin(), stores_.end(),
                         [&](const Store& store) { return store.label == label; });
  if (it == stores_.end()) return false;
  stores_.erase(it);
  return true;
}

std::string PrometheusMetrics::labels(std::string_view extra_name,
                                      std::string_view extra_value) const {
  std::string out = const_labels_;
  if (!extra_name.empty()) {
    if (!out.empty()) out += ',';
    out += extra_name;
    out += "=\"";
    append_escaped(out, extra_value);
    out += '"';
  }
  return out;
}

std::string PrometheusMetrics::render() const {
  std::string out;
  out.reserve(4096);

  append_header(out, "idem_messages_total", "counter",
                "Messages consumed, by outcome (processed and duplicate are acked).");
  for (Counter counter : kOutcomeCounters) {
    append_sample(out, "idem_messages_total", labels("outcome", to_string(counter)),
                  value(counter));
  }
  const std::string plain = labels();
  append_header(out, "idem_store_errors_total", "counter",
                "Store calls that failed with StoreUnavailable (the message was not acked).");
  append_sample(out, "idem_store_errors_total", plain, value(Counter::store_errors));
  append_header(out, "idem_lease_takeovers_total", "counter",
                "Claims taken over from a holder whose lease had expired.");
  append_sample(out, "idem_lease_takeovers_total", plain, value(Counter::lease_takeovers));
  append_header(out, "idem_lease_lost_total", "counter",
                "Completions refused because the lease expired first (raise Options::lease).");
  append_sample(out, "idem_lease_lost_total", plain, value(Counter::lease_lost));
  append_header(
      out, "idem_cache_lookups_total", "counter",
      "Claims a CachedStore answered from its cache (hit) or passed to its store (miss).");
  append_sample(out, "idem_cache_lookups_total", labels("result", "hit"),
                value(Counter::cache_hits));
  append_sample(out, "idem_cache_lookups_total", labels("result", "miss"),
                value(Counter::cache_misses));

  append_header(out, "idem_outbox_published_total", "counter",
                "Outbox rows the relay published and the broker confirmed.");
  append_sample(out, "idem_outbox_published_total", plain, value(Counter::outbox_published));
  append_header(out, "idem_outbox_publish_failed_total", "counter",
                "Outbox rows a publish attempt left unconfirmed (published again later).");
  append_sample(out, "idem_outbox_publish_failed_total", plain,
                value(Counter::outbox_publish_failed));
  append_header(out, "idem_outbox_purged_total", "counter",
                "Sent outbox rows deleted after their retention.");
  append_sample(out, "idem_outbox_purged_total", plain, value(Counter::outbox_purged));
  append_header(out, "idem_outbox_pending", "gauge",
                "Outbox rows not yet confirmed by the broker (last relay reading).");
  append_sample(out, "idem_outbox_pending", plain, value(Gauge::outbox_pending));
  append_header(out, "idem_outbox_oldest_pending_seconds", "gauge",
                "Age of the oldest outbox row not yet confirmed (last relay reading).");
  append_sample(out, "idem_outbox_oldest_pending_seconds", plain,
                value(Gauge::outbox_oldest_pending_seconds));
  // Broker adapters.
  append_header(out, "idem_adapter_retries_total", "counter",
                "Deliveries held back for another attempt (failed, in progress, store down).");
  append_sample(out, "idem_adapter_retries_total", plain, value(Counter::retries));
  append_header(out, "idem_adapter_redeliveries_total", "counter",
                "Deliveries given back to the broker (RabbitMQ nack or republish, Kafka seek).");
  append_sample(out, "idem_adapter_redeliveries_total", plain, value(Counter::redeliveries));
  append_header(out, "idem_dead_letters_total", "counter", "Deliveries dead-lettered, by reason.");
  constexpr std::array<std::pair<Counter, std::string_view>, 4> kDeadLetterReasons = {{
      {Counter::dead_letters_conflict, "conflict"},
      {Counter::dead_letters_invalid, "invalid"},
      {Counter::dead_letters_missing_key, "missing_key"},
      {Counter::dead_letters_exhausted, "attempts_exhausted"},
  }};
  for (const auto& [counter, reason] : kDeadLetterReasons) {
    append_sample(out, "idem_dead_letters_total", labels("reason", reason), value(counter));
  }
  append_header(out, "idem_dead_letter_failures_total", "counter",
                "Deliveries due for dead-lettering that could not be (kept and retried).");
  append_sample(out, "idem_dead_letter_failures_total", plain,
                value(Counter::dead_letter_failures));
  append_header(out, "idem_rebalances_total", "counter",
                "Kafka rebalance callbacks (partitions assigned or revoked).");
  append_sample(out, "idem_rebalances_total", plain, value(Counter::rebalances));
  append_header(out, "idem_commits_total", "counter", "Kafka offset commits, by result.");
  append_sample(out, "idem_commits_total", labels("result", "ok"), value(Counter::commits));
  append_sample(out, "idem_commits_total", labels("result", "failed"),
                value(Counter::commit_failures));
  append_header(out, "idem_reconnects_total", "counter",
                "RabbitMQ connections reopened after a loss.");
  append_sample(out, "idem_reconnects_total", plain, value(Counter::reconnects));

  append_header(out, "idem_duration_seconds", "histogram",
                "Latency of store claims, store completions, handler calls and outbox "
                "relay batches.");
  for (int t = 0; t < kTimingCount; ++t) {
    const auto timing = static_cast<Timing>(t);
    const HistogramSnapshot h = histogram(timing);
    const std::string op = labels("op", to_string(timing));
    for (std::size_t i = 0; i < h.cumulative.size(); ++i) {
      std::string le = op;
      le += le.empty() ? "le=\"" : ",le=\"";
      append_number(le, i < h.bounds.size() ? h.bounds[i] : HUGE_VAL);
      le += '"';
      append_sample(out, "idem_duration_seconds_bucket", le, h.cumulative[i]);
    }
    append_sample(out, "idem_duration_seconds_sum", op, h.sum_seconds);
    append_sample(out, "idem_duration_seconds_count", op, h.count);
  }

  // Sources run under stores_mutex_ so a store cannot be removed (and then destroyed) while its
  // callback runs; the message path never takes this mutex.
  std::lock_guard lock(stores_mutex_);
  if (stores_.empty()) return out;
  struct Row {
    std::string labels;
    bool up = false;
    StoreStats stats;
  };
  std::vector<Row> rows;
  rows.reserve(stores_.size());
  for (const Store& store : stores_) {
    Row row{.labels = labels("store", store.label), .up = false, .stats = {}};
    try {
      row.stats = store.source();
      row.up = true;
    } catch (const ConfigError&) {
      // The backend has no stats hook (DedupStore's default): not down, just silent.
      continue;
    } catch (...) {  // NOLINT(bugprone-empty-catch): a failing store shows as up 0
    }
    rows.push_back(std::move(row));
  }
  if (rows.empty()) return out;
  append_header(out, "idem_store_up", "gauge",
                "1 when the store answered the last stats request, 0 when it failed.");
  for (const Row& row : rows) append_sample(out, "idem_store_up", row.labels, row.up ? 1.0 : 0.0);
  struct StoreGauge {
    std::string_view name, type, help;
    std::uint64_t StoreStats::*field;
  };
  static constexpr std::array<StoreGauge, 5> kGauges = {{
      {"idem_store_records", "gauge", "Records the store holds (any state).", &StoreStats::records},
      {"idem_store_in_progress", "gauge",
       "Records held by a claim (live, or lease expired and not yet purged).",
       &StoreStats::in_progress},
      {"idem_store_done", "gauge", "Records of keys processed (remembered until retention).",
       &StoreStats::done},
      {"idem_store_bytes", "gauge", "Bytes the store accounts for its records.",
       &StoreStats::bytes},
      {"idem_store_evictions_total", "counter",
       "Done records dropped before their retention to respect the store's bounds.",
       &StoreStats::evictions},
  }};
  for (const StoreGauge& gauge : kGauges) {
    append_header(out, gauge.name, gauge.type, gauge.help);
    for (const Row& row : rows) {
      if (row.up) append_sample(out, gauge.name, row.labels, row.stats.*gauge.field);
    }
  }
  return out;
}

}  // namespace idem
