#!/usr/bin/env bash
# The reliability suite (docs/reliability.md): runs the suite's tests once, collects the
# figures each scenario records, and prints them as the Markdown tables of
# docs/reliability.md (also written to target/reliability/report.md).
#
#   scripts/reliability.sh            # the suite, as CI runs it (a few minutes)
#   scripts/reliability.sh --long     # longer soaks (GATEWAY_TEST_LONG=1: 100 Python plugin swaps)
#
# The tests themselves are part of scripts/test.sh; this script only adds the report.
# Needs what scripts/test.sh installs (run that once first on a fresh machine), including
# the guest-language plugins in target/guest-plugins (GUEST_OUT_DIR elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/reliability
mkdir -p "$out"
report="$PWD/$out/rows.jsonl"
: > "$report"
if [ "${1:-}" = "--long" ]; then
  export GATEWAY_TEST_LONG=1
fi

# The suite's test files, in the order of docs/reliability.md's tables; files that do not
# exist (yet) are skipped.
suite=(reliability plugin_faults plugin_quarantine plugin_limits plugin_memory hot_swap abuse_http rapid_reset limits abuse_config fuzz_config fuzz_answers)
args=()
for t in "${suite[@]}"; do
  [ -f "gateway/tests/$t.rs" ] && args+=(--test "$t")
done
echo "==> running $((${#args[@]} / 2)) suite files (${suite[*]}); figures go to $report"
started=$SECONDS
# Every file runs even when one fails (a flaky test must not hide the others' figures);
# the script still fails then, after printing what was recorded.
status=0
GATEWAY_RELIABILITY_REPORT="$report" cargo test --profile ci -p gateway --no-fail-fast "${args[@]}" -- --test-threads 1 || status=$?
# The property tests inside the gateway library (router, header forwarding, cookie and
# query lookups).
cargo test --profile ci -p gateway --lib properties || status=$?
if [ "$status" -eq 0 ]; then
  echo "==> suite passed in $((SECONDS - started)) s"
else
  echo "==> suite FAILED (exit $status) after $((SECONDS - started)) s; the tables hold the rows that were recorded"
fi

python3 - "$report" "$out/report.md" <<'EOF'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tables = collections.OrderedDict()
for r in rows:
    tables.setdefault(r.pop("suite"), []).append(r)
def cell(v):
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")
lines = []
for suite, rs in tables.items():
    cols = []
    for r in rs:
        cols += [k for k in r if k not in cols]
    lines.append(f"### {suite}\n")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rs:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |")
    lines.append("")
text = "\n".join(lines)
open(sys.argv[2], "w").write(text)
print(text)
EOF
exit "$status"
