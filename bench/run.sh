#!/usr/bin/env bash
# End-to-end benchmark: the gateway beside HAProxy and nginx on loopback, same backends,
# same load generator (wrk), interleaved rounds, reported as ratios measured in one run.
#
#   bench/run.sh                       # pinned (wrk on cpu0, proxies + backends on cpu1), c=50 and c=200
#   bench/run.sh --rounds 6 --duration 5
#   GATEWAY_STRATEGY=random bench/run.sh
#   bench/run.sh --variants            # also the gateway with metrics off, with the access log
#                                      # on (to a file), and with no flags at all (access log to
#                                      # stderr), in the same interleaved rounds
#
# Results: the RESULT lines at the end, and the output dir it names. The harness in
# bench/harness/ is the team's lbbench (see bench/harness/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in haproxy nginx wrk curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)"
  apt-get update -qq && apt-get install -y -qq haproxy nginx wrk curl >/dev/null
fi

extra=()
if [ "${1:-}" = "--variants" ]; then
  shift
  log="$(mktemp -d)/access.log"
  extra=(--extra-gw "gateway-no-metrics=bench/gateway-cmd.sh --no-metrics"
         --extra-gw "gateway-access-log=bench/gateway-cmd.sh --with-access-log $log"
         --extra-gw "gateway-defaults=bench/gateway-cmd.sh --defaults")
fi

cargo build --release -p gateway
exec bench/harness/lbbench.sh --pin split --systems "direct haproxy-t1 nginx-w1" \
  --gw-name gateway-wasm-rr --gw-cmd "bench/gateway-cmd.sh" "${extra[@]}" "$@"
