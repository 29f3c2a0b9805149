#!/usr/bin/env bash
# Configures and builds idem into ${IDEM_BUILD_DIR:-build}; ${IDEM_TARGETS} (space-separated)
# limits the build to those targets. Extra arguments go to cmake.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${IDEM_BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja "$@" >/dev/null
targets=()
for t in ${IDEM_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build" -j "$(nproc)" "${targets[@]}"
