#!/usr/bin/env bash
# Bytes per record of MemoryStore vs a bare absl::flat_hash_set<std::string>, from peak RSS
# (/usr/bin/time -v) at 1M and 10M records of 16-byte keys, minus the empty process's RSS.
set -euo pipefail
bin=${1:-build/bench/memory_footprint}
rss() { /usr/bin/time -v "$bin" "$@" 2>&1 >/dev/null | awk '/Maximum resident/ {print $6}'; }
base=$(rss 0)
printf '%-8s %-10s %14s %18s %16s\n' store records peak_rss_kib bytes_per_record overhead_vs_key
for n in 1000000 10000000; do
  for mode in idem bare; do
    kib=$(rss $n $([ $mode = bare ] && echo --bare))
    awk -v n=$n -v kib=$kib -v base=$base -v mode=$mode 'BEGIN {
      per = (kib - base) * 1024 / n
      printf "%-8s %-10d %14d %18.1f %16.1f\n", mode, n, kib, per, per - 16 }'
  done
done
