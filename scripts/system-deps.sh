#!/usr/bin/env bash
# Install the system binaries a target needs, from the OS package manager.
# usage: scripts/system-deps.sh BINARY[:PACKAGE] ...   e.g. redis-server promtool:prometheus
set -euo pipefail

missing=()
for spec in "$@"; do
  binary=${spec%%:*}
  package=${spec#*:}
  command -v "$binary" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
  echo "error: missing ${missing[*]} and not root. Install them with your package manager," >&2
  echo "  e.g. 'sudo apt-get install ${missing[*]}' or 'brew install ${missing[*]}', then re-run." >&2
  exit 1
fi
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  $SUDO dnf install -y "${missing[@]}"
elif command -v apk >/dev/null 2>&1; then
  $SUDO apk add "${missing[@]}"
else
  echo "error: no supported package manager (apt-get, dnf, apk); install ${missing[*]} by hand" >&2
  exit 1
fi
