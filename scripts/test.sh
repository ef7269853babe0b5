#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what the tests need,
# then checks formatting and lints and runs every test (unit, plugin, integration).
#
#   scripts/test.sh            # everything
#   SKIP_LINT=1 scripts/test.sh  # tests only
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
started=$SECONDS

step "Rust targets for plugins"
rustup target add wasm32-unknown-unknown >/dev/null

if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
fi

# One target dir and one profile (release) for everything: wasmtime is built once.
step "build (release)"
cargo build --release --workspace --all-targets

if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo clippy"
  cargo clippy --release --workspace --all-targets -- -D warnings
fi

step "tests"
cargo test --release --workspace --no-fail-fast

printf '\n\033[1mAll checks passed in %ss.\033[0m\n' "$((SECONDS - started))"
