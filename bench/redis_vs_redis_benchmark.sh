#!/usr/bin/env bash
# RedisStore against redis-benchmark on the same freshly started redis-server, in one run.
#
#   bench/redis_vs_redis_benchmark.sh [build-dir] [requests] [rounds]
#
# Baselines (one connection each, distinct keys so every SET NX succeeds like a fresh claim):
#   redis-benchmark -c 1 -n N -r 100000000 SET key:__rand_int__ v NX PX 30000
#   the same with -P 100
# Ours: bench_redis_store (Google Benchmark): consume() of new messages (claim + complete:
# two Redis commands, two round trips) and consume_batch(100) (two pipelined round trips).
set -euo pipefail

build=${1:-build}
requests=${2:-100000}
rounds=${3:-3}
bench="$build/bench/bench_redis_store"
[[ -x $bench ]] || { echo "no $bench: build the bench_redis_store target first" >&2; exit 1; }
server=$(command -v redis-server || echo /usr/bin/redis-server)
[[ -x $server ]] || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
"$server" --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
  --daemonize no --logfile "$dir/redis.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done

rb() {  # prints requests per second of one redis-benchmark run
  redis-benchmark -p "$port" -c 1 -n "$requests" -r 100000000 "$@" -q \
      SET key:__rand_int__ v NX PX 30000 2>/dev/null |
    tr '\r' '\n' | grep 'requests per second' | tail -1 |
    sed -E 's/.*: ([0-9.]+) requests per second.*/\1/'
}

echo "redis-server $("$server" --version | sed -E 's/.*v=([^ ]+).*/\1/') on 127.0.0.1:$port; $(nproc) cores; $rounds interleaved rounds, medians"
ours() {  # ours <benchmark filter>: JSON of one bench_redis_store run
  IDEM_REDIS_PORT=$port "$bench" --benchmark_format=json --benchmark_min_time=1 \
    --benchmark_filter="$1" 2>/dev/null
}
results=$(mktemp)
# Baseline and ours alternate, so a noisy neighbour on a shared machine hits both alike.
for _ in $(seq "$rounds"); do
  echo "set_plain $(rb)" >>"$results"
  ours 'BM_Consume(New|Duplicate)' | python3 -c 'import json,sys
for b in json.load(sys.stdin)["benchmarks"]:
    print(b["name"].split("/")[0], b["items_per_second"], b["redis_commands_per_second"])' >>"$results"
  redis-cli -p "$port" flushall >/dev/null
  echo "set_p100 $(rb -P 100)" >>"$results"
  ours 'BM_ConsumeBatch' | python3 -c 'import json,sys
for b in json.load(sys.stdin)["benchmarks"]:
    print(b["name"].split("/")[0], b["items_per_second"], b["redis_commands_per_second"])' >>"$results"
  redis-cli -p "$port" flushall >/dev/null
done

python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, *vals = line.split()
    rows.setdefault(name, []).append([float(v) for v in vals])
med = lambda name, i=0: statistics.median(r[i] for r in rows[name])
set_plain, set_p100 = med("set_plain"), med("set_p100")
new_msgs, new_cmds = med("BM_ConsumeNew"), med("BM_ConsumeNew", 1)
dup_msgs = med("BM_ConsumeDuplicate")
batch_msgs, batch_cmds = med("BM_ConsumeBatch"), med("BM_ConsumeBatch", 1)
print(f"{'':48}{'per second':>12}{'ratio':>8}")
print(f"{'redis-benchmark SET NX PX -c 1, no pipelining':48}{set_plain:12,.0f}")
print(f"{'consume() new message: messages':48}{new_msgs:12,.0f}{new_msgs/set_plain:8.2f}")
print(f"{'consume() new message: Redis commands (2/msg)':48}{new_cmds:12,.0f}{new_cmds/set_plain:8.2f}")
print(f"{'consume() duplicate: messages (1 command/msg)':48}{dup_msgs:12,.0f}{dup_msgs/set_plain:8.2f}")
print(f"{'redis-benchmark SET NX PX -c 1 -P 100':48}{set_p100:12,.0f}")
print(f"{'consume_batch(100) new: messages':48}{batch_msgs:12,.0f}{batch_msgs/set_p100:8.2f}")
print(f"{'consume_batch(100) new: key operations (2/msg)':48}{2*batch_msgs:12,.0f}{2*batch_msgs/set_p100:8.2f}")
print(f"{'consume_batch(100) new: Redis commands sent':48}{batch_cmds:12,.0f}")
print("raw runs:", {k: [round(r[0]) for r in v] for k, v in rows.items()})
PY
rm -f "$results"
