"""Rank-0 run logs: JSON lines, TensorBoard scalars, optional Weights & Biases, and a PNG of the curves at the end."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from training.config import ConfigError, LogConfig


def setup_console_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere, so two ranks do not print everything twice."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


class RunLogger:
    """Writes ``log.jsonl`` and, as ``log`` asks, TensorBoard events and a Weights & Biases run (only on rank 0).

    TensorBoard and W&B get the same scalars under the same names, ``{kind}/{key}`` at the record's ``step``
    (``train/loss``, ``eval/retrieval_t2i_r1``); W&B also gets the run config, and is finished by :meth:`close`.
    """

    def __init__(self, run_dir: Path, enabled: bool, log: LogConfig | None = None,
                 run_config: dict[str, Any] | None = None):
        log = LogConfig() if log is None else log
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self._tb = None
        self._wandb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            if log.wandb != "off":
                self._wandb = start_wandb(log, run_dir, run_config or {})

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:  # one whole line per write, flushed: a kill tears at most the last
            f.write(json.dumps(record) + "\n")
            f.flush()
        step = record.get("step", 0)
        scalars = scalar_metrics(record)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record as ``{kind}/{key}``: the names TensorBoard and W&B both show."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": value for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step"}


def import_wandb(log: LogConfig) -> Any:
    """The wandb module; a ConfigError saying how to install it when ``log.wandb`` asks for it and it is missing."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(f"log.wandb: {log.wandb!r} needs the wandb package, which is not installed ({err}); "
                          "install it with `pip install wandb` (or the project's extra: `pip install '.[wandb]'`), "
                          "or set log.wandb=off") from None
    return wandb


def check_log_backends(log: LogConfig) -> None:
    """Fail at start, before any model is built, when the config asks for a logger that cannot run."""
    if log.wandb != "off":
        import_wandb(log)


def start_wandb(log: LogConfig, run_dir: Path, run_config: dict[str, Any]) -> Any:
    """A W&B run named after the run folder, with the run config; files under ``log.wandb_dir`` (default
    ``<run>/wandb``). ``offline`` needs no network: ``wandb sync <dir>/wandb/offline-run-*`` uploads it later."""
    wandb = import_wandb(log)
    directory = Path(log.wandb_dir) if log.wandb_dir else run_dir / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=log.wandb_project, name=run_dir.name, dir=str(directory), mode=log.wandb,
                      config=run_config)


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
