#!/usr/bin/env bash
# Builds the benchmarks (Release) and runs every one, each with its raw baseline in the same
# process or the same script run. Results go to stdout; docs/benchmarks.md records them.
#
#   bench/run_all.sh [build-dir]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build-bench}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DIDEM_BUILD_TESTS=OFF \
  -DIDEM_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
echo "# $(date -u +%FT%TZ) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"

run() {  # a Google Benchmark binary, aggregates of 5 interleaved repetitions
  local bin=$build/bench/$1
  shift
  [[ -x $bin ]] || { echo "skipping $1: not built"; return; }
  echo "## $(basename "$bin")"
  "$bin" --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
    --benchmark_report_aggregates_only=true "$@" 2>/dev/null | grep -E "median|^Benchmark"
}

run bench_memory_store
echo "## memory footprint"
bash "$root/bench/memory_footprint.sh" "$build/bench/memory_footprint"
run bench_inner_msg_id
run bench_sqlite_store --benchmark_filter=BM_Pair
run bench_postgres_store --benchmark_filter=BM_Pair
echo "## redis vs redis-benchmark"
bash "$root/bench/redis_vs_redis_benchmark.sh" "$build"
run bench_adapters
run bench_outbox
