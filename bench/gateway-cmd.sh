#!/usr/bin/env bash
# The gateway as lbbench's "gateway under test": one worker thread, Wasm round robin,
# no access log (HAProxy and nginx in the harness log nothing either), metrics on (the
# default). Extra arguments go to the gateway (e.g. --no-metrics); `--with-access-log FILE`
# turns the access log on, written to FILE; `--defaults` leaves the log flags out (access
# log on, to stderr). GATEWAY_BIN=PATH runs another build (e.g. the previous release).
# lbbench exports LBBENCH_PORT and LBBENCH_BACKENDS (comma-separated host:port).
set -euo pipefail
cd "$(dirname "$0")/.."
log=(--no-access-log)
if [ "${1:-}" = "--with-access-log" ]; then
  log=(--access-log "$2")
  shift 2
elif [ "${1:-}" = "--defaults" ]; then
  # What a user gets without flags: the access log on, to stderr (lbbench keeps the
  # process's output in a file).
  log=()
  shift
fi
args=()
for b in ${LBBENCH_BACKENDS//,/ }; do args+=(-b "$b"); done
exec "${GATEWAY_BIN:-target/release/gateway}" --listen "127.0.0.1:${LBBENCH_PORT}" --threads 1 "${log[@]}" \
  --strategy "${GATEWAY_STRATEGY:-round-robin}" "${args[@]}" "$@"
