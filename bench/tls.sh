#!/usr/bin/env bash
# TLS at the edge, side by side: the gateway and HAProxy (nbthread 1) each terminate TLS
# in front of the same three nginx backends on loopback, with the same certificate
# (EC P-256, made here by openssl), and the same client on the other core. Rounds are
# interleaved (haproxy, gateway, haproxy, gateway, ...) and medians reported.
#
#   bench/tls.sh                  # target/release/gateway, 3 rounds
#   ROUNDS=5 bench/tls.sh
#
# Measures, per system:
#   handshakes/s   h2load, 500 clients that each open a TLS 1.3 connection and send one
#                  request (new connection per request: the handshake dominates)
#   h2 req/s       h2load over TLS with ALPN h2: 20 connections x 10 streams
#   h1 req/s       wrk over TLS (HTTP/1.1 keep-alive), 50 connections
# Proxies on cpu1, clients and backends on cpu0. The gateway runs one worker thread with
# the access log off (HAProxy logs nothing here either); metrics on (its default).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in h2load wrk nginx haproxy openssl taskset; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool (apt-get install nghttp2-client wrk nginx haproxy openssl util-linux)" >&2
    exit 2
  }
done
GATEWAY_BIN="${GATEWAY_BIN:-target/release/gateway}"
ROUNDS="${ROUNDS:-3}"
[ -x "$GATEWAY_BIN" ] || { echo "build the gateway first: cargo build --release" >&2; exit 2; }

run="$(mktemp -d)"
pgids=()
cleanup() {
  for p in "${pgids[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
start() { # start CPU CMD... : in its own process group, pinned
  local cpu="$1"
  shift
  setsid taskset -c "$cpu" "$@" >>"$run/procs.log" 2>&1 &
  pgids+=($!)
}

# One certificate for both proxies.
openssl ecparam -name prime256v1 -genkey -noout -out "$run/ca.sec1" 2>/dev/null
openssl req -x509 -new -key "$run/ca.sec1" -sha256 -days 1 -subj "/CN=bench CA" -out "$run/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$run/leaf.sec1" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$run/leaf.sec1" -out "$run/leaf.key"
openssl req -new -key "$run/leaf.key" -subj "/CN=bench.test" -out "$run/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:bench.test,IP:127.0.0.1\n' >"$run/leaf.ext"
openssl x509 -req -in "$run/leaf.csr" -CA "$run/ca.pem" -CAkey "$run/ca.sec1" -CAcreateserial -days 1 \
  -sha256 -extfile "$run/leaf.ext" -out "$run/leaf.pem" 2>/dev/null
cat "$run/leaf.pem" "$run/leaf.key" >"$run/haproxy.pem"

source bench/nginx-backends.sh
nginx_backends_conf "$run" 19401 19402 19403 >/dev/null
start 0 nginx -p "$run" -c "$run/backends.conf"

cat >"$run/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
  tune.ssl.default-dh-param 2048
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:19411 ssl crt $run/haproxy.pem alpn h2,http/1.1
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:19401
  server b2 127.0.0.1:19402
  server b3 127.0.0.1:19403
EOF
start 1 haproxy -f "$run/haproxy.cfg"

cat >"$run/gateway.yaml" <<EOF
listeners:
  - address: 127.0.0.1:19412
    tls:
      certificates:
        - { cert: $run/leaf.pem, key: $run/leaf.key }
threads: 1
access_log: false
upstreams:
  web:
    strategy: { plugin: round-robin }
    backends:
      - { address: 127.0.0.1:19401 }
      - { address: 127.0.0.1:19402 }
      - { address: 127.0.0.1:19403 }
EOF
start 1 "$GATEWAY_BIN" --config "$run/gateway.yaml"

declare -A PORT=([haproxy]=19411 [gateway]=19412)
for s in haproxy gateway; do
  for _ in $(seq 1 100); do
    curl -fsk --resolve "bench.test:${PORT[$s]}:127.0.0.1" "https://bench.test:${PORT[$s]}/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsk --resolve "bench.test:${PORT[$s]}:127.0.0.1" "https://bench.test:${PORT[$s]}/" >/dev/null ||
    { echo "$s does not answer on ${PORT[$s]}; see $run/procs.log" >&2; cat "$run/procs.log" >&2; exit 1; }
done

h2load_rate() { # prints req/s from h2load's "finished in ..., N req/s" line; fails on errors
  local out
  out="$(taskset -c 0 h2load "$@" 2>&1)"
  grep -q ' 0 failed, 0 errored' <<<"$out" || { echo "h2load failed: $out" >&2; return 1; }
  awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) == "req/s,") { print $i; exit } }' <<<"$out"
}
wrk_rate() {
  taskset -c 0 wrk -t1 -c50 -d"${1}s" "$2" 2>&1 | awk '/^Requests\/sec/ {print $2}'
}

declare -A HS H2 H1
for round in $(seq 1 "$ROUNDS"); do
  for s in haproxy gateway; do
    # By IP (the certificate names 127.0.0.1 too): the default certificate serves it.
    ip_url="https://127.0.0.1:${PORT[$s]}/"
    hs="$(h2load_rate -n 500 -c 500 -t 1 "$ip_url")"
    h2="$(h2load_rate -n 100000 -c 20 -m 10 -t 1 "$ip_url")"
    h1="$(wrk_rate 8 "$ip_url")"
    HS[$s]+="$hs "
    H2[$s]+="$h2 "
    H1[$s]+="$h1 "
    printf 'round %d %-8s handshakes/s %8.0f  h2 req/s %8.0f  h1 req/s %8.0f\n' "$round" "$s" "$hs" "$h2" "$h1"
  done
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
printf '%-10s %14s %12s %12s\n' system handshakes/s "h2 req/s" "h1 req/s"
for s in haproxy gateway; do
  printf '%-10s %14.0f %12.0f %12.0f\n' "$s" "$(median "${HS[$s]}")" "$(median "${H2[$s]}")" "$(median "${H1[$s]}")"
done
awk -v a="$(median "${HS[gateway]}")" -v b="$(median "${HS[haproxy]}")" \
  -v c="$(median "${H2[gateway]}")" -v d="$(median "${H2[haproxy]}")" \
  -v e="$(median "${H1[gateway]}")" -v f="$(median "${H1[haproxy]}")" \
  'BEGIN { printf "%-10s %13.2fx %11.2fx %11.2fx\n", "gw/haproxy", a / b, c / d, e / f }'
