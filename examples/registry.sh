#!/usr/bin/env bash
# Backends joining and leaving a gateway through its embedded registry.
#
# Starts a gateway whose upstream `books` has no static backends, only
# `discovery.registry`; then three tiny backends (python3 -m http.server), each with a
# `gateway register` sidecar. Watch them join, then one leave cleanly (SIGTERM to its
# sidecar: deregistered at once) and one vanish (SIGKILL: removed when its TTL passes).
#
#   cargo build --release -p gateway && examples/registry.sh
#
# Ports: PORT (gateway, 8080), ADMIN (9901), BASE (first backend, 8001: BASE..BASE+2).
# GATEWAY=path/to/gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
GW=${GATEWAY:-target/release/gateway}
PORT=${PORT:-8080}
ADMIN=${ADMIN:-9901}
BASE=${BASE:-8001}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

cat > "$dir/gw.yaml" <<YAML
listeners: [{address: 127.0.0.1:$PORT}]
admin: {address: 127.0.0.1:$ADMIN}
access_log: false
upstreams:
  books:
    health_check: {interval: 1s}        # TCP check; a new backend joins when it passes
    discovery:
      registry: {default_ttl: 6s}
YAML
"$GW" --config "$dir/gw.yaml" --log-format text 2>"$dir/gateway.log" &
pids+=($!)
for _ in $(seq 50); do curl -fs "127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.1; done

sidecars=()
for i in 1 2 3; do
  mkdir -p "$dir/b$i" && echo "backend $i" > "$dir/b$i/index.html"
  port=$((BASE + i - 1))
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$dir/b$i" >/dev/null 2>&1 &
  pids+=($!)
  "$GW" register --registry "http://127.0.0.1:$ADMIN" --upstream books --id "books-$i" \
      --address "127.0.0.1:$port" --ttl 6s --log-format text 2>>"$dir/sidecars.log" &
  sidecars+=($!) && pids+=($!)
done

show() {
  echo "== $1"
  curl -s "127.0.0.1:$ADMIN/api/upstreams" | python3 -c '
import json, sys
for b in json.load(sys.stdin)["upstreams"][0]["backends"]:
    print("   %-8s %-16s %-9s %s" % (b["id"], b["address"], b["source"], b["state"]))'
  printf '   answers:'; for _ in 1 2 3 4 5 6; do printf ' [%s]' "$(curl -s "127.0.0.1:$PORT/")"; done; echo
}

sleep 2; show "three backends registered themselves"
kill -TERM "${sidecars[2]}"; sleep 1; show "books-3's sidecar got SIGTERM: deregistered at once"
kill -KILL "${sidecars[1]}"; wait "${sidecars[1]}" 2>/dev/null || true; sleep 1; show "books-2's sidecar was killed: still registered until its TTL (6s) passes"
sleep 7; show "books-2's TTL passed without a heartbeat: removed"
echo; echo "the gateway's log:"; grep -E "registered|deregistered|expired|backend" "$dir/gateway.log" | sed 's/^/   /'
