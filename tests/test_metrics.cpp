// idem::PrometheusMetrics and idem::StderrLogger: what a consumer reports, rendered and parsed
// back; histogram shape; concurrent writers and scrapers; the logger's lines.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"
#include "idem/prometheus_metrics.hpp"
#if __has_include("idem/stderr_logger.hpp") && defined(IDEM_TEST_HAVE_LOG)
#include "idem/stderr_logger.hpp"
#endif

namespace {

using namespace std::chrono_literals;

// "name{labels}" -> value, from the exposition text; fails the test on a malformed line.
std::map<std::string, double> parse(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream in(text);
  std::string line;
  std::string last_type_name;
  while (std::getline(in, line)) {
    EXPECT_FALSE(line.empty()) << "blank line in the exposition";
    if (line.starts_with("# HELP ")) continue;
    if (line.starts_with("# TYPE ")) {
      last_type_name = line.substr(7, line.find(' ', 7) - 7);
      continue;
    }
    const auto space = line.rfind(' ');
    if (space == std::string::npos) {
      ADD_FAILURE() << "no value on line: " << line;
      continue;
    }
    const std::string series = line.substr(0, space);
    EXPECT_TRUE(series.starts_with(last_type_name)) << "sample outside its family: " << line;
    EXPECT_EQ(samples.count(series), 0u) << "duplicate series: " << series;
    samples[series] = std::stod(line.substr(space + 1));
  }
  return samples;
}

double at(const std::map<std::string, double>& samples, const std::string& series) {
  auto it = samples.find(series);
  if (it == samples.end()) {
    ADD_FAILURE() << "missing series " << series;
    return -1;
  }
  return it->second;
}

// The le bounds and counts of one histogram, in rendered order.
std::vector<std::pair<std::string, double>> buckets(const std::string& text, std::string_view op) {
  std::vector<std::pair<std::string, double>> out;
  std::istringstream in(text);
  std::string line;
  const std::string prefix = "idem_duration_seconds_bucket{op=\"" + std::string(op) + "\",le=\"";
  while (std::getline(in, line)) {
    if (!line.starts_with(prefix)) continue;
    const auto end = line.find('"', prefix.size());
    out.emplace_back(line.substr(prefix.size(), end - prefix.size()),
                     std::stod(line.substr(line.rfind(' ') + 1)));
  }
  return out;
}

TEST(PrometheusMetrics, CountersMatchConsumeOutcomes) {
  idem::MemoryStore store;
  idem::PrometheusMetrics metrics;
  idem::IdempotentConsumer consumer(store,
                                    [](const idem::Message& m) {
                                      if (m.payload == "boom")
                                        throw std::runtime_error("handler failed");
                                    },
                                    {.metrics = &metrics});

  for (const char* key : {"a", "b", "c"}) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, idem::Outcome::processed);
  }
  EXPECT_EQ(consumer.consume({.key = "a", .payload = "p"}).outcome, idem::Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "b", .payload = "p"}).outcome, idem::Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "c", .payload = "other"}).outcome, idem::Outcome::conflict);
  EXPECT_EQ(consumer.consume({.key = "d", .payload = "boom"}).outcome, idem::Outcome::failed);
  const idem::Claim held = store.claim({.key = "e", .fingerprint = idem::Fingerprint::of("p")});
  ASSERT_EQ(held.status, idem::ClaimStatus::acquired);
  EXPECT_EQ(consumer.consume({.key = "e", .payload = "p"}).outcome, idem::Outcome::in_progress);

  const auto samples = parse(metrics.render());
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="processed"})"), 3);
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="duplicate"})"), 2);
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="conflict"})"), 1);
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="failed"})"), 1);
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="in_progress"})"), 1);
  EXPECT_EQ(at(samples, "idem_store_errors_total"), 0);
  EXPECT_EQ(at(samples, "idem_lease_takeovers_total"), 0);
  EXPECT_EQ(at(samples, "idem_lease_lost_total"), 0);
  // Every consume claims once; processed ones complete once; the handler ran 4 times.
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="store_claim"})"), 8);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="store_complete"})"), 3);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="handler"})"), 4);
  EXPECT_EQ(metrics.value(idem::Counter::processed), 3u);
}

