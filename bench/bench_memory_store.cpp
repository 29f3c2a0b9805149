// consume() through a MemoryStore against a bare insert into the same kind of hash map, on the
// same message stream: 1M distinct 16-byte keys plus 30% redeliveries.
#include <absl/container/flat_hash_set.h>
#include <benchmark/benchmark.h>

#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"

namespace {

constexpr std::size_t kDistinct = 1'000'000;

struct Stream {
  std::vector<std::string> keys;
  std::vector<std::uint32_t> order;  // indices into keys; 30% of entries are repeats
  std::string payload = R"({"amount":1000,"currency":"EUR"})";

  Stream() {
    keys.reserve(kDistinct);
    for (std::size_t i = 0; i < kDistinct; ++i) {
      char key[32];
      std::snprintf(key, sizeof key, "pay-%012zu", i);
      keys.emplace_back(key, 16);
    }
    std::mt19937_64 rng(42);
    order.reserve(kDistinct * 13 / 10);
    for (std::uint32_t i = 0; i < kDistinct; ++i) {
      order.push_back(i);
      // A redelivery of a recent message, as after a lost ack or an uncommitted offset.
      if (rng() % 10 < 3) order.push_back(i - static_cast<std::uint32_t>(rng() % (i + 1) % 64));
    }
  }
};

const Stream& stream() {
  static const Stream s;
  return s;
}

// Splits the stream into `threads` contiguous parts and runs `work(begin, end)` on each.
template <class Work>
void run_split(int threads, Work work) {
  const std::size_t n = stream().order.size();
  if (threads == 1) return work(std::size_t{0}, n);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back(work, n * t / threads, n * (t + 1) / threads);
  }
  for (std::thread& th : pool) th.join();
}

void BM_BareInsert(benchmark::State& state) {
  const Stream& s = stream();
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    // Sharded like MemoryStore when more than one thread inserts, so the baseline is fair.
    constexpr std::size_t kShards = 64;
    std::vector<absl::flat_hash_set<std::string>> sets(threads == 1 ? 1 : kShards);
    std::vector<std::mutex> locks(sets.size());
    std::atomic<std::size_t> fresh{0};
    run_split(threads, [&](std::size_t begin, std::size_t end) {
      std::size_t local = 0;
      for (std::size_t i = begin; i < end; ++i) {
        const std::string& key = s.keys[s.order[i]];
        if (threads == 1) {
          local += sets[0].insert(key).second;
        } else {
          std::size_t shard = absl::Hash<std::string_view>{}(key) % kShards;
          std::lock_guard lock(locks[shard]);
          local += sets[shard].insert(key).second;
        }
      }
      fresh += local;
    });
    benchmark::DoNotOptimize(fresh.load());
  }
  state.SetItemsProcessed(state.iterations() * s.order.size());
}

void BM_Consume(benchmark::State& state) {
  const Stream& s = stream();
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    idem::MemoryStore store;
    idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
    std::atomic<std::size_t> processed{0};
    run_split(threads, [&](std::size_t begin, std::size_t end) {
      std::size_t local = 0;  // counted per thread: a shared counter would be the bottleneck
      for (std::size_t i = begin; i < end; ++i) {
        idem::Result r = consumer.consume({.key = s.keys[s.order[i]], .payload = s.payload});
        local += r.outcome == idem::Outcome::processed;
      }
      processed += local;
    });
    if (processed.load() != kDistinct) state.SkipWithError("a key was processed twice or never");
  }
  state.SetItemsProcessed(state.iterations() * s.order.size());
}

}  // namespace

BENCHMARK(BM_BareInsert)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Consume)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
