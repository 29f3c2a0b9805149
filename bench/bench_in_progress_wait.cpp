// How soon a duplicate that arrives while the first delivery is still running gets its answer:
//   wait:    Options::in_progress_wait on; the duplicate waits for the holder and returns
//            `duplicate` with the stored response (MemoryStore wakes it; SQLite polls with
//            pauses growing from 1 to 100 ms).
//   nack:    the default; the duplicate gets `in_progress`, and is redelivered after the
//            adapters' first retry backoff (ConsumerOptions::retry_backoff, 100 ms), then
//            again after each doubled backoff until it is a duplicate — what a Kafka or
//            RabbitMQ consumer does today.
// The holder's handler runs 20 ms; the duplicate arrives 5 ms into it. Reported: the time from
// the holder's completion to the duplicate's answer (latency_after_holder_ms), medians.

#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "idem/idem.hpp"
#include "idem/sqlite.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto kHandler = 20ms;
constexpr auto kArrival = 5ms;
constexpr auto kFirstBackoff = 100ms;  // kafka::ConsumerOptions / RabbitMQ retry_backoff

template <class Store>
void run(benchmark::State& state, Store& store, bool wait) {
  std::atomic<Clock::time_point> holder_done{};
  idem::IdempotentConsumer holder(store, [&](const idem::Message&) {
    std::this_thread::sleep_for(kHandler);
    return std::string("card");
  });
  idem::IdempotentConsumer duplicate(
      store, [](const idem::Message&) { return std::string(); },
      idem::Options{.in_progress_wait = wait ? 10s : 0ms});
  double total_ms = 0;
  int n = 0;
  for (auto _ : state) {
    const std::string key = "pay-" + std::to_string(n++);
    std::thread first([&] {
      holder.consume({.key = key, .payload = "p"});
      holder_done.store(Clock::now());
    });
    std::this_thread::sleep_for(kArrival);
    idem::Result r = duplicate.consume({.key = key, .payload = "p"});
    auto backoff = kFirstBackoff;
    while (r.outcome == idem::Outcome::in_progress) {  // the adapter's nack and redelivery
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
      r = duplicate.consume({.key = key, .payload = "p"});
    }
    const Clock::time_point answered = Clock::now();
    first.join();
    if (r.outcome != idem::Outcome::duplicate) state.SkipWithError("not a duplicate");
    total_ms += std::chrono::duration<double, std::milli>(answered - holder_done.load()).count();
  }
  state.counters["latency_after_holder_ms"] = total_ms / static_cast<double>(n);
}

void BM_MemoryStore(benchmark::State& state) {
  idem::MemoryStore store;
  run(state, store, state.range(0) == 1);
  state.SetLabel(state.range(0) == 1 ? "wait" : "nack + redelivery");
}

void BM_SqliteStore(benchmark::State& state) {
  idem::testing::TempDir dir("bench-wait");
  idem::SqliteStore store(dir.file("wait.db"), {.synchronous = idem::SqliteSync::normal});
  run(state, store, state.range(0) == 1);
  state.SetLabel(state.range(0) == 1 ? "wait" : "nack + redelivery");
}

BENCHMARK(BM_MemoryStore)
    ->Arg(1)
    ->Arg(0)
    ->Iterations(20)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SqliteStore)
    ->Arg(1)
    ->Arg(0)
    ->Iterations(20)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
