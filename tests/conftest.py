"""Shared fixtures: synthetic shards generated once per session, run folders per test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs on DeepSpeed's CPU accelerator, on a GPU host too: every test (and every process it
# starts, which inherits this environment) sees no CUDA device. tests/test_gpu.py runs its checks in
# subprocesses with GPU_ENV, the environment as it was before this.
GPU_ENV = dict(os.environ)
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import training  # noqa: E402,F401  (torchvision compatibility before anything imports open_clip)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def retrieval_shards(tmp_path_factory) -> Path:
    """Small retrieval shard set (8 train shards, 2 val shards) shared by the whole session."""
    from shards.synth import generate

    out = tmp_path_factory.mktemp("synth") / "retrieval"
    generate(out, task="retrieval", n_train=1600, n_val=200, seed=0, shard_size=200, image_size=64)
    return out


def tiny_config(shards: Path, run_dir: Path, **sections) -> dict:
    """A raw config dict for the tiny model on ``shards``; ``sections`` update top-level sections."""
    raw = {
        "run": {"output_dir": str(run_dir), "seed": 0},
        "model": {"name": "tiny-vit", "model_config_dir": str(ROOT / "configs" / "models")},
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "num_workers": 1,
                 "shuffle_buffer": 100},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": 16, "max_steps": 4, "lr_backbone": 1e-3, "lr_head": 1e-3,
                  "warmup_steps": 1},
        "schedule": {"log_every": 1},
        "eval": {"batch_size": 100, "max_samples": 100},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _synth(tmp_path_factory, task: str, n_train: int = 1600, n_val: int = 200) -> Path:
    from shards.synth import generate

    out = tmp_path_factory.mktemp("synth") / task
    generate(out, task=task, n_train=n_train, n_val=n_val, seed=0, shard_size=200, image_size=64)
    return out


@pytest.fixture(scope="session")
def time_shards(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory, "time")


@pytest.fixture(scope="session")
def geo_shards(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory, "geo_time", n_train=2400)


def run_infer_cli(args: list[str], forbidden: tuple[str, ...]) -> subprocess.CompletedProcess:
    """launch/infer.py with ``args`` in a fresh interpreter; it must succeed without importing ``forbidden``."""
    script = (f"import runpy, sys; sys.argv = ['infer.py', *{args!r}];\n"
              "try:\n    runpy.run_path('launch/infer.py', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
              "print('HEAVY', bad)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]
    return proc
