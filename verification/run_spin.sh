#!/usr/bin/env bash
# Model-checks idem's protocol (verification/idem.pml) with Spin.
#
#   verification/run_spin.sh <check>...   run the named checks
#   verification/run_spin.sh all          run every check
#   verification/run_spin.sh list         name the checks and what each expects
#   verification/run_spin.sh names        only their names (CMake reads these)
#
# Each check runs `spin -a` with its macros in a temporary directory, compiles pan.c, runs pan
# and prints one line. A "holds" check passes when pan explores the whole state space and
# finds no error; a "fails" check passes when pan finds a counterexample to the property the
# check names (the trail is replayed with -v). Exit status 0 iff every check passed.
#
# Environment: SPIN (default: spin), CC (default: cc), IDEM_SPIN_KEEP=1 keeps the temporary
# directories (pan.c, pan, the trail).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
model="$here/idem.pml"
spin=${SPIN:-spin}
cc=${CC:-cc}
verbose=0

# Properties, as pan prints the failed assertion.
p_effects='assertion violated \(effects<=\(?(excused\+)?1\)?\)'
p_fence='assertion violated \(\(wtok\[me\]==h_tok\)'
p_tokens='assertion violated \(wtok\[me\]>max_issued\)'
only_effects='-DCHECK_FENCE=0 -DCHECK_TOKENS=0'
only_fence='-DCHECK_EFFECTS=0 -DCHECK_TOKENS=0'
only_tokens='-DCHECK_EFFECTS=0 -DCHECK_FENCE=0'

# name | expect (holds / fails) | kind (safety / liveness) | spin macros | property it must
# break (fails only) | what it shows
checks=(
  "safety|holds|safety|-DWORKERS=3 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_SLOW=2 -DMAX_FAIL=1||after_success: no unexcused double effect, fenced complete/release, rising tokens"
  "liveness|holds|liveness|-DLIVENESS -DWORKERS=2 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_SLOW=2 -DMAX_FAIL=1||after_success: every copy acked, no claim live forever (weak fairness)"
  "before_processing|holds|safety|-DMARK_BEFORE -DWORKERS=3 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_FAIL=2||before_processing: at most one effect, ever"
  "before_processing_liveness|holds|liveness|-DMARK_BEFORE -DLIVENESS -DWORKERS=3 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_FAIL=1||before_processing: every copy acked"
  "inbox|holds|safety|-DINBOX -DWORKERS=3 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_FAIL=2||transactional inbox: at most one committed effect, no excuses"
  "inbox_liveness|holds|liveness|-DINBOX -DLIVENESS -DWORKERS=3 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_FAIL=1||transactional inbox: every copy acked"
  "lossy_store_with_wait|holds|safety|-DLOSSY -DWAIT -DWORKERS=2 -DCOPIES=2 -DMAX_CRASH=2 -DMAX_SLOW=2 -DMAX_FAIL=1||failover with WAIT: no unexcused double effect, rising tokens"
  "lossy_store_finds_double_effect|fails|safety|-DLOSSY $only_effects|$p_effects|failover without WAIT forgets a claim or a completion: the handler runs twice"
  "lossy_store_finds_token_reuse|fails|safety|-DLOSSY $only_tokens|$p_tokens|failover without WAIT forgets the token counter: a token is handed out twice"
  "mutant_finds_stale_complete|fails|safety|-DMUTANT_NO_FENCE $only_fence|$p_fence|complete without the token check lets a stale holder overwrite the record"
  "mutant_release_finds_double_effect|fails|safety|-DMUTANT_NO_FENCE_RELEASE $only_effects|$p_effects|release without the token check frees a live claim: two handlers run"
  "mutant_inbox_effect_outside_tx_finds_double_effect|fails|safety|-DINBOX -DMUTANT_EFFECT_OUTSIDE_TX $only_effects|$p_effects|an effect outside the inbox transaction repeats after a crash before COMMIT"
)

usage() {
  echo "usage: $0 [-v] <check>... | all | list | names" >&2
  exit 2
}

field() { # field <entry> <n>
  local IFS='|'
  local -a parts
  read -r -a parts <<<"$1"
  echo "${parts[$2]-}"
}

find_check() {
  local entry
  for entry in "${checks[@]}"; do
    if [ "$(field "$entry" 0)" = "$1" ]; then
      echo "$entry"
      return 0
    fi
  done
  return 1
}

