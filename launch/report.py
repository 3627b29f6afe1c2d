"""Print a run's held-out metrics before and after training, beside chance, as a table.

    python launch/report.py runs/retrieval_tiny
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def format_table(result: dict) -> str:
    before, after = result.get("before") or {}, result["after"]
    keys = [k for k in after if not k.endswith("_chance") and k.split("/")[-1] != "num_samples"]
    rows = [("metric", "before", "after", "chance")]
    for key in keys:
        chance = after.get(f"{key}_chance")
        rows.append((key, _fmt(before.get(key)), _fmt(after[key]), _fmt(chance)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_wise_ft(wise: dict) -> str:
    """One line per (alpha, eval set): the headline metric of each task."""
    lines = ["WiSE-FT (backbone = (1-alpha)*initial + alpha*fine-tuned):"]
    for alpha, per_set in wise.items():
        for name, metrics in per_set.items():
            shown = {k: v for k, v in metrics.items() if k.endswith(("t2i_R@1", "zeroshot_top1"))}
            lines.append(f"  alpha={alpha:<4} {name:<8} " + "  ".join(f"{k}={v:.3f}" for k, v in shown.items()))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    result = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    print(f"held-out metrics of {args.run_dir} (step {result['step']}):")
    print(format_table(result))
    if result.get("wise_ft"):
        print(format_wise_ft(result["wise_ft"]))
    skipped = result.get("skipped_samples", {})
    print(f"skipped samples: {skipped.get('count', 0)} {skipped.get('by_reason', {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
