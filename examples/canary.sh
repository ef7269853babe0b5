#!/usr/bin/env bash
# A new strategy from recorded traffic to a shadow, a canary and a promotion, on one
# machine: the walk-through is examples/canary.md.
#
# Three tiny backends (python3 -m http.server) behind a gateway whose upstream `books`
# uses round-robin. A user is the `user` query parameter. The plan: move `books` to
# consistent-hash by user (each user's requests land on one backend, where their data is
# cached), without surprising anyone.
#
#   1. record traffic in the JSON access log;
#   2. replay it through consistent-hash (stickiness, churn, what a lost backend moves);
#   3. run consistent-hash as a shadow on half of the live requests: agreement and where
#      it would send them, with no effect on any request;
#   4. run it as a canary for 20% of the users: their requests, its 5xx ratio against live;
#   5. promote it through the admin API, then write the file to match.
#
#   cargo build --release -p gateway && examples/canary.sh
#
# Ports: PORT (gateway, 8080), ADMIN (9901), BASE (first backend, 8001).
# GATEWAY=path/to/gateway. Needs python3 and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
GW=${GATEWAY:-target/release/gateway}
PORT=${PORT:-8080}
ADMIN=${ADMIN:-9901}
BASE=${BASE:-8001}
[ -x "$GW" ] || { echo "no gateway binary at $GW: cargo build --release -p gateway (or GATEWAY=path)" >&2; exit 1; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Three backends, each answering with its name.
for i in 1 2 3; do
  mkdir -p "$dir/b$i"
  echo "b$i" > "$dir/b$i/index.html"
  python3 -m http.server "$((BASE + i - 1))" --bind 127.0.0.1 --directory "$dir/b$i" >/dev/null 2>&1 &
  pids+=($!)
done
backends="      - {address: 127.0.0.1:$BASE, id: b1}
      - {address: 127.0.0.1:$((BASE + 1)), id: b2}
      - {address: 127.0.0.1:$((BASE + 2)), id: b3}"
# The config file, with what the upstream gets besides its backends.
write_config() {
  cat > "$dir/gw.yaml.new" <<YAML
listeners: [{address: 127.0.0.1:$PORT}]
admin: {address: 127.0.0.1:$ADMIN}
access_log: {path: $dir/access.log, format: json}
upstreams:
  books:
    health_check: {interval: 1s}
$1
    backends:
$backends
YAML
  mv "$dir/gw.yaml.new" "$dir/gw.yaml"   # one rename: the watcher never reads half a file
}
wait_version() {
  for _ in $(seq 100); do
    [ "$(curl -fs "127.0.0.1:$ADMIN/api/config" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')" = "$1" ] && return
    sleep 0.1
  done
  echo "the gateway did not reload to version $1" >&2; curl -s "127.0.0.1:$ADMIN/api/config" >&2; exit 1
}
# N requests from 60 users, in a loop of python3 (fast enough, no extra tools).
traffic() {
  python3 - "$PORT" "$1" <<'PY'
import sys, urllib.request
port, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    urllib.request.urlopen(f"http://127.0.0.1:{port}/?user=u{i % 60}").read()
PY
}
api() { curl -fsS "127.0.0.1:$ADMIN/api/upstreams"; }
# Prints a part of /api/upstreams for the `books` upstream (argument: shadow or canary).
cat > "$dir/show.py" <<'PY'
import json, sys
up = json.load(sys.stdin)["upstreams"][0]
part = sys.argv[1]
x = up[part]
if part == "shadow":
    print(f"shadow {x['plugin']} on {x['sample']:.0%} of requests: {x['sampled']} asked, "
          f"agreement {x['agreement']:.1%} ({x['agreed']} agreed, {x['disagreed']} disagreed, {x['failed']} failed)")
    lt = sum(b["live"] for b in x["backends"]) or 1
    st = sum(b["shadow"] for b in x["backends"]) or 1
    for b in x["backends"]:
        print(f"  {b['id']}: live sent {b['live'] / lt:6.1%}, the shadow would send {b['shadow'] / st:6.1%}")
else:
    for arm in ("live", "canary"):
        a = x[arm]
        r = a["error_ratio"]
        print(f"  {arm:6}: {a['responses']} responses, 5xx ratio {'-' if r is None else f'{r:.2%}'}")
PY
show() { api | python3 "$dir/show.py" "$1"; }

for i in 1 2 3; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:$((BASE + i - 1))/" >/dev/null && break; sleep 0.1; done
done
write_config "    strategy: {plugin: round-robin}"
"$GW" --config "$dir/gw.yaml" --plugins "$dir/plugins" --log-format text 2>"$dir/gateway.log" &
pids+=($!)
for _ in $(seq 100); do curl -fs "127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.1; done

say "1. Recording traffic: 600 requests from 60 users, round-robin (the JSON access log)"
traffic 600
sleep 0.3   # the access log is written every 100 ms
echo "$(wc -l < "$dir/access.log") lines in the access log; the first:"
head -1 "$dir/access.log"

say "2. Replaying it through consistent-hash (by user), against round-robin, without b2"
cat > "$dir/pool.yaml" <<YAML
$backends
YAML
"$GW" replay --strategy consistent-hash --params '{"key": "query:user"}' --pool "$dir/pool.yaml" \
    --requests "$dir/access.log" --key query:user --compare round-robin --remove b2

say "3. consistent-hash as a shadow on half of the requests (the file changes, the gateway reloads)"
write_config '    strategy: {plugin: round-robin}
    shadow: {plugin: consistent-hash, params: {key: "query:user"}, sample: 0.5}'
wait_version 2
traffic 600
sleep 0.2
show shadow
echo "(a round robin and a hash by user seldom agree: moving to the hash would send most requests elsewhere, as the replay's churn said)"

say "4. consistent-hash as a canary for 20% of the users"
write_config '    strategy: {plugin: round-robin}
    canary: {plugin: consistent-hash, params: {key: "query:user"}, share: 0.2, key: "query:user"}'
wait_version 3
traffic 600
show canary
for u in u1 u2 u3 u4 u5 u6; do
  printf '  user %s: %s\n' "$u" "$(curl -fsS -o /dev/null -D - -H 'X-Gateway-Debug: 1' "127.0.0.1:$PORT/?user=$u" | tr -d '\r' | sed -n 's/^x-gateway-decision: //Ip')"
done

say "5. Promoting the canary through the admin API"
curl -fsS -X POST "127.0.0.1:$ADMIN/api/upstreams/books/canary/promote"
echo
api | python3 -c 'import json,sys; up=json.load(sys.stdin)["upstreams"][0]; print("strategy now:", up["strategy"], json.dumps(up["chain"][0]["params"]), "| canary:", up["canary"])'
echo "... and the file, so that the next reload keeps it:"
write_config '    strategy: {plugin: consistent-hash, params: {key: "query:user"}}'
wait_version 5
grep -E "canary promoted|config reloaded" "$dir/gateway.log" | sed 's/^/  /'
api | python3 -c 'import json,sys; up=json.load(sys.stdin)["upstreams"][0]; print("strategy:", up["strategy"], "| canary:", up["canary"])'
say "Done: books is on consistent-hash, and no request failed on the way ($(grep -c '"status":5' "$dir/access.log" || true) 5xx in the access log)."
