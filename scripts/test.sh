#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a passing test suite: installs what is
# missing, builds, and runs every test with CTest. Tests start their own redis-server,
# rabbitmq-server and SQLite files on free loopback ports; none is skipped.
# Extra arguments go to cmake, e.g. -DIDEM_SANITIZE=thread (use another IDEM_BUILD_DIR);
# IDEM_CTEST_ARGS (space-separated) go to ctest, e.g. "-LE spin|packaging".
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${IDEM_BUILD_DIR:-$root/build}
"$root/scripts/setup.sh"
IDEM_BUILD_DIR=$build "$root/scripts/build.sh" "$@"
read -ra ctest_args <<<"${IDEM_CTEST_ARGS:-}"
ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$(nproc)" "${ctest_args[@]}"
