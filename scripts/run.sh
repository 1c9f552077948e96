#!/usr/bin/env bash
# `make run`: migrate and seed the SQLite DB, then run the restaurant API (3000) and the
# sidecar (8080, admin 9901) in the foreground; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p var
$BIN/restaurant-api migrate
$BIN/restaurant-api seed

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

$BIN/restaurant-api serve --host 127.0.0.1 --port 3000 &
pids+=($!)
$BIN/sidecar run --config "${SIDECAR_CONFIG:-config/sidecar.yaml}" &
pids+=($!)
echo "restaurant API on http://127.0.0.1:3000, sidecar on http://127.0.0.1:8080 (admin http://127.0.0.1:9901); Ctrl-C stops both"
# Exit (and stop the other) as soon as either process ends.
wait -n
