#!/usr/bin/env bash
# Builds the guest-language plugins (examples/plugins/{python,js,rust,c}-* and the test
# plugins gateway/tests/guest-plugins/{python,js,c}-*) into target/guest-plugins/<name>.wasm,
# with pinned tools installed once into a cache. scripts/test.sh runs it before the tests
# (gateway/tests/languages.rs and gateway/benches/languages.rs use its output).
#
#   scripts/build-guest-plugins.sh                # every plugin
#   scripts/build-guest-plugins.sh js-least-latency python-path-router
#   scripts/build-guest-plugins.sh --lang c       # only these languages (repeatable)
#   scripts/build-guest-plugins.sh --tools-only   # only install/check the tools
#
# It also writes target/guest-plugins/tools.env: where the tools are (COMPONENTIZE_PY,
# NODE_MODULES, ZIG_VENV), for tests that build `gateway plugin new` projects.
#
# Environment:
#   GUEST_TOOLS_DIR  tool cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/gateway-guest-tools)
#   JS_ENGINE        starlingmonkey (default: componentize-js, 12 MB components) or
#                    quickjs (componentize-qjs: 1.6 MB and much faster to build, but with
#                    componentize-qjs 0.4.5 every `pick` traps on this WIT's
#                    `borrow<request>`; see examples/plugins/MEASUREMENTS.md)
#   GUEST_OUT_DIR    where the components go (default target/guest-plugins)
#   FORCE=1          rebuild Python/JS components even when their inputs did not change
#
#   GATEWAY          the gateway binary C plugins are made with (`plugin new --lang c` for
#                    the bindings, `plugin componentize`); default: built with cargo
#                    (profile ci) when a C plugin is asked for
#
# Pinned versions: componentize-py in scripts/guest-tools/python/requirements.txt; zig
# (the `ziglang` wheel, for C) in scripts/guest-tools/c/requirements.txt; the
# npm tools in scripts/guest-tools/{quickjs,starlingmonkey}/package-lock.json;
# Rust crates in each crate's Cargo.lock (built for wasm32-wasip2, which writes a
# component directly). Nothing is downloaded but from PyPI, npm and crates.io.
# Re-running is cheap: tools already installed at the pinned version are kept, and a
# Python/JS component whose inputs did not change is not rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_SRC="$ROOT/scripts/guest-tools"
CACHE="${GUEST_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-guest-tools}"
OUT="${GUEST_OUT_DIR:-$ROOT/target/guest-plugins}"
JS_ENGINE="${JS_ENGINE:-starlingmonkey}"
WIT="$ROOT/wit"
WORLD="selector"
# A component straight from rustc/wasm-component-ld. It imports WASI interfaces the
# plugin never calls; the gateway links them as traps.
RUST_TARGET="wasm32-wasip2"
RUST_TARGET_DIR="$ROOT/target/guest-build"

# Where plugins are found, by folder name.
SOURCES=("$ROOT/examples/plugins" "$ROOT/gateway/tests/guest-plugins")

COMPONENTIZE_PY_VERSION="$(sed -n 's/^componentize-py==//p' "$TOOLS_SRC/python/requirements.txt")"
ZIGLANG_VERSION="$(sed -n 's/^ziglang==//p' "$TOOLS_SRC/c/requirements.txt")"

# ---------------------------------------------------------------------------------------
say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf '\nerror: %s\n' "$1" >&2
    shift
    for hint in "$@"; do printf '  hint: %s\n' "$hint" >&2; done
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; $2" "$3"; }
sha() { sha256sum | cut -c1-64; }
# Hash of the files under the given paths (names and contents), skipping build output.
tree_hash() {
    find "$@" -type f -not -path '*/node_modules/*' -not -path '*/__pycache__/*' -not -path '*/target/*' \
        -not -name '*.wasm' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha
}

# ---------------------------------------------------------------------------------------
# Tools

PY_VENV="$CACHE/python-venv"
COMPONENTIZE_PY="$PY_VENV/bin/componentize-py"

