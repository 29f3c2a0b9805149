#!/usr/bin/env bash
# Installs the Debian 12 packages idem needs (scripts/debian-packages.txt) when any is missing.
# Runs apt-get as root, or through sudo.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/debian-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "idem: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "idem: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# postgresql-common creates and starts a system-wide "main" cluster on install unless this
# says otherwise (read by its postinst; written only before its first install).
if ! dpkg-query -W -f='${Status}' postgresql-common 2>/dev/null | grep -q "ok installed"; then
  $sudo mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
$sudo apt-get update -qq
# Keep package maintainer scripts from starting system-wide servers; tests start their own.
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
