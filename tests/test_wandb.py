"""Issue #19: optional Weights & Biases logging (``log.wandb``), offline here: no network, no account.

A real 1-process training run with ``log.wandb: offline`` writes an offline W&B run; wandb's own reader
(``wandb leet inspect --json``, the CLI that ships with wandb) reads its history back, which must hold the
same metric names and values as the TensorBoard events and ``log.jsonl``, plus the run config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, _train, _write_config, tiny_config


WANDB_CLI = str(Path(sys.executable).parent / "wandb")


def wandb_records(run_file: Path) -> list[dict]:
    """The records of an offline run's ``.wandb`` log, decoded by wandb itself."""
    proc = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_history(records: list[dict]) -> dict[tuple[int, str], float]:
    """(step, metric) -> value over the history rows; W&B's own ``_step``/``_runtime``/... left out."""
    history = {}
    for record in records:
        if record["type"] == "history":
            step = record["history"]["step"]["num"]
            history.update({(step, k): v for k, v in record["history"]["item"].items() if not k.startswith("_")})
    return history


def tensorboard_scalars(folder: Path) -> dict[tuple[int, str], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def jsonl_scalars(run: Path) -> dict[tuple[int, str], float]:
    from training.logging_utils import read_log, scalar_metrics

    return {(r["step"], name): value for r in read_log(run / "log.jsonl") for name, value in scalar_metrics(r).items()}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    from shards.synth import generate

    out = tmp_path_factory.mktemp("wandb_shards")
    generate(out, task="retrieval", n_train=128, n_val=32, seed=0, shard_size=64, image_size=64)
    return out


def test_offline_run_has_the_tensorboard_metrics_and_the_config(small_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(small_shards, run, log={"wandb": "offline", "wandb_project": "multiclip-test"},
                      eval={"batch_size": 32, "max_samples": 32})
    env_dir = tmp_path / "wandb_env"  # where W&B would write if the config's folder were not used
    env_dir.mkdir()
    proc = _train(_write_config(tmp_path, raw), env={"WANDB_MODE": "offline", "WANDB_DIR": str(env_dir),
                                                     "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_files = list((run / "wandb").glob("wandb/offline-run-*/run-*.wandb"))  # default log.wandb_dir: <run>/wandb
    assert len(run_files) == 1, sorted(p.name for p in (run / "wandb").rglob("*"))
    assert not any(env_dir.iterdir())
    records = wandb_records(run_files[0])
    history, jsonl = wandb_history(records), jsonl_scalars(run)
    tensorboard = tensorboard_scalars(run / "tensorboard")
    assert {"train/loss", "eval/retrieval/t2i_R@1"} <= {name for _, name in history}
    assert history.keys() == tensorboard.keys() == jsonl.keys()
    assert history == jsonl  # the same numbers (TensorBoard keeps float32)
    assert tensorboard == pytest.approx(jsonl, rel=1e-6, abs=1e-7)
    assert {step for step, _ in history} == {0, 1, 2, 3, 4}
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    config.pop("_wandb", None)
    assert config == yaml.safe_load((run / "config.yaml").read_text())
    project = next(r["run"]["project"] for r in records if r["type"] == "run")
    assert project == "multiclip-test"
    assert next(r for r in records if r["type"] == "exit")["exit"].get("exit_code", 0) == 0  # finished


def test_off_writes_nothing_and_other_ranks_log_nothing(tmp_path):
    """``wandb: off`` (the default) and ``tensorboard: false``: only log.jsonl, and wandb is not even imported;
    a rank other than 0 writes nothing whatever the config says."""
    from training.config import LogConfig
    from training.logging_utils import RunLogger

    imported_before = "wandb" in sys.modules
    logger = RunLogger(tmp_path / "run", True, LogConfig(tensorboard=False, wandb="off"), {"a": 1})
    logger.log({"kind": "train", "step": 1, "loss": 0.5})
    logger.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.jsonl"]
    if not imported_before:
        assert "wandb" not in sys.modules
    other = RunLogger(tmp_path / "rank1", False, LogConfig(wandb="offline", wandb_dir=str(tmp_path / "w")), {})
    other.log({"kind": "train", "step": 1, "loss": 0.5})
    other.close()
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "w").exists()


def test_missing_wandb_stops_training_at_start(small_shards, tmp_path):
    """``log.wandb`` set but wandb not importable: launch/train.py exits 2 naming the fix, before any model,
    checkpoint or log exists."""
    run = tmp_path / "run"
    config = _write_config(tmp_path, tiny_config(small_shards, run, log={"wandb": "offline"}))
    script = ("import runpy, sys; sys.modules['wandb'] = None  # as if not installed\n"
              f"sys.argv = ['launch/train.py', '--config', {str(config)!r}]\n"
              "runpy.run_path('launch/train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "log.wandb" in proc.stderr and "pip install wandb" in proc.stderr, proc.stderr[-3000:]
    assert not run.exists()  # checked before the run folder, its config.yaml or a model
