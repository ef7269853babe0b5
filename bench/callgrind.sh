#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: repeatable where
# wall-clock benchmarks on a shared 2-core VM scatter by ±20%. Each gateway binary/flag
# set runs under valgrind with one worker thread in front of three nginx backends on
# loopback; after a warm-up the counters are zeroed, wrk sends keep-alive load for a
# while, and the instructions of that window are divided by the requests wrk completed.
#
#   bench/callgrind.sh                                   # target/release/gateway, defaults
#   bench/callgrind.sh "old=/tmp/gw-old --no-access-log" "new=target/release/gateway --no-access-log"
#
# Each argument is NAME=BINARY [FLAGS...]. Prints one line per variant:
#   NAME  instructions/request  requests
# KEEP=1 keeps the callgrind dumps (for callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_control nginx wrk; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install valgrind nginx wrk)" >&2; exit 2; }
done
[ $# -gt 0 ] || set -- "default=target/release/gateway"

run="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "dumps kept in $run" >&2; else rm -rf "$run"; fi
}
trap cleanup EXIT

# Three nginx backends answering a short body, keep-alive on.
source bench/nginx-backends.sh
nginx_backends_conf "$run" 19301 19302 19303 >/dev/null
nginx -p "$run" -c "$run/backends.conf" &
pids+=($!)
sleep 0.5

port=19310
for variant in "$@"; do
  name="${variant%%=*}"
  read -r -a cmd <<<"${variant#*=}"
  port=$((port + 1))
  valgrind --tool=callgrind --callgrind-out-file="$run/$name.%p.out" --dump-instr=no \
    "${cmd[0]}" --listen "127.0.0.1:$port" --threads 1 --log-format json \
    -b 127.0.0.1:19301 -b 127.0.0.1:19302 -b 127.0.0.1:19303 "${cmd[@]:1}" \
    >"$run/$name.stdout" 2>"$run/$name.stderr" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  wrk -t1 -c50 -d3s "http://127.0.0.1:$port/" >/dev/null 2>&1   # warm-up
  callgrind_control -z "$pid" >/dev/null 2>&1
  out="$(wrk -t1 -c50 -d10s "http://127.0.0.1:$port/" 2>&1)"
  callgrind_control -d "$pid" >/dev/null 2>&1
  requests="$(awk '/requests in/ {print $1}' <<<"$out")"
  # The dump just taken (after the zeroing): the newest part file.
  dump="$(ls -t "$run/$name".*.out.* | head -1)"
  ir="$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  awk -v n="$name" -v ir="$ir" -v r="$requests" \
    'BEGIN { printf "%-24s %8.0f instructions/request  (%d requests)\n", n, ir / r, r }'
done
