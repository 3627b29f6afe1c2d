"""The measured effect of a task option: the same config trained once per variant and seed, one table.

    .venv/bin/python benchmarks/option_effects.py --config configs/time_tiny.yaml \\
        --variant default= --variant adapter_bias=tasks.0.options.adapter_bias=true \\
        --variant dropout_0.1=tasks.0.options.dropout=0.1 --seeds 0 1 [--set optim.max_steps=200]

A variant is ``name=override[,override...]`` (overrides as ``launch/train.py`` takes them; an empty list
is the config as it is). Generate the config's shards first (``python -m shards.synth``). Every run is one
process (``python launch/train.py``) into ``<work>/<variant>-seed<s>``. The table shows each headline
metric per variant as the mean over seeds and, with several seeds, ± half the spread (max - min): the
noise a difference must clear. Used for docs/differences.md.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected name=override[,override...]")
    return name, [o for o in re.split(r",(?=[\w.]+=)", overrides) if o]  # a comma inside a value stays


def train(config: str, run_dir: Path, seed: int, overrides: list[str]) -> dict:
    """One run; its metrics.json (the trainer's)."""
    cmd = [sys.executable, "launch/train.py", "--config", config, f"run.output_dir={run_dir}", f"run.seed={seed}",
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def headline(result: dict) -> dict[str, float]:
    names = [f"{task}/{name}" for task, names in result.get("headline", {}).items() for name in names]
    return {k: result["after"][k] for k in names if isinstance(result["after"].get(k), (int, float))}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    metrics = list(dict.fromkeys(k for runs in results.values() for run in runs for k in run))
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for key in metrics:
            values = [run[key] for run in runs if key in run]
            mean = statistics.fmean(values)
            cells.append(f"{mean:.3f}" + (f" (±{(max(values) - min(values)) / 2:.3f})" if len(values) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant (e.g. optim.max_steps=200)")
    parser.add_argument("--work", default="/tmp/multiclip_option_effects", help="run folders go here")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    for name, overrides in args.variant:
        for seed in args.seeds:
            run_dir = Path(args.work) / f"{name}-seed{seed}"
            metrics = headline(train(args.config, run_dir, seed, [*args.set, *overrides]))
            results.setdefault(name, []).append(metrics)
            print(f"{name} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    print(f"\n{args.config} {' '.join(args.set)}, seeds {args.seeds} "
          f"({time.perf_counter() - started:.0f} s):\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
