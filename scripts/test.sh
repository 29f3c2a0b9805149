#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a passing test suite: installs what is
# missing, builds, and runs every test with CTest. Tests start their own redis-server,
# rabbitmq-server and SQLite files on free loopback ports; none is skipped.
# Extra arguments go to cmake, e.g. -DIDEM_SANITIZE=thread (use another IDEM_BUILD_DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${IDEM_BUILD_DIR:-$root/build}
"$root/scripts/setup.sh"
IDEM_BUILD_DIR=$build "$root/scripts/build.sh" "$@"
ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$(nproc)"
