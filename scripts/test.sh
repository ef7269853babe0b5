#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what the tests need,
# then checks formatting and lints and runs every test (unit, plugin, integration).
#
#   scripts/test.sh            # everything
#   SKIP_LINT=1 scripts/test.sh  # tests only
set -euo pipefail
cd "$(dirname "$0")/.."

# This script installs every tool the tests start (Chromium, Prometheus, dnsmasq, grpcio, ...),
# so a test that finds one missing fails instead of skipping (the tests skip only outside CI).
export CI="${CI:-1}"

started=$SECONDS
# Each step says when it starts (seconds since the script began), so a slow run shows where.
step() { printf '\n\033[1m==> [%ss] %s\033[0m\n' "$((SECONDS - started))" "$*"; }

step "Rust targets for plugins"
# wasm32-unknown-unknown: the built-in plugins; wasm32-wasip2: the Rust guest example and
# `gateway plugin new --lang rust` projects.
rustup target add wasm32-unknown-unknown wasm32-wasip2 >/dev/null

# The guest-language toolchains run on Python 3 (with venv) and Node.js 18+ with npm;
# gateway/tests/stats_page.rs drives a real headless Chromium (under CI it fails without one);
# gateway/tests/observability.rs runs a real Prometheus against the gateway (same rule).
step "system packages (guest-language toolchains, Chromium, Prometheus, curl, openssl, h2load, dnsmasq, protoc, etcd)"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' 2>/dev/null; then
  missing+=(nodejs)
fi
command -v npm >/dev/null || missing+=(npm)
command -v prometheus >/dev/null || missing+=(prometheus)
# Real TLS and HTTP/2 clients (tests/tls.rs, limits.rs); test certificates (tests/util/certs.rs).
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v h2load >/dev/null || missing+=(nghttp2-client)
# gateway/tests/reliability.rs starts the gateway under a low open-file limit.
command -v prlimit >/dev/null || missing+=(util-linux)
# A real DNS server for gateway/tests/discovery_dns.rs (started by the test on a high
# loopback port). dnsmasq-base is the binary without the system service that the
# `dnsmasq` package would start on port 53.
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
# The gateway's etcd client generates its gRPC code at build time with protoc; a real etcd
# (3.4, /usr/bin/etcd) for gateway/tests/discovery_etcd.rs, started by the test on loopback
# ports with its data in a temporary directory.
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  command -v apt-get >/dev/null || {
    echo "missing: ${missing[*]}; install them (Python 3 with venv, Node.js 18+ and npm, Chromium, Prometheus, curl, openssl, nghttp2-client, dnsmasq, protobuf-compiler, etcd-server) and run again" >&2
    exit 1
  }
  echo "installing ${missing[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "python $(python3 --version | cut -d' ' -f2), node $(node --version), npm $(npm --version), $(chromium --version 2>/dev/null)," \
  "prometheus $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3)"

# Lints run in the background from here on, in a target dir of their own (a lint build
# compiles every dependency again, in check mode): they overlap the downloads and the
# single-threaded guest-plugin builds below instead of adding to them. Waited for at the end.
clippy_pid=""
if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy (in the background, target/clippy; its output is shown at the end)"
  # On a fresh clone target/ does not exist yet, and the redirection below needs it.
  mkdir -p target/clippy
  CARGO_TARGET_DIR=target/clippy cargo clippy --quiet --profile ci --workspace --all-targets -- -D warnings \
    >target/clippy/lint.log 2>&1 &
  clippy_pid=$!
fi

# gateway/tests/grpc.rs drives real gRPC servers and clients (Python grpcio, pinned) and
# gateway/tests/rapid_reset.rs a raw HTTP/2 client (Python h2), from a venv cached in
# ~/.cache/gateway-test-venv (under CI those tests fail without it).
step "test venv (grpcio, h2)"
GRPCIO_VERSION=1.85.3
H2_VERSION=4.3.0
venv="$HOME/.cache/gateway-test-venv"
if ! "$venv/bin/python" -c "import grpc, h2, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION' or h2.__version__ != '$H2_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio==$GRPCIO_VERSION" "h2==$H2_VERSION"
fi
echo "grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)'), h2 $("$venv/bin/python" -c 'import h2; print(h2.__version__)')"

# Pinned componentize-py / componentize-js (cached in ~/.cache/gateway-guest-tools), then
# the Python, JavaScript and Rust guest plugins into target/guest-plugins/, which
# gateway/tests/languages.rs and gateway/benches/languages.rs use (C plugins are made with
# the gateway, after the build). Mostly single-threaded: it overlaps the lints.
step "guest-language plugins: Python, JavaScript, Rust (scripts/build-guest-plugins.sh)"
scripts/build-guest-plugins.sh --lang python --lang js --lang rust

# One target dir and one profile for everything, so wasmtime is built once: `ci` is
# release optimisation without debug info and with the gateway crate in 16 codegen units
# (Cargo.toml says why); benchmarks and the demo use `--release`. Built once for every
# target: a `-p gateway` build alone would unify features differently and build the
# gateway crate twice.
step "build (profile ci)"
# What the tests run (libraries, binaries, tests, examples); benchmarks are only
# type-checked, by clippy --all-targets.
cargo test --profile ci --workspace --no-run

# C plugins: zig (the pinned `ziglang` wheel, cached like the others) and the gateway
# just built (`plugin new --lang c` bindings, `plugin componentize`).
step "guest-language plugins: C (scripts/build-guest-plugins.sh --lang c)"
GATEWAY="${CARGO_TARGET_DIR:-target}/ci/gateway" scripts/build-guest-plugins.sh --lang c

# The example plugins' own unit tests, natively (no Wasm): plain CPython and Node.
step "example plugins' native unit tests (Python, JavaScript)"
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s examples/plugins/python-path-router
node --test examples/plugins/js-least-latency/



if [ -n "$clippy_pid" ]; then
  step "cargo clippy (waiting for the background run)"
  if ! wait "$clippy_pid"; then
    cat target/clippy/lint.log
    echo "cargo clippy found problems (above)" >&2
    exit 1
  fi
  cat target/clippy/lint.log
fi

step "tests"
cargo test --profile ci --workspace --no-fail-fast

printf '\n\033[1mAll checks passed in %ss.\033[0m\n' "$((SECONDS - started))"
