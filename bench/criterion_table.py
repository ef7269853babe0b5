#!/usr/bin/env python3
"""Markdown table of the decision-path benchmark from criterion's saved estimates.

    cargo bench -p gateway --bench decision && bench/criterion_table.py
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion/pick")
rows = {}
for est in sorted(root.glob("*/*/new/estimates.json")):
    strategy, size = est.parts[-4], est.parts[-3]
    median_ns = json.loads(est.read_text())["median"]["point_estimate"]
    rows.setdefault(strategy, {})[size] = median_ns
if not rows:
    sys.exit(f"no estimates under {root}: run `cargo bench -p gateway --bench decision` first")
sizes = sorted({s for r in rows.values() for s in r}, key=int)
print("| strategy | " + " | ".join(f"{int(s):,} backends" for s in sizes) + " |")
print("|---|" + "---|" * len(sizes))
for strategy, r in sorted(rows.items()):
    cells = [f"{r[s] / 1000:.2f} µs" if s in r else "—" for s in sizes]
    print(f"| {strategy} | " + " | ".join(cells) + " |")
