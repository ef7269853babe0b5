#!/usr/bin/env bash
# The demo on a fresh machine: what the build needs, then `gateway demo`.
#
#   scripts/demo.sh            # arguments are passed to `gateway demo` (see --help)
#
# Needs rustup. Installs the wasm32-unknown-unknown target (the built-in plugins are
# compiled to WebAssembly by the build) and, when `protoc` is missing, Debian's
# protobuf-compiler (the etcd client generates its gRPC code with it at build time):
# with apt-get, through sudo unless run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v rustup >/dev/null || {
  echo "scripts/demo.sh: rustup is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
}
rustup target add wasm32-unknown-unknown >/dev/null

if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "scripts/demo.sh: protoc is missing and this is not a Debian/Ubuntu system:" \
      "install the Protocol Buffers compiler (package protobuf-compiler, or PROTOC=/path/to/protoc) and run this again" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || {
      echo "scripts/demo.sh: protoc is missing: run 'apt-get install protobuf-compiler' as root, then this again" >&2
      exit 1
    }
    sudo="sudo"
  fi
  echo "scripts/demo.sh: installing protobuf-compiler (protoc, needed to build the etcd client) with ${sudo:+sudo }apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq protobuf-compiler >/dev/null
fi

exec cargo run --release -p gateway -- demo "$@"