tools_python() {
    local want="componentize-py $COMPONENTIZE_PY_VERSION" have="" t
    [ -x "$COMPONENTIZE_PY" ] && have="$("$COMPONENTIZE_PY" --version 2>/dev/null || true)"
    if [ "$have" = "$want" ]; then
        say "python tools: $want already in $PY_VENV"
        return
    fi
    need python3 "componentize-py is installed with pip into a venv." "apt-get install python3 python3-venv"
    t=$(now)
    say "python tools: installing $want into $PY_VENV"
    if [ ! -x "$PY_VENV/bin/pip" ]; then
        rm -rf "$PY_VENV"
        python3 -m venv "$PY_VENV" ||
            die "could not create a Python venv in $PY_VENV" "apt-get install python3-venv (Debian/Ubuntu)" \
                "or point GUEST_TOOLS_DIR at a writable folder"
    fi
    "$PY_VENV/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -r "$TOOLS_SRC/python/requirements.txt" ||
        die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION" \
            "check that PyPI is reachable (pip config list shows the index in use)"
    have="$("$COMPONENTIZE_PY" --version)"
    [ "$have" = "$want" ] || die "installed '$have' but wanted '$want'" "remove $PY_VENV and run again"
    say "python tools: done ($(elapsed "$t"))"
}

# C: zig's compiler from the `ziglang` wheel (it carries its own wasi-libc), in a venv.
ZIG_VENV="$CACHE/zig-venv"
# zig keeps the C library it builds for wasm32-wasi here (a minute the first time).
export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$CACHE/zig-cache}"

tools_c() {
    local have="" t
    have="$("$ZIG_VENV/bin/python" -m ziglang version 2>/dev/null || true)"
    if [ "$have" = "$ZIGLANG_VERSION" ]; then
        say "c tools: zig $have already in $ZIG_VENV"
        return
    fi
    need python3 "zig (the ziglang wheel) is installed with pip into a venv." "apt-get install python3 python3-venv"
    t=$(now)
    say "c tools: installing zig $ZIGLANG_VERSION (the ziglang wheel, ~50 MB) into $ZIG_VENV"
    rm -rf "$ZIG_VENV"
    python3 -m venv "$ZIG_VENV" || die "could not create a Python venv in $ZIG_VENV" "apt-get install python3-venv"
    "$ZIG_VENV/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$TOOLS_SRC/c/requirements.txt" ||
        die "pip could not install ziglang==$ZIGLANG_VERSION" "check that PyPI is reachable"
    say "c tools: done ($(elapsed "$t"))"
}

# The gateway binary that makes C plugins (bindings and componentize).
gateway_bin() {
    if [ -n "${GATEWAY:-}" ]; then
        command -v "$GATEWAY" >/dev/null || die "GATEWAY=$GATEWAY is not a program"
        realpath "$(command -v "$GATEWAY")"
        return
    fi
    say "c tools: building the gateway (cargo build --profile ci -p gateway) for its C bindings and componentize" >&2
    (cd "$ROOT" && cargo build --quiet --profile ci -p gateway) || die "cargo build of the gateway failed (see above)"
    echo "${CARGO_TARGET_DIR:-$ROOT/target}/ci/gateway"
}

# npm tools: scripts/guest-tools/<set>/package{,-lock}.json installed with npm into
# $CACHE/npm-<set>; a stamp holding the lock file's hash says it is current.
tools_npm() {
    local set="$1" bin="$2" dir="$CACHE/npm-$1" lock_hash t
    lock_hash="$(sha <"$TOOLS_SRC/$set/package-lock.json")"
    if [ -x "$dir/node_modules/.bin/$bin" ] && [ "$(cat "$dir/.lock-sha256" 2>/dev/null)" = "$lock_hash" ]; then
        say "js tools ($set): pinned versions already in $dir"
        return
    fi
    need node "the JavaScript guest tools run on Node.js (18 or later)." "apt-get install nodejs npm"
    need npm "the JavaScript guest tools are installed with npm." "apt-get install npm"
    t=$(now)
    say "js tools ($set): npm install (locked versions) into $dir"
    mkdir -p "$dir"
    cp "$TOOLS_SRC/$set/package.json" "$TOOLS_SRC/$set/package-lock.json" "$dir/"
    rm -f "$dir/.lock-sha256"
    # `npm install` with the lock file in place installs the locked versions. (Not
    # `npm ci`: it refuses a lock that lacks optional per-platform packages which the
    # registry does not have, e.g. componentize-qjs 0.4.5's win32 bindings.)
    (cd "$dir" && npm install --no-audit --no-fund --loglevel=error && npm ls --depth=0 >/dev/null) ||
        die "npm install failed in $dir" "check that the npm registry is reachable (npm config get registry)" \
            "or remove $dir and run again"
    [ -x "$dir/node_modules/.bin/$bin" ] || die "npm installed no '$bin' in $dir/node_modules/.bin" \
        "your platform may lack a prebuilt binding (componentize-qjs ships linux/macos/windows x64+arm64)"
    echo "$lock_hash" >"$dir/.lock-sha256"
    say "js tools ($set): done ($(elapsed "$t"))"
}

