#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to the main demo: installs what is missing,
# builds, and runs examples/card_purchase on the embedded default store.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
IDEM_TARGETS=card_purchase "$root/scripts/build.sh" -DIDEM_BUILD_BENCH=OFF
"${IDEM_BUILD_DIR:-$root/build}/examples/card_purchase"