TEST(PrometheusMetrics, BatchOutcomesAreCountedOnce) {
  idem::MemoryStore store;
  idem::PrometheusMetrics metrics;
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {}, {.metrics = &metrics});
  const std::vector<idem::Message> batch = {
      {.key = "x", .payload = "1"}, {.key = "y", .payload = "1"}, {.key = "x", .payload = "1"}};
  consumer.consume_batch(batch);
  EXPECT_EQ(metrics.value(idem::Counter::processed), 2u);
  EXPECT_EQ(metrics.value(idem::Counter::duplicate), 1u);
}

TEST(PrometheusMetrics, CacheLookupsAreCountedByResult) {
  idem::MemoryStore inner;
  idem::PrometheusMetrics metrics;
  idem::CachedStore store(inner, {.metrics = &metrics});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {}, {.metrics = &metrics});
  for (int i = 0; i < 4; ++i) consumer.consume({.key = "x", .payload = "1"});
  const auto samples = parse(metrics.render());
  EXPECT_EQ(at(samples, R"(idem_cache_lookups_total{result="hit"})"), 3);
  EXPECT_EQ(at(samples, R"(idem_cache_lookups_total{result="miss"})"), 1);
  EXPECT_EQ(at(samples, R"(idem_messages_total{outcome="duplicate"})"), 3);
}

TEST(PrometheusMetrics, StoreErrorsAreCounted) {
  struct BrokenStore final : idem::DedupStore {
    std::string_view name() const noexcept override { return "broken"; }
    idem::Claim do_claim(const idem::ClaimRequest&) override {
      throw std::runtime_error("connection refused");
    }
    bool do_complete(const idem::Completion&) override { return false; }
    bool do_release(std::string_view, std::uint64_t) override { return false; }
    bool do_forget(std::string_view) override { return false; }
  } store;
  idem::PrometheusMetrics metrics;
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {}, {.metrics = &metrics});
  EXPECT_THROW(consumer.consume({.key = "k"}), idem::StoreUnavailable);
  EXPECT_EQ(at(parse(metrics.render()), "idem_store_errors_total"), 1);
  // A store that cannot count (no stats hook) is left out; one that fails shows as down.
  metrics.add_store(store);
  metrics.add_store(
      "flaky", []() -> idem::StoreStats { throw idem::StoreUnavailable("connection refused"); });
  const auto samples = parse(metrics.render());
  EXPECT_EQ(samples.count(R"(idem_store_up{store="broken"})"), 0u);
  EXPECT_EQ(at(samples, R"(idem_store_up{store="flaky"})"), 0);
  EXPECT_EQ(samples.count(R"(idem_store_records{store="flaky"})"), 0u);
}

TEST(PrometheusMetrics, HistogramBucketsAreCumulativeAndMonotonic) {
  idem::PrometheusMetrics metrics;
  const std::vector<std::chrono::nanoseconds> latencies = {10us, 50us,  51us, 700us, 1ms, 3ms,
                                                           20ms, 400ms, 2s,   30s,   -5ns};
  for (auto latency : latencies) metrics.observe(idem::Timing::handler, latency);

  const std::string text = metrics.render();
  const auto handler = buckets(text, "handler");
  ASSERT_EQ(handler.size(), idem::PrometheusMetrics::default_buckets().size() + 1);
  EXPECT_EQ(handler.back().first, "+Inf");
  for (std::size_t i = 1; i < handler.size(); ++i) {
    EXPECT_GE(handler[i].second, handler[i - 1].second) << "bucket le=" << handler[i].first;
    EXPECT_LT(std::stod(handler[i - 1].first),
              i + 1 < handler.size() ? std::stod(handler[i].first) : HUGE_VAL);
  }
  const auto samples = parse(text);
  EXPECT_EQ(handler.back().second, latencies.size());
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="handler"})"), latencies.size());
  // le is "less than or equal": exactly 50 µs and exactly 1 ms land in those buckets.
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_bucket{op="handler",le="5e-05"})"), 3);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_bucket{op="handler",le="0.001"})"), 6);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_bucket{op="handler",le="10"})"), 10);
  EXPECT_NEAR(at(samples, R"(idem_duration_seconds_sum{op="handler"})"), 32.424811, 1e-9);
  // Other histograms are rendered, empty.
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="store_claim"})"), 0);

  const idem::HistogramSnapshot snapshot = metrics.histogram(idem::Timing::handler);
  EXPECT_EQ(snapshot.count, latencies.size());
  EXPECT_EQ(snapshot.cumulative.size(), snapshot.bounds.size() + 1);
}

