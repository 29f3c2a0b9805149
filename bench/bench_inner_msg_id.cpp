// InnerMsgIdGenerator::next() against its floor (one CLOCK_REALTIME read) and against
// libuuid's time-based generator. Results: docs/benchmarks-inner-msg-id.md.
#include <benchmark/benchmark.h>
#include <time.h>
#include <uuid/uuid.h>

#include <string>

#include "idem/inner_msg_id.hpp"

namespace {

void BM_ClockGettimeRealtime(benchmark::State& state) {
  timespec ts;
  for (auto _ : state) {
    clock_gettime(CLOCK_REALTIME, &ts);
    benchmark::DoNotOptimize(ts);
  }
}
BENCHMARK(BM_ClockGettimeRealtime);

// For reference only: next() does not use the coarse clock.
void BM_ClockGettimeRealtimeCoarse(benchmark::State& state) {
  timespec ts;
  for (auto _ : state) {
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    benchmark::DoNotOptimize(ts);
  }
}
BENCHMARK(BM_ClockGettimeRealtimeCoarse);

void BM_InnerMsgIdNext(benchmark::State& state) {
  idem::InnerMsgIdGenerator gen;
  for (auto _ : state) benchmark::DoNotOptimize(gen.next());
}
BENCHMARK(BM_InnerMsgIdNext);

// One generator shared by both threads: the contended CAS path.
idem::InnerMsgIdGenerator g_shared;
void BM_InnerMsgIdNextShared(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(g_shared.next());
}
BENCHMARK(BM_InnerMsgIdNextShared)->Threads(2)->UseRealTime();

void BM_LibuuidGenerateTime(benchmark::State& state) {
  uuid_t out;
  for (auto _ : state) {
    uuid_generate_time(out);
    benchmark::DoNotOptimize(out);
  }
}
BENCHMARK(BM_LibuuidGenerateTime);

void BM_InnerMsgIdToString(benchmark::State& state) {
  idem::InnerMsgIdGenerator gen;
  const idem::InnerMsgId id = gen.next();
  for (auto _ : state) benchmark::DoNotOptimize(id.to_string());
}
BENCHMARK(BM_InnerMsgIdToString);

void BM_InnerMsgIdParse(benchmark::State& state) {
  idem::InnerMsgIdGenerator gen;
  const std::string text = gen.next().to_string();
  for (auto _ : state) {
    benchmark::DoNotOptimize(text.data());
    benchmark::DoNotOptimize(idem::InnerMsgId::parse(text));
  }
}
BENCHMARK(BM_InnerMsgIdParse);

}  // namespace
