"""Runs whose output_dir is an fsspec URL: written through a local staging folder, mirrored checkpoint by
checkpoint, resumed from the URL on a machine with an empty staging folder. fsspec's local file system
under the ``file://`` protocol stands in for a bucket (``memory://`` cannot: it lives inside one process,
and the DeepSpeed ranks are separate processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import _train, _write_config, tiny_config
from training.config import ConfigError
from training.distributed import DistInfo
from training.remote_runs import RunMirror

ONE = DistInfo(0, 1, 0, 1, torch.device("cpu"))


def test_a_run_on_a_url_is_mirrored_and_resumes_from_there(retrieval_shards, tmp_path):
    remote = tmp_path / "bucket" / "run"
    url = f"file://{remote}"
    raw = tiny_config(retrieval_shards, url, run={"staging_dir": str(tmp_path / "machine_a")},
                      deepspeed={"zero_stage": 1}, optim={"max_steps": 4}, schedule={"checkpoint_every": 2},
                      eval={"max_samples": 20, "batch_size": 20})
    config = _write_config(tmp_path, raw)
    proc = _train(config, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = remote / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000004"
    tag_files = {p.name for p in (ckpt / "step00000004").iterdir()}
    assert {"run_state.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= tag_files  # both ranks' ZeRO shards went up
    assert {"model.safetensors", "open_clip.safetensors", "config.json"} <= {p.name for p in (remote / "final").iterdir()}
    assert (remote / "log.jsonl").is_file() and (remote / "metrics.json").is_file()
    assert not list(remote.rglob(".*partial*"))  # every upload was moved to its own name
    assert not (remote / ".lock").exists()

    # another machine: an empty staging folder, so --resume must pull the checkpoint from the URL
    proc = _train(config, "--resume", "optim.max_steps=6", f"run.staging_dir={tmp_path / 'machine_b'}", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"resumed from {tmp_path / 'machine_b' / 'checkpoints' / 'step00000004'} at step 4" in out
    assert (ckpt / "latest").read_text().strip() == "step00000006"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000006"]  # pruned there too
    steps = [r["step"] for r in map(json.loads, (remote / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # machine b pulled the log and appended to it

    from training.runs import load_run  # a finished run loads from its URL

    model, _, used = load_run(url)
    assert used["optim"]["max_steps"] == 6 and "retrieval" in model.heads


def _checkpoint(folder: Path, tag: str, payload: str) -> None:
    (folder / tag).mkdir(parents=True)
    (folder / tag / "run_state.json").write_text(json.dumps({"tag": tag}))
    (folder / tag / "model.pt").write_text(payload)
    (folder / "latest").write_text(tag)


def test_resume_pulls_the_last_complete_checkpoint_never_a_half_uploaded_one(tmp_path):
    machine_a = RunMirror(f"file://{tmp_path / 'bucket'}", str(tmp_path / "a"), ONE)
    _checkpoint(machine_a.local_dir / "checkpoints", "step00000002", "weights at 2")
    machine_a.push_checkpoint("step00000002")
    # a kill during the next upload: its files partly there, ``latest`` (uploaded last) not yet moved on
    half = tmp_path / "bucket" / "checkpoints" / "step00000004"
    half.mkdir()
    (half / "run_state.json").write_text(json.dumps({"tag": "step00000004"}))
    machine_b = RunMirror(f"file://{tmp_path / 'bucket'}", str(tmp_path / "b"), ONE)
    assert machine_b.pull_latest_checkpoint() == "step00000002"
    local = machine_b.local_dir / "checkpoints"
    assert (local / "latest").read_text() == "step00000002"
    assert (local / "step00000002" / "model.pt").read_text() == "weights at 2"
    assert not (local / "step00000004").exists()


def test_remote_pruning_removes_only_our_older_tags(tmp_path):
    mirror = RunMirror(f"file://{tmp_path / 'bucket'}", str(tmp_path / "a"), ONE)
    local = mirror.local_dir / "checkpoints"
    for step in (2, 4):
        _checkpoint(local, f"step{step:08d}", f"weights at {step}")
        mirror.push_checkpoint(f"step{step:08d}")
    foreign = tmp_path / "bucket" / "checkpoints" / "step00000001"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours: no run_state.json")
    import shutil

    shutil.rmtree(local / "step00000002")  # what the trainer's local pruning does
    _checkpoint(local, "step00000006", "weights at 6")
    mirror.push_checkpoint("step00000006")
    names = sorted(p.name for p in (tmp_path / "bucket" / "checkpoints").iterdir())
    assert names == ["latest", "step00000001", "step00000004", "step00000006"]


def test_memory_urls_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="inside one process"):
        RunMirror("memory://runs/x", None, ONE)
