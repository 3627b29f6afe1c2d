"""Print a run's held-out metrics before (the zero-shot baseline) and after training, beside chance and
the strongest trivial baseline: one table per task, headline metrics first (``--all`` for every metric).

A task reports its baselines as sibling keys of a metric: ``<metric>_chance`` (uniform guessing) and
``<metric>_baseline`` (the strongest trivial rule on the same held-out data: the majority label, or a
label-prior rule where the data has one); ``<metric>_baseline_rule`` may name the rule (a string).

    python launch/report.py runs/all_heads_tiny [--all]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.atomic import read_json  # noqa: E402


def task_tables(result: dict, everything: bool = False) -> list[str]:
    """One table per task prefix of the metric keys (``<task>/<metric>``), headline metrics only unless
    ``everything``. Each task names its headline metrics (``Task.headline_metrics``); the trainer writes
    them to metrics.json, so this report knows no task (runs without that list show every metric)."""
    tasks = list(dict.fromkeys(k.split("/")[0] for k in result["after"]))
    headline = result.get("headline", {})
    tables = []
    for task in tasks:
        names = [k.split("/", 1)[1] for k in result["after"] if k.startswith(f"{task}/")]
        if not everything and headline.get(task):
            names = [n for n in headline[task] if n in names]
        tables.append(f"{task}:\n" + format_table(result, [f"{task}/{n}" for n in names]))
    return tables


def format_table(result: dict, keys: list[str] | None = None) -> str:
    before, after = result.get("before") or {}, result["after"]
    if keys is None:
        keys = list(after)
    keys = [k for k in keys if not k.endswith(BASELINE_SUFFIXES) and isinstance(after[k], (int, float))
            and k.split("/")[-1] not in ("num_samples", "num_video", "num_static")]
    rows = [("metric", "before", "after", "chance", "baseline")]
    for key in keys:
        chance = after.get(f"{key}_chance", after.get(_unprefixed(key) + "_chance"))
        baseline = after.get(f"{key}_baseline", after.get(_unprefixed(key) + "_baseline"))
        rule = after.get(f"{key}_baseline_rule", after.get(_unprefixed(key) + "_baseline_rule"))
        shown = _fmt(baseline) + (f" ({rule})" if rule and baseline is not None else "")
        rows.append((key, _fmt(before.get(key)), _fmt(after[key]), _fmt(chance), shown))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BASELINE_SUFFIXES = ("_chance", "_baseline", "_baseline_rule")


def format_wise_ft(wise: dict) -> str:
    """One line per (alpha, eval set): the headline metric of each task."""
    lines = ["WiSE-FT (backbone = (1-alpha)*initial + alpha*fine-tuned):"]
    for alpha, per_set in wise.items():
        for name, metrics in per_set.items():
            shown = {k: v for k, v in metrics.items() if k.endswith(("t2i_R@1", "zeroshot_top1"))}
            lines.append(f"  alpha={alpha:<4} {name:<8} " + "  ".join(f"{k}={v:.3f}" for k, v in shown.items()))
    return "\n".join(lines)


def _unprefixed(key: str) -> str:
    """meme/fused_R@1 -> meme/R@1: branch metrics share one chance level."""
    task, _, name = key.partition("/")
    return f"{task}/{name.split('_', 1)[-1]}"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--all", action="store_true", help="every metric, not only the headline ones")
    args = parser.parse_args(argv)
    path = Path(args.run_dir) / "metrics.json"
    try:
        result = read_json(path, "metrics")
    except FileNotFoundError:
        print(f"error: {path} not found: a run writes it when training ends (is {args.run_dir} a run folder?)",
              file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"held-out metrics of {args.run_dir} (step {result['step']}; before = untrained / zero-shot):")
    print("\n\n".join(task_tables(result, args.all)))
    if result.get("wise_ft"):
        print(format_wise_ft(result["wise_ft"]))
    skipped = result.get("skipped_samples", {})
    print(f"skipped samples: {skipped.get('count', 0)} {skipped.get('by_reason', {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
