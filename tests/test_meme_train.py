"""meme learns on its synthetic data through the real deepspeed launcher (2 ranks), held-out well above chance.

Not asserted (it does not hold yet, see the task's report): the fused score beating the QI branch alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from conftest import _run, _train, _write_config


@pytest.fixture(scope="module")
def meme_shards(tmp_path_factory) -> Path:
    """Small meme shard set with its tiny BERT folder, written by the CLI users run."""
    out = tmp_path_factory.mktemp("synth") / "meme"
    proc = subprocess.run([sys.executable, "-m", "shards.synth", "--task", "meme", "--out", str(out), "--train", "1600",
                           "--val", "400", "--shard-size", "200"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "bert-tiny" / "config.json").is_file()
    return out


def _meme_config(shards: Path, run: Path, max_steps: int = 100, **options) -> dict:
    task = {"name": "meme", "options": {"bert": str(shards / "bert-tiny"), "heads": 8, **options}}
    return tiny_config(shards, run, tasks=[task],
                       optim={"max_steps": max_steps, "micro_batch_size": 32, "warmup_steps": 10, "weight_decay": 0.05},
                       schedule={"log_every": 50}, eval={"max_samples": None, "batch_size": 200})


def test_meme_branches_learn_well_above_chance(meme_shards, tmp_path):
    run = tmp_path / "run"
    config = _write_config(tmp_path, _meme_config(meme_shards, run, stage="joint", alpha=0.5))
    proc = _train(config, ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())["after"]
    chance = after["meme/R@1_chance"]
    for branch in ("qi", "qc", "fused"):
        assert after[f"meme/{branch}_R@1"] >= 5 * chance, branch
    before = json.loads((run / "metrics.json").read_text())["before"]
    assert after["meme/fused_R@10"] >= before["meme/fused_R@10"] + 0.3
    assert after["meme/fused_R@100"] <= 1.0 and after["meme/num_samples"] == 400
    # launch/evaluate.py re-scores the saved weights to the same numbers
    out = tmp_path / "eval.json"
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(config), "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["meme/fused_R@1"] == pytest.approx(after["meme/fused_R@1"], abs=1e-6)
