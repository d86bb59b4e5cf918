#!/usr/bin/env bash
# Installs the Debian packages Darbaza needs when they are missing (as root only).
# Usage: scripts/system-deps.sh redis-server [chromium] ...
set -euo pipefail
missing=()
for pkg in "$@"; do
  case "$pkg" in
    redis-server) command -v redis-server >/dev/null 2>&1 || missing+=(redis-server) ;;
    chromium) command -v chromium >/dev/null 2>&1 || missing+=(chromium) ;;
    postgresql) [ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql) ;;
    *) dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "Missing system packages: ${missing[*]}. Install them (sudo apt-get install ${missing[*]}) and retry." >&2
  exit 1
fi
echo "Installing ${missing[*]} with apt-get..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
