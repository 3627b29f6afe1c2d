"""The classical bag-of-features retriever, and CLIP side by side with it (launch/compare_retrievers.py)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_config
from conftest import _run, _train, _write_config
from training.retrieval.classical import (ClassicalOptions, evaluate_classical, load_samples, query_by_example,
                                window_colour_histograms)
from training.tasks.retrieval import RetrievalOptions, score_retrieval


@pytest.fixture(scope="module")
def splits(retrieval_shards):
    return load_samples(retrieval_shards / "train"), load_samples(retrieval_shards / "val")


@pytest.fixture(scope="module")
def fitted(splits):
    train, val = splits
    return evaluate_classical(train, val, ClassicalOptions(vocabulary=96))


def test_window_colour_histograms_count_each_window():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:] = (255, 0, 0)  # right half red, left half black
    hist = window_colour_histograms(rgb, cell=8, block=1, bins=2) ** 2  # undo the square root
    red, black = (1 * 2 + 0) * 2 + 0, 0
    assert hist.shape == (4, 8)
    assert hist[:, black].tolist() == [1, 0, 1, 0] and hist[:, red].tolist() == [0, 1, 0, 1]


def test_query_by_example_excludes_the_query_itself():
    emb = torch.eye(4)
    emb[1] = emb[0]  # 0 and 1 identical, same label; 2 and 3 orthogonal, same label
    out = query_by_example(emb, ["a", "a", "b", "b"], ks=(1,))
    assert out["i2i_R@1"] == pytest.approx(0.5)  # 0 and 1 find each other; 2 and 3 rank ties by index
    assert out["i2i_R@1_chance"] == pytest.approx(1 / 3)


def test_fits_on_the_training_split_only(splits, fitted):
    train, val = splits
    _, retriever = fitted
    assert retriever.fit_keys == train.keys
    assert not set(retriever.fit_keys) & set(val.keys), "validation samples were used for fitting"
    assert set(retriever.classes) <= set(train.labels)
    with pytest.raises(ValueError, match="validation keys are also training keys"):
        evaluate_classical(val, val)


def test_beats_chance_on_held_out_synthetic_retrieval(fitted):
    out, _ = fitted
    assert out["t2i_R@1"] >= 4 * out["t2i_R@1_chance"]
    assert out["zeroshot_top1"] >= 2.5 * out["zeroshot_top1_chance"]
    assert out["i2i_R@1"] >= 2.5 * out["i2i_R@1_chance"]
    assert out["candidate_f1"] > 0 and out["fit_s"] > 0 and out["index_s"] > 0 and out["query_s"] > 0


def test_same_metric_keys_as_clip(splits, fitted):
    _, val = splits
    out, _ = fitted
    n, names = len(val), sorted(set(val.labels))
    emb = {"image": torch.randn(n, 8), "text": torch.randn(n, 8), "caption": val.captions, "label": val.labels}
    clip_keys = set(score_retrieval(emb, torch.randn(len(names), 8), names, RetrievalOptions()))
    assert clip_keys <= set(out)


def test_compare_retrievers_end_to_end(tmp_path):
    """A tiny run, then the launch script: one table, markdown + json in the run folder, CLIP's column
    equal to the run's own final evaluation on the same held-out set."""
    from shards.synth import generate

    data = tmp_path / "data"
    generate(data, task="retrieval", n_train=400, n_val=100, seed=1, shard_size=100, image_size=64)
    run = tmp_path / "run"
    raw = tiny_config(data, run, optim={"max_steps": 2}, eval={"max_samples": None, "batch_size": 100})
    assert _train(_write_config(tmp_path, raw)).returncode == 0
    proc = _run([sys.executable, "launch/compare_retrievers.py", "--checkpoint", str(run), "--data", str(data),
                 "--vocabulary", "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "compare_retrievers.json").read_text())
    results = report["results"]
    assert list(results) == ["CLIP (trained)", "classical BoF"]  # no pretrained weights: no zero-shot column
    assert set(results["CLIP (trained)"]) == set(results["classical BoF"])
    assert report["samples"]["train"] == 400 and report["samples"]["val"] == 100
    after = json.loads((run / "metrics.json").read_text())["after"]
    for key in ("t2i_R@1", "i2t_R@5", "zeroshot_top1", "candidate_f1"):
        assert results["CLIP (trained)"][key] == pytest.approx(after[f"retrieval/{key}"], abs=1e-6)
    table = (run / "compare_retrievers.md").read_text()
    assert "| fit_s |" in table and "classical BoF" in table and table in proc.stdout
    assert _run([sys.executable, "launch/compare_retrievers.py", "--checkpoint", str(run),
                 "--data", str(tmp_path / "nothing")]).returncode == 2