need_rust_target() {
    rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET" ||
        die "the Rust target $RUST_TARGET is not installed" "rustup target add $RUST_TARGET"
}

# Lists a component's imports; a Python/JS plugin must import only the gateway's
# interfaces (no WASI). A Rust plugin built for wasm32-wasip2 imports WASI interfaces it
# never calls, which the gateway links as traps: listed, not refused.
check_imports() {
    local file="$1" kind="$2" imports bad
    imports="$(python3 "$TOOLS_SRC/component-imports.py" "$file")" || die "could not read the imports of $file"
    bad="$(grep -v '^gateway:selector/' <<<"$imports" || true)"
    if [ "$kind" = rust ]; then
        say "${file##*/}: imports $(grep '^gateway:' <<<"$imports" | paste -sd' ') and $(grep -c . <<<"$bad" || true) WASI interfaces (linked as traps)"
        return
    fi
    [ -z "$bad" ] || die "$file imports more than the gateway provides: $(tr '\n' ' ' <<<"$bad")" \
        "Python: build with --stub-wasi; JS: disable every WASI feature (-d ...) or use --stub-wasi"
    say "${file##*/}: imports $(paste -sd' ' <<<"$imports") (no WASI)"
}

# The folder of plugin NAME, or nothing.
source_dir() {
    local src
    for src in "${SOURCES[@]}"; do
        [ -d "$src/$1" ] && { echo "$src/$1"; return; }
    done
}

case "$JS_ENGINE" in
    quickjs | qjs) JS_ENGINE=quickjs JS_SET=quickjs JS_BIN=componentize-qjs ;;
    starlingmonkey | sm) JS_ENGINE=starlingmonkey JS_SET=starlingmonkey JS_BIN=componentize-js ;;
    *) die "JS_ENGINE must be quickjs or starlingmonkey, not '$JS_ENGINE'" ;;
esac

# ---------------------------------------------------------------------------------------
# Builds