run_check() {
  local entry=$1 name expect kind macros pattern what
  name=$(field "$entry" 0)
  expect=$(field "$entry" 1)
  kind=$(field "$entry" 2)
  macros=$(field "$entry" 3)
  pattern=$(field "$entry" 4)
  what=$(field "$entry" 5)

  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/idem-spin-$name.XXXXXX")
  cp "$model" "$dir/idem.pml"
  local -a spin_args cc_args pan_args
  read -r -a spin_args <<<"$macros"
  cc_args=(-O2 -w -o pan pan.c)
  if [ "$kind" = safety ]; then
    cc_args=(-DSAFETY "${cc_args[@]}")
    # A must-fail check searches breadth-first: its trail is a shortest counterexample.
    [ "$expect" = fails ] && cc_args=(-DBFS "${cc_args[@]}")
    pan_args=(-m100000)
  else
    # -a: acceptance cycles (the LTL claim), -f: weak fairness (NFAIR=3: bookkeeping for
    # more than the default six processes).
    cc_args=(-DNFAIR=3 "${cc_args[@]}")
    pan_args=(-a -f -m100000)
  fi

  local start end status=0
  start=$(date +%s.%N)
  (
    cd "$dir"
    "$spin" "${spin_args[@]}" -a idem.pml >spin.log 2>&1 || { cat spin.log; exit 3; }
    "$cc" "${cc_args[@]}" >cc.log 2>&1 || { cat cc.log; exit 3; }
    ./pan "${pan_args[@]}" >pan.log 2>&1 || true
  ) || status=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

  local log="$dir/pan.log" verdict="" detail ok=0
  if [ "$status" -ne 0 ]; then
    verdict="ERROR"
    detail="spin or the C compiler failed (see $dir)"
  else
    local errors states
    errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)
    states=$(sed -n 's/^ *\([0-9][0-9]*\) states, stored.*/\1/p' "$log" | tail -n 1)
    if [ -z "$errors" ]; then
      verdict="ERROR"
      detail="pan printed no result (see $log)"
    elif [ "$expect" = holds ]; then
      if [ "$errors" -ne 0 ]; then
        detail="counterexample: $(grep -m1 -E '^pan:[0-9]+:' "$log" || echo "errors: $errors")"
      elif grep -qE 'max search depth too small|Search not completed' "$log"; then
        detail="search not completed (depth or memory bound hit)"
      elif [ "${states:-0}" -lt 1000 ]; then
        detail="only ${states} states: the model is broken or the check is vacuous"
      else
        ok=1
        detail="holds: no error in ${states} states"
      fi
    else
      if [ "$errors" -eq 0 ]; then
        detail="no counterexample found in ${states} states (expected one)"
      elif ! grep -qE "$pattern" "$log"; then
        detail="found a different error: $(grep -m1 -E '^pan:[0-9]+:' "$log" || echo "errors: $errors")"
      else
        ok=1
        detail="counterexample found as expected: $(grep -m1 -E '^pan:[0-9]+:' "$log" | sed 's/^pan:[0-9]*: //')"
      fi
    fi
  fi
  if [ -z "$verdict" ]; then
    if [ "$ok" -eq 1 ]; then verdict="PASS"; else verdict="FAIL"; fi
  fi

  printf '%-4s %-50s %-5s %6ss  %s\n' "$verdict" "$name" "$expect" "$secs" "$detail"
  if [ "$ok" -ne 1 ] || [ "$verbose" -eq 1 ]; then
    echo "     ($what)"
    if [ -f "$dir/idem.pml.trail" ]; then
      echo "     trail:"
      (cd "$dir" && "$spin" "${spin_args[@]}" -t idem.pml 2>&1) |
        sed -n '/^ *\(w[0-9]\|env\):/p; /assertion violated/p; /acceptance cycle/p; /<<<<<START OF CYCLE>>>>>/p' |
        sed 's/^ */       /'
    fi
    if [ "$ok" -ne 1 ] && [ -f "$log" ]; then tail -n 25 "$log" | sed 's/^/     | /'; fi
  fi
  if [ "$ok" -eq 1 ] && [ -z "${IDEM_SPIN_KEEP:-}" ]; then
    rm -rf "$dir"
  else
    echo "     files: $dir"
  fi
  [ "$ok" -eq 1 ]
}

[ $# -ge 1 ] || usage
if [ "$1" = -v ]; then
  verbose=1
  shift
  [ $# -ge 1 ] || usage
fi
command -v "$spin" >/dev/null || { echo "run_spin.sh: '$spin' not found; install Spin (apt-get install spin)" >&2; exit 2; }
command -v "$cc" >/dev/null || { echo "run_spin.sh: C compiler '$cc' not found" >&2; exit 2; }

case "$1" in
  list)
    for entry in "${checks[@]}"; do
      printf '%-50s %-5s %s\n' "$(field "$entry" 0)" "$(field "$entry" 1)" "$(field "$entry" 5)"
    done
    exit 0
    ;;
  names)
    for entry in "${checks[@]}"; do field "$entry" 0; done
    exit 0
    ;;
  all)
    names=()
    for entry in "${checks[@]}"; do names+=("$(field "$entry" 0)"); done
    ;;
  *) names=("$@") ;;
esac

failed=0
for name in "${names[@]}"; do
  if ! entry=$(find_check "$name"); then
    echo "run_spin.sh: unknown check '$name' (run_spin.sh list)" >&2
    failed=1
    continue
  fi
  run_check "$entry" || failed=1
done
exit "$failed"
