#!/usr/bin/env bash
# RedisStore against redis-benchmark on the same freshly started redis-server, in one run.
#
#   bench/redis_vs_redis_benchmark.sh [build-dir] [requests]
#
# Baselines (one connection each, distinct keys so every SET NX succeeds like a fresh claim):
#   redis-benchmark -c 1 -n N -r 100000000 SET key:__rand_int__ v NX PX 30000
#   the same with -P 100
# Ours: bench_redis_store (Google Benchmark): consume() of new messages (claim + complete:
# two Redis commands, two round trips) and consume_batch(100) (two pipelined round trips).
set -euo pipefail

build=${1:-build}
requests=${2:-200000}
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

echo "redis-server $("$server" --version | sed -E 's/.*v=([^ ]+).*/\1/') on 127.0.0.1:$port; $(nproc) cores"
set_plain=$(rb)
set_p100=$(rb -P 100)
redis-cli -p "$port" flushall >/dev/null

json=$(IDEM_REDIS_PORT=$port "$bench" --benchmark_format=json --benchmark_min_time=2 2>/dev/null)
field() {  # field <benchmark name> <key>
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print([b for b in d["benchmarks"] if b["name"].startswith(sys.argv[2])][0][sys.argv[3]])' "$json" "$1" "$2"
}
new_msgs=$(field BM_ConsumeNew items_per_second)
new_cmds=$(field BM_ConsumeNew redis_commands_per_second)
dup_msgs=$(field BM_ConsumeDuplicate items_per_second)
batch_msgs=$(field BM_ConsumeBatch/100 items_per_second)
batch_cmds=$(field BM_ConsumeBatch/100 redis_commands_per_second)

python3 - "$set_plain" "$set_p100" "$new_msgs" "$new_cmds" "$dup_msgs" "$batch_msgs" "$batch_cmds" <<'PY'
import sys
set_plain, set_p100, new_msgs, new_cmds, dup_msgs, batch_msgs, batch_cmds = map(float, sys.argv[1:])
print(f"{'':44}{'per second':>14}{'ratio':>10}")
print(f"{'redis-benchmark SET NX PX, no pipelining':44}{set_plain:14,.0f}")
print(f"{'consume() new: messages':44}{new_msgs:14,.0f}{new_msgs/set_plain:10.2f}")
print(f"{'consume() new: Redis commands (2/message)':44}{new_cmds:14,.0f}{new_cmds/set_plain:10.2f}")
print(f"{'consume() duplicate: messages (1 command)':44}{dup_msgs:14,.0f}{dup_msgs/set_plain:10.2f}")
print(f"{'redis-benchmark SET NX PX, -P 100':44}{set_p100:14,.0f}")
print(f"{'consume_batch(100) new: messages':44}{batch_msgs:14,.0f}{batch_msgs/set_p100:10.2f}")
print(f"{'consume_batch(100) new: keys claimed+completed':44}{2*batch_msgs:14,.0f}{2*batch_msgs/set_p100:10.2f}")
print(f"{'consume_batch(100) new: Redis commands':44}{batch_cmds:14,.0f}{batch_cmds/set_p100:10.2f}")
PY