# Skips a Python/JS build whose inputs (sources, WIT, tool version) are unchanged.
up_to_date() {
    local name="$1" key="$2"
    [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/$name.wasm" ] && [ "$(cat "$OUT/.$name.inputs" 2>/dev/null)" = "$key" ]
}

build_python() {
    local name="$1" dir="$2" key
    [ -f "$dir/app.py" ] || die "$dir has no app.py" "a Python plugin's module is app.py, with a class Policy"
    key="$( (echo "$COMPONENTIZE_PY_VERSION"; tree_hash "$dir" "$WIT") | sha)"
    if up_to_date "$name" "$key"; then
        say "$name: up to date ($OUT/$name.wasm)"
        return
    fi
    # componentize-py runs app.py at build time (then snapshots it): keep it clean.
    PYTHONDONTWRITEBYTECODE=1 "$COMPONENTIZE_PY" -d "$WIT" -w "$WORLD" componentize --stub-wasi \
        -p "$dir" app -o "$OUT/$name.wasm.tmp" >/dev/null ||
        die "componentize-py failed for $dir (see above)"
    mv "$OUT/$name.wasm.tmp" "$OUT/$name.wasm"
    echo "$key" >"$OUT/.$name.inputs"
}

build_js() {
    local name="$1" dir="$2" bin="$CACHE/npm-$JS_SET/node_modules/.bin/$JS_BIN" key
    [ -f "$dir/plugin.js" ] || die "$dir has no plugin.js" "a JS plugin's entry is plugin.js, exporting \`policy\`"
    key="$( (sha <"$TOOLS_SRC/$JS_SET/package-lock.json"; echo "$JS_ENGINE"; tree_hash "$dir" "$WIT") | sha)"
    if up_to_date "$name" "$key"; then
        say "$name: up to date ($OUT/$name.wasm, $JS_ENGINE)"
        return
    fi
    if [ "$JS_ENGINE" = quickjs ]; then
        # --sync: no component-model async ABI; --stub-wasi: no WASI imports at all.
        "$bin" -w "$WIT" -n "$WORLD" -j "$dir/plugin.js" --sync --stub-wasi -o "$OUT/$name.wasm.tmp" >/dev/null ||
            die "componentize-qjs failed for $dir (see above)"
    else
        # -d ...: disable every WASI feature, so the component imports none.
        "$bin" "$dir/plugin.js" -w "$WIT" -n "$WORLD" -d stdio random clocks http fetch-event \
            -o "$OUT/$name.wasm.tmp" >/dev/null || die "componentize-js failed for $dir (see above)"
    fi
    mv "$OUT/$name.wasm.tmp" "$OUT/$name.wasm"
    echo "$key" >"$OUT/.$name.inputs"
}

build_rust() {
    local name="$1" dir="$2" crate
    crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)"
    [ -n "$crate" ] || die "$dir/Cargo.toml has no package name"
    # cargo keeps its own incremental state, so this is quick when nothing changed.
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR \
        cargo build --quiet --release --manifest-path "$dir/Cargo.toml" --target "$RUST_TARGET" \
        --target-dir "$RUST_TARGET_DIR" || die "cargo build failed for $dir (see above)"
    cp "$RUST_TARGET_DIR/$RUST_TARGET/release/${crate//-/_}.wasm" "$OUT/$name.wasm.tmp"
    mv "$OUT/$name.wasm.tmp" "$OUT/$name.wasm"
}

build_c() {
    local name="$1" dir="$2" key project
    [ -f "$dir/plugin.c" ] || die "$dir has no plugin.c" "a C plugin's source is plugin.c"
    key="$( (echo "$ZIGLANG_VERSION"; sha <"$GATEWAY_BIN"; tree_hash "$dir" "$WIT") | sha)"
    if up_to_date "$name" "$key"; then
        say "$name: up to date ($OUT/$name.wasm)"
        return
    fi
    # The user's way: a `gateway plugin new --lang c` project (generated bindings and
    # build.sh) with this plugin's source in it.
    project="$(mktemp -d)/$name"
    "$GATEWAY_BIN" plugin new "$name" --lang c --dir "$project" >/dev/null || die "gateway plugin new --lang c failed"
    cp "$dir/plugin.c" "$project/plugin.c"
    ln -s "$ZIG_VENV" "$project/.venv"
    GATEWAY="$GATEWAY_BIN" "$project/build.sh" >/dev/null || die "build.sh failed for $dir (see above)"
    mv "$project/$name.wasm" "$OUT/$name.wasm"
    rm -rf "$(dirname "$project")"
    echo "$key" >"$OUT/.$name.inputs"
}

# Where the tools are, for tests that build `gateway plugin new` projects.
write_tools_env() {
    local js_modules="$CACHE/npm-starlingmonkey/node_modules"
    {
        echo "# Written by scripts/build-guest-plugins.sh: the guest tools it installed."
        [ -x "$COMPONENTIZE_PY" ] && echo "COMPONENTIZE_PY=$COMPONENTIZE_PY"
        [ -x "$js_modules/.bin/componentize-js" ] && echo "NODE_MODULES=$js_modules"
        [ -x "$ZIG_VENV/bin/python" ] && echo "ZIG_VENV=$ZIG_VENV" && echo "ZIG_GLOBAL_CACHE_DIR=$ZIG_GLOBAL_CACHE_DIR"
        true
    } >"$OUT/tools.env.tmp"
    mv "$OUT/tools.env.tmp" "$OUT/tools.env"
}

