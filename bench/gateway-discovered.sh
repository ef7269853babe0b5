#!/usr/bin/env bash
# The gateway as lbbench's gateway under test, like bench/gateway-cmd.sh (one worker
# thread, Wasm round robin, no access log, metrics on), but with no static backends: its
# upstream has `discovery.registry`, and lbbench's backends register through the admin
# API once it listens. The request path is the same for every source (a pool snapshot),
# so its requests/s should equal gateway-cmd.sh's within noise:
#
#   bench/run.sh --conns 50 --rounds 3 --duration 5 --extra-gw "gateway-discovered=bench/gateway-discovered.sh"
#
# lbbench exports LBBENCH_PORT and LBBENCH_BACKENDS; the admin listener takes the port
# after LBBENCH_PORT + 1000 (ADMIN_PORT overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
admin=${ADMIN_PORT:-$((LBBENCH_PORT + 1000))}
dir=$(mktemp -d)
cat >"$dir/gw.yaml" <<YAML
listeners: [{address: 127.0.0.1:$LBBENCH_PORT}]
admin: {address: 127.0.0.1:$admin}
threads: 1
access_log: false
upstreams:
  bench:
    strategy: {plugin: ${GATEWAY_STRATEGY:-round-robin}}
    discovery:
      registry: {default_ttl: 1h}
YAML
(
  for _ in $(seq 100); do curl -fs "127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.05; done
  i=1
  for b in ${LBBENCH_BACKENDS//,/ }; do
    curl -fsS -X PUT "127.0.0.1:$admin/api/registry/bench/b$i" -d "{\"address\": \"$b\"}" >/dev/null
    i=$((i + 1))
  done
) &
exec "${GATEWAY_BIN:-target/release/gateway}" --config "$dir/gw.yaml" "$@"