TEST(PrometheusMetrics, CustomBucketsAndConstLabels) {
  idem::PrometheusMetrics metrics(
      {.const_labels = {{"service", "bil\"l\\ing\n"}, {"zone", "a"}}, .buckets = {0.001, 0.1}});
  metrics.observe(idem::Timing::store_claim, 5ms);
  metrics.add(idem::Counter::lease_takeovers, 2);
  const std::string text = metrics.render();
  const std::string labels = R"(service="bil\"l\\ing\n",zone="a")";
  const auto samples = parse(text);
  EXPECT_EQ(at(samples, "idem_lease_takeovers_total{" + labels + "}"), 2);
  EXPECT_EQ(at(samples, "idem_messages_total{" + labels + R"(,outcome="processed"})"), 0);
  EXPECT_EQ(
      at(samples, "idem_duration_seconds_bucket{" + labels + R"(,op="store_claim",le="0.001"})"),
      0);
  EXPECT_EQ(
      at(samples, "idem_duration_seconds_bucket{" + labels + R"(,op="store_claim",le="0.1"})"), 1);
  EXPECT_EQ(
      at(samples, "idem_duration_seconds_bucket{" + labels + R"(,op="store_claim",le="+Inf"})"), 1);
}

TEST(PrometheusMetrics, RejectsBadOptions) {
  EXPECT_THROW(idem::PrometheusMetrics({.const_labels = {{"1abc", "x"}}}), idem::ConfigError);
  EXPECT_THROW(idem::PrometheusMetrics({.const_labels = {{"__name", "x"}}}), idem::ConfigError);
  EXPECT_THROW(idem::PrometheusMetrics({.const_labels = {{"outcome", "x"}}}), idem::ConfigError);
  EXPECT_THROW(idem::PrometheusMetrics({.buckets = {0.1, 0.1}}), idem::ConfigError);
  EXPECT_THROW(idem::PrometheusMetrics({.buckets = {-1}}), idem::ConfigError);
}

TEST(PrometheusMetrics, StoreGauges) {
  idem::MemoryStore store({.max_keys = 64, .shards = 1});
  idem::PrometheusMetrics metrics;
  metrics.add_store(store);  // the MemoryStore overload: cheap stats(), no scan
  idem::MemoryStore other;
  metrics.add_store(static_cast<idem::DedupStore&>(other), "other");
  EXPECT_THROW(metrics.add_store(store), idem::ConfigError);

  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {}, {.metrics = &metrics});
  for (int i = 0; i < 100; ++i) consumer.consume({.key = "key-" + std::to_string(i)});
  idem::IdempotentConsumer second(other, [](const idem::Message&) {});
  second.consume({.key = "k"});

  const auto samples = parse(metrics.render());
  EXPECT_EQ(at(samples, R"(idem_store_up{store="memory"})"), 1);
  EXPECT_EQ(at(samples, R"(idem_store_records{store="memory"})"), 64);
  EXPECT_EQ(at(samples, R"(idem_store_evictions_total{store="memory"})"), 36);
  EXPECT_GT(at(samples, R"(idem_store_bytes{store="memory"})"), 0);
  EXPECT_EQ(at(samples, R"(idem_store_records{store="other"})"), 1);
  EXPECT_EQ(at(samples, R"(idem_store_done{store="other"})"), 1);

  EXPECT_TRUE(metrics.remove_store("other"));
  EXPECT_FALSE(metrics.remove_store("other"));
  EXPECT_EQ(parse(metrics.render()).count(R"(idem_store_records{store="other"})"), 0u);
}

