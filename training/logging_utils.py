"""Rank-0 run logs: JSON lines, TensorBoard scalars, and a PNG of the curves at the end."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def setup_console_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere, so two ranks do not print everything twice."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events under the run folder (only on rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:  # one whole line per write, flushed: a kill tears at most the last
            f.write(json.dumps(record) + "\n")
            f.flush()
        step = record.get("step", 0)
        kind = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step",):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl``; a torn last line (a killed job) is ignored with a warning, a bad line
    elsewhere is an error naming it."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record") from None
            logging.getLogger("multiclip.train").warning("%s: ignoring a torn last line (an interrupted job)", path)
    return records


def plot_curves(log_path: Path, out_png: Path, metrics: list[str] | None = None) -> None:
    """Loss per step and held-out metrics per evaluation, one panel each: ``metrics`` (the tasks' headline
    metrics) or every metric, each with its trivial baseline (dashed) and chance (dotted) where reported.
    Written to a temporary file and renamed, so a reader never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    reported = {k for r in evals for k, v in r.items() if isinstance(v, float)}
    metric_keys = [k for k in metrics if k in reported] if metrics else sorted(
        k for k in reported if not k.endswith(("_chance", "_baseline")) and k != "step")
    panels = 1 + len(metric_keys)
    cols = min(4, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_title("train loss")
    last = evals[-1] if evals else {}
    for ax, key in zip(axes[1:], metric_keys):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="held-out")
        for suffix, style in (("_baseline", "--"), ("_chance", ":")):
            if isinstance(last.get(key + suffix), float):
                ax.axhline(last[key + suffix], linestyle=style, color="grey", label=suffix[1:])
        ax.set_title(key, fontsize=9)
    for ax in axes[panels:]:
        ax.axis("off")
    for ax in axes[:panels]:
        ax.set_xlabel("step")
    if metric_keys:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    partial = out_png.with_name(f".{out_png.name}.partial.png")
    fig.savefig(partial, dpi=80)
    plt.close(fig)
    os.replace(partial, out_png)