# ---------------------------------------------------------------------------------------

tools_only=0
names=()
langs=()
expect_lang=0
for arg in "$@"; do
    if [ $expect_lang = 1 ]; then
        langs+=("$arg")
        expect_lang=0
        continue
    fi
    case "$arg" in
        --tools-only) tools_only=1 ;;
        --lang) expect_lang=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg" "see $0 --help" ;;
        *) names+=("${arg%/}") ;;
    esac
done

all_names() {
    local src d
    for src in "${SOURCES[@]}"; do
        for d in "$src"/python-* "$src"/js-* "$src"/rust-* "$src"/c-*; do
            [ -d "$d" ] && basename "$d"
        done
    done
}
[ $expect_lang = 0 ] || die "--lang needs a language: python, js, rust or c"
if [ ${#names[@]} -eq 0 ]; then
    mapfile -t names < <(all_names)
    [ ${#names[@]} -gt 0 ] || die "no {python,js,rust,c}-* plugin folders found in ${SOURCES[*]}"
fi
# --lang L (repeatable): only the plugins in those languages.
if [ ${#langs[@]} -gt 0 ]; then
    kept=()
    for n in "${names[@]}"; do
        for l in "${langs[@]}"; do
            case "$l" in python | js | rust | c) ;; *) die "unknown language '$l'" "choose from: python js rust c" ;; esac
            [[ "${n##*/}" == "$l"-* ]] && kept+=("$n")
        done
    done
    names=("${kept[@]}")
    [ ${#names[@]} -gt 0 ] || die "no plugins in ${langs[*]}"
fi
for n in "${names[@]}"; do
    n="${n##*/}"
    [ -n "$(source_dir "$n")" ] || die "no plugin named '$n'" "choose from: $(all_names | tr '\n' ' ')"
done

start=$(now)
say "tool cache: $CACHE"
mkdir -p "$CACHE" || die "cannot create $CACHE" "set GUEST_TOOLS_DIR to a writable folder"
want_py=0 want_js=0 want_rust=0 want_c=0
for n in "${names[@]}"; do
    case "${n##*/}" in
        python-*) want_py=1 ;;
        js-*) want_js=1 ;;
        rust-*) want_rust=1 ;;
        c-*) want_c=1 ;;
        *) die "'$n': an example's folder name must start with python-, js-, rust- or c-" ;;
    esac
done
[ $tools_only = 1 ] && want_py=1 want_js=1 want_rust=1 want_c=1
[ $want_py = 1 ] && tools_python
[ $want_js = 1 ] && tools_npm "$JS_SET" "$JS_BIN"
[ $want_rust = 1 ] && need_rust_target
[ $want_c = 1 ] && tools_c
need python3 "the import check (scripts/guest-tools/component-imports.py) runs on Python 3." "apt-get install python3"
if [ $want_js = 1 ] && [ "$JS_ENGINE" = quickjs ]; then
    say "WARNING: componentize-qjs 0.4.5 (--sync) does not drop the borrowed \`request\` before \`pick\`"
    say "         returns, so wasmtime traps every pick (\"borrow handles still remain at the end of"
    say "         the call\") and the gateway falls back to round robin. Use JS_ENGINE=starlingmonkey."
fi
mkdir -p "$OUT"
write_tools_env
if [ $tools_only = 1 ]; then
    say "tools ready ($(elapsed "$start"))"
    exit 0
fi

for n in "${names[@]}"; do
    n="${n##*/}"
    dir="$(source_dir "$n")"
    t=$(now)
    say "$n: building"
    case "$n" in
        python-*) build_python "$n" "$dir" ;;
        js-*) build_js "$n" "$dir" ;;
        rust-*) build_rust "$n" "$dir" ;;
        c-*)
            [ -n "${GATEWAY_BIN:-}" ] || GATEWAY_BIN="$(gateway_bin)"
            build_c "$n" "$dir"
            ;;
    esac
    check_imports "$OUT/$n.wasm" "${n%%-*}"
    say "$n: $OUT/$n.wasm, $(wc -c <"$OUT/$n.wasm") bytes ($(elapsed "$t"))"
done
say "all done ($(elapsed "$start"))"