TEST(PrometheusMetrics, FourThreadsCountExactlyWhileScraped) {
  idem::MemoryStore store;
  idem::PrometheusMetrics metrics;
  metrics.add_store(store);
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {}, {.metrics = &metrics});
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::atomic<bool> stop{false};
  std::thread scraper([&] {
    // Each scrape must be self-consistent while writers run.
    while (!stop.load()) {
      const std::string text = metrics.render();
      const auto claims = buckets(text, "store_claim");
      for (std::size_t i = 1; i < claims.size(); ++i) {
        ASSERT_GE(claims[i].second, claims[i - 1].second);
      }
      ASSERT_EQ(at(parse(text), R"(idem_duration_seconds_count{op="store_claim"})"),
                claims.back().second);
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Every key is consumed by two threads: one processes it, the other sees a duplicate
        // or in_progress.
        const std::string key = std::to_string((t / 2) * kPerThread + i);
        consumer.consume({.key = key, .payload = "p"});
      }
    });
  }
  for (auto& worker : workers) worker.join();
  stop = true;
  scraper.join();

  const auto samples = parse(metrics.render());
  const double processed = at(samples, R"(idem_messages_total{outcome="processed"})");
  const double others = at(samples, R"(idem_messages_total{outcome="duplicate"})") +
                        at(samples, R"(idem_messages_total{outcome="in_progress"})");
  EXPECT_EQ(processed, kThreads / 2 * kPerThread);
  EXPECT_EQ(processed + others, kThreads * kPerThread);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="store_claim"})"), kThreads * kPerThread);
  EXPECT_EQ(at(samples, R"(idem_duration_seconds_count{op="handler"})"), processed);
}

#ifdef IDEM_TEST_HAVE_LOG
std::string read_all(std::FILE* file) {
  std::fflush(file);
  std::rewind(file);
  std::string text;
  char buffer[256];
  while (std::size_t n = std::fread(buffer, 1, sizeof buffer, file)) text.append(buffer, n);
  return text;
}

TEST(StderrLogger, WritesOneLinePerEvent) {
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  idem::StderrLogger logger({.min_level = idem::LogLevel::info, .tag = "billing", .stream = file});
  logger.log(idem::LogLevel::debug, "dropped");
  logger.log(idem::LogLevel::warning, "lease lost\nsecond line");
  const std::string text = read_all(file);
  std::fclose(file);
  EXPECT_EQ(text.find("dropped"), std::string::npos);
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  EXPECT_EQ(text.find('\n'), text.size() - 1) << "one event, one line: " << text;
  EXPECT_NE(text.find("billing warning: lease lost\\nsecond line"), std::string::npos) << text;
  // 2026-01-31T12:00:00.123Z
  ASSERT_GE(text.size(), 25u);
  EXPECT_EQ(text[4], '-');
  EXPECT_EQ(text[10], 'T');
  EXPECT_EQ(text[23], 'Z');
}

TEST(StderrLogger, ConsumerReportsHandlerFailures) {
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  idem::StderrLogger logger({.timestamps = false, .stream = file});
  idem::MemoryStore store;
  idem::IdempotentConsumer consumer(
      store, [](const idem::Message&) { throw std::runtime_error("card service down"); },
      {.logger = &logger});
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, idem::Outcome::failed);
  const std::string text = read_all(file);
  std::fclose(file);
  EXPECT_TRUE(text.starts_with("idem warning: handler failed")) << text;
  EXPECT_NE(text.find("card service down"), std::string::npos) << text;
}

TEST(StderrLogger, ManyThreadsNeverInterleave) {
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  idem::StderrLogger logger({.timestamps = false, .stream = file});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::string line(100, static_cast<char>('a' + t));
      for (int i = 0; i < 200; ++i) logger.log(idem::LogLevel::error, line);
    });
  }
  for (auto& thread : threads) thread.join();
  std::istringstream in(read_all(file));
  std::fclose(file);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) {
    ++lines;
    ASSERT_EQ(line.size(), std::string("idem error: ").size() + 100) << line;
    EXPECT_EQ(line.find_first_not_of(line.back(), 12), std::string::npos) << line;
  }
  EXPECT_EQ(lines, 800);
}
#endif

}  // namespace
