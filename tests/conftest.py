"""Shared fixtures: synthetic shards generated once per session, run folders per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import training  # noqa: F401  (torchvision compatibility before anything imports open_clip)

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
