// RedisStore throughput against a running redis-server: IDEM_REDIS_PORT (default 6379) on
// IDEM_REDIS_HOST (default 127.0.0.1). bench/redis_vs_redis_benchmark.sh starts a server and
// runs redis-benchmark against it in the same run for the baseline.
//
// items_per_second is messages/s. Each new message costs two Redis commands (the claim script
// and the completion script), counted in redis_commands_per_second.

#include <absl/container/flat_hash_set.h>
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "idem/redis.hpp"

namespace {

idem::RedisOptions bench_options() {
  const char* host = std::getenv("IDEM_REDIS_HOST");
  const char* port = std::getenv("IDEM_REDIS_PORT");
  static std::atomic<int> run{0};
  return idem::RedisOptions{
      .host = host ? host : "127.0.0.1",
      .port = port ? std::atoi(port) : 6379,
      .key_prefix = "bench" + std::to_string(::getpid()) + "-" + std::to_string(run++) + ":",
      .pool_size = 1};
}

void report(benchmark::State& state, const idem::RedisStore& store, std::int64_t messages) {
  idem::RedisStoreStats s = store.counters();
  state.SetItemsProcessed(messages);
  state.counters["redis_commands_per_second"] =
      benchmark::Counter(static_cast<double>(s.commands), benchmark::Counter::kIsRate);
  state.counters["round_trips_per_message"] =
      static_cast<double>(s.round_trips) / static_cast<double>(messages ? messages : 1);
}

// One new message per consume(): claim + complete, two round trips.
void BM_ConsumeNew(benchmark::State& state) {
  idem::RedisStore store(bench_options());
  store.ping();
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
  std::string key = "order-0000000000";
  std::int64_t n = 0;
  const idem::RedisStoreStats before = store.counters();
  for (auto _ : state) {
    key.replace(6, std::string::npos, std::to_string(n++));
    idem::Result r = consumer.consume({.key = key, .payload = "{\"amount\":10}"});
    if (r.outcome != idem::Outcome::processed) state.SkipWithError("not processed");
  }
  (void)before;
  report(state, store, n);
}
BENCHMARK(BM_ConsumeNew)->UseRealTime();

// A redelivery of a done key: one round trip, the handler does not run.
void BM_ConsumeDuplicate(benchmark::State& state) {
  idem::RedisStore store(bench_options());
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
  consumer.consume({.key = "dup", .payload = "p"});
  std::int64_t n = 0;
  for (auto _ : state) {
    idem::Result r = consumer.consume({.key = "dup", .payload = "p"});
    if (r.outcome != idem::Outcome::duplicate) state.SkipWithError("not a duplicate");
    ++n;
  }
  report(state, store, n);
}
BENCHMARK(BM_ConsumeDuplicate)->UseRealTime();

// The same redelivery through a CachedStore in front of Redis: after the first duplicate it
// is answered from local memory. Its baseline is BM_LocalHashLookup, the least a local
// "have I seen this key" check costs (an abseil flat_hash_set of std::string).
void BM_ConsumeDuplicateCached(benchmark::State& state) {
  idem::RedisStore store(bench_options());
  idem::CachedStore cached(store);
  idem::IdempotentConsumer consumer(cached, [](const idem::Message&) {});
  consumer.consume({.key = "dup", .payload = "p"});
  std::int64_t n = 0;
  for (auto _ : state) {
    idem::Result r = consumer.consume({.key = "dup", .payload = "p"});
    if (r.outcome != idem::Outcome::duplicate) state.SkipWithError("not a duplicate");
    ++n;
  }
  report(state, store, n);
  state.counters["cache_hits"] = static_cast<double>(cached.counters().hits);
}
BENCHMARK(BM_ConsumeDuplicateCached)->UseRealTime();

void BM_LocalHashLookup(benchmark::State& state) {
  absl::flat_hash_set<std::string> seen;
  for (int i = 0; i < 1000; ++i) seen.insert("key-" + std::to_string(i));
  seen.insert("dup");
  const std::string key = "dup";
  for (auto _ : state) {
    bool found = seen.contains(key);
    benchmark::DoNotOptimize(found);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LocalHashLookup);

// consume_batch of new messages: one pipelined round trip of claims, one of completions.
void BM_ConsumeBatch(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  idem::RedisStore store(bench_options());
  store.ping();
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
  std::vector<std::string> keys(size);
  std::vector<idem::Message> batch(size);
  std::int64_t n = 0;
  for (auto _ : state) {
    for (std::size_t i = 0; i < size; ++i) {
      keys[i] = "order-" + std::to_string(n++);
      batch[i] = {.key = keys[i], .payload = "{\"amount\":10}"};
    }
    std::vector<idem::Result> results = consumer.consume_batch(batch);
    if (results.back().outcome != idem::Outcome::processed) state.SkipWithError("not processed");
  }
  report(state, store, n);
}
BENCHMARK(BM_ConsumeBatch)->Arg(100)->UseRealTime();

}  // namespace
