#!/usr/bin/env bash
# A fleet of two gateways sharing one etcd.
#
# Starts a local etcd (Debian `etcd-server`; data in a temporary directory), two gateways
# whose upstream `books` has only `discovery.etcd`, and three tiny backends
# (python3 -m http.server). Backend 1 is put into etcd by hand (as `etcdctl put` or any
# deploy tool would), backend 2 registers through gateway A's registry API with a
# `gateway register` sidecar, backend 3 through gateway B's: both gateways serve all
# three. Then etcd is stopped (both keep serving), started again, and backend 2's sidecar
# gets SIGTERM: it deregisters through A, and B follows.
#
#   cargo build --release -p gateway && examples/etcd.sh
#
# Ports: ETCD (client, 2379; peer ETCD+1), PORT (gateway A, 8080; B: PORT+1),
# ADMIN (9901; B: ADMIN+1), BASE (first backend, 8001). GATEWAY=path/to/gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
GW=${GATEWAY:-target/release/gateway}
ETCD=${ETCD:-2379}
PORT=${PORT:-8080}
ADMIN=${ADMIN:-9901}
BASE=${BASE:-8001}
command -v etcd >/dev/null || { echo "etcd is missing: apt-get install etcd-server" >&2; exit 1; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

start_etcd() {
  etcd --name demo --data-dir "$dir/etcd" --log-level warn --logger zap \
      --listen-client-urls "http://127.0.0.1:$ETCD" --advertise-client-urls "http://127.0.0.1:$ETCD" \
      --listen-peer-urls "http://127.0.0.1:$((ETCD + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD + 1))" \
      --initial-cluster "demo=http://127.0.0.1:$((ETCD + 1))" 2>>"$dir/etcd.log" &
  etcd_pid=$!
  pids+=($etcd_pid)
  for _ in $(seq 100); do curl -fs "127.0.0.1:$ETCD/health" >/dev/null && return; sleep 0.1; done
  echo "etcd did not start; its log:" >&2; cat "$dir/etcd.log" >&2; exit 1
}
# etcd's JSON gateway takes base64 keys and values (etcdctl put does the same in one line).
etcd_put() { curl -fsS "127.0.0.1:$ETCD/v3/kv/put" -d "{\"key\": \"$(printf %s "$1" | base64 -w0)\", \"value\": \"$(printf %s "$2" | base64 -w0)\"}" >/dev/null; }

start_etcd
for gw in a b; do
  i=$([ $gw = a ] && echo 0 || echo 1)
  cat > "$dir/$gw.yaml" <<YAML
listeners: [{address: 127.0.0.1:$((PORT + i))}]
admin: {address: 127.0.0.1:$((ADMIN + i))}
access_log: false
upstreams:
  books:
    health_check: {interval: 1s}        # TCP check; a new backend joins when it passes
    discovery:
      etcd: {endpoints: [http://127.0.0.1:$ETCD], prefix: /gateway/, default_ttl: 6s}
YAML
  "$GW" --config "$dir/$gw.yaml" --log-format text 2>"$dir/gateway-$gw.log" &
  pids+=($!)
done
for i in 0 1; do for _ in $(seq 50); do curl -fs "127.0.0.1:$((ADMIN + i))/healthz" >/dev/null && break; sleep 0.1; done; done

for i in 1 2 3; do
  mkdir -p "$dir/b$i" && echo "backend $i" > "$dir/b$i/index.html"
  python3 -m http.server "$((BASE + i - 1))" --bind 127.0.0.1 --directory "$dir/b$i" >/dev/null 2>&1 &
  pids+=($!)
done
etcd_put /gateway/books/books-1 "{\"address\": \"127.0.0.1:$BASE\"}"
sidecars=()
for i in 2 3; do
  admin=$((ADMIN + i - 2))   # books-2 registers through A, books-3 through B
  "$GW" register --registry "http://127.0.0.1:$admin" --upstream books --id "books-$i" \
      --address "127.0.0.1:$((BASE + i - 1))" --ttl 6s --log-format text 2>>"$dir/sidecars.log" &
  sidecars+=($!) && pids+=($!)
done

show() {
  echo "== $1"
  for i in 0 1; do
    curl -s "127.0.0.1:$((ADMIN + i))/api/upstreams" | python3 -c '
import json, sys
u = json.load(sys.stdin)["upstreams"][0]
d = u["discovery"] or {}
print("   gateway %s: etcd connected=%s revision=%s; backends %s" % (sys.argv[1], d.get("connected"), d.get("revision"),
      ", ".join("%s(%s)" % (b["id"], b["state"]) for b in u["backends"])))' "$([ $i = 0 ] && echo A || echo B)"
    printf '     answers:'; for _ in 1 2 3 4 5 6; do printf ' [%s]' "$(curl -s "127.0.0.1:$((PORT + i))/")"; done; echo
  done
}

sleep 2; show "books-1 put into etcd, books-2 registered through A, books-3 through B: both gateways serve all three"
kill "$etcd_pid"; wait "$etcd_pid" 2>/dev/null || true; sleep 1
show "etcd stopped: both keep serving the last known backends"
start_etcd; sleep 2; show "etcd started again (same data): both reconnected and resumed their watch"
kill -TERM "${sidecars[0]}"; sleep 1; show "books-2's sidecar got SIGTERM: deregistered through A (key deleted, lease revoked); B followed"
echo; echo "gateway A's log:"; grep -E "etcd|backends changed" "$dir/gateway-a.log" | sed 's/^/   /'
