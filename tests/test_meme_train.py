"""meme learns on its synthetic data through the real deepspeed launcher (2 ranks), held-out well above chance.

With ``alpha: auto`` (alpha chosen on a separate validation split, never the held-out one) the fused
score is not below the better branch by more than noise. Not asserted, only printed: whether fused
beats both branches (on this data QI's inputs include everything QC reads; see the README).
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
    from shards.synth import write_split
    from shards.synth.meme import describe_meme

    # a validation split for alpha: auto, drawn like val (held-out triples included) but disjoint from it
    write_split(out / "tune", "meme", 400, 0, 200, 64, describe_meme(0), "tune", False)
    return out


def _meme_config(shards: Path, run: Path, max_steps: int = 100, **options) -> dict:
    task = {"name": "meme", "options": {"bert": str(shards / "bert-tiny"), "heads": 8, **options}}
    return tiny_config(shards, run, tasks=[task],
                       optim={"max_steps": max_steps, "micro_batch_size": 32, "warmup_steps": 10, "weight_decay": 0.05},
                       schedule={"log_every": 50}, eval={"max_samples": None, "batch_size": 200})


# R@1 on 400 held-out queries: one binomial standard error is about 0.024. The fused score's alpha is chosen
# on another split of 400, while the best branch is picked on the held-out split itself (an in-sample max),
# so the allowance is two standard errors. Measured with the loaders' own seeds (session 12), fused - best
# branch at run.seed 0-3: 0.000, -0.050, +0.030, +0.015 (alpha 1.00 / 0.90 / 0.40 / 0.55): seed 1 sits at
# the allowance, so the selection's noise on 400 items is about that large. This test runs seed 0.
NOISE = 0.05


def test_meme_branches_learn_well_above_chance(meme_shards, tmp_path):
    run = tmp_path / "run"
    config = _write_config(tmp_path, _meme_config(meme_shards, run, stage="joint", alpha="auto",
                                                  alpha_validation=str(meme_shards / "tune")))
    proc = _train(config, ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())["after"]
    chance = after["meme/R@1_chance"]
    for branch in ("qi", "qc", "fused"):
        assert after[f"meme/{branch}_R@1"] >= 5 * chance, branch
    before = json.loads((run / "metrics.json").read_text())["before"]
    assert after["meme/fused_R@10"] >= before["meme/fused_R@10"] + 0.3
    assert after["meme/fused_R@100"] <= 1.0 and after["meme/num_samples"] == 400
    assert 0.0 <= after["meme/alpha"] <= 1.0
    best_branch = max(after["meme/qi_R@1"], after["meme/qc_R@1"])
    print(f"meme held-out R@1: fused {after['meme/fused_R@1']:.4f} (auto alpha {after['meme/alpha']:.2f}), "
          f"QI {after['meme/qi_R@1']:.4f}, QC {after['meme/qc_R@1']:.4f}, chance {chance:.4f}, "
          f"prior {after['meme/R@1_baseline']:.4f}; fused beats both: {after['meme/fused_R@1'] > best_branch}")
    assert after["meme/fused_R@1"] >= best_branch - NOISE
    # launch/evaluate.py re-scores the saved weights to the same numbers
    out = tmp_path / "eval.json"
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(config), "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["meme/fused_R@1"] == pytest.approx(after["meme/fused_R@1"], abs=1e-6)
    assert again["meme/alpha"] == after["meme/alpha"]  # chosen again on the validation split, the same
    # the same weights at the fixed alpha = 0.5 (reported, not asserted)
    (tmp_path / "fixed").mkdir()
    fixed = _write_config(tmp_path / "fixed", _meme_config(meme_shards, run, stage="joint", alpha=0.5))
    out = tmp_path / "eval_alpha_0.5.json"
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(fixed), "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    half = json.loads(out.read_text())
    assert half["meme/qi_R@1"] == pytest.approx(after["meme/qi_R@1"], abs=1e-6)
    print(f"meme held-out R@1 at alpha 0.5: fused {half['meme/fused_R@1']:.4f}")
