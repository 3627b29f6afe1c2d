"""meme exported to ONNX (frozen BERT, QI head; QC from the text tower) and served without torch.

A tiny meme run is trained for a few steps with the real launcher and exported with the real CLI;
every graph passes the parity check, the torch-free BERT tokenizer matches transformers', and each
caption's best meme by the fused score is the one PyTorch's model ranks first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_infer_cli, tiny_config
from conftest import _run, _train, _write_config


@pytest.fixture(scope="module")
def meme_export(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(shards, run, export): synthetic memes with their tiny BERT, a 12-step run, its export."""
    from shards.synth import generate

    base = tmp_path_factory.mktemp("onnx_meme")
    shards, run, export = base / "shards", base / "run", base / "export"
    generate(shards, task="meme", n_train=200, n_val=120, seed=0, shard_size=200, image_size=64)
    task = {"name": "meme", "options": {"bert": str(shards / "bert-tiny"), "heads": 8, "alpha": 0.6}}
    raw = tiny_config(shards, run, tasks=[task], optim={"max_steps": 12, "micro_batch_size": 32, "warmup_steps": 2},
                      schedule={"log_every": 10}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(base, raw))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return shards, run, export


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_meme_graphs_pass_parity_and_the_bert_tokenizer_matches(meme_export):
    from transformers import BertTokenizerFast

    from training.export.exporter import FP32_TOLERANCE
    from serving.infer import ExportedModel
    from serving.predictors.meme import meme_tokenizer

    shards, run, export = meme_export
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["tasks"]["meme"]["graphs"] == ["meme_emotion_encoder", "meme_qi"]
    assert set(manifest["graphs"]) == {"image_encoder", "text_encoder", "meme_emotion_encoder", "meme_qi"}
    for name, graph in manifest["graphs"].items():
        assert graph["max_abs_diff_fp32"] <= FP32_TOLERANCE, name
    meta = manifest["tasks"]["meme"]
    assert meta["alpha"] == 0.6 and meta["fusion"] == "shared_scale" and meta["logit_scale"] > 0
    assert "qi_logit_scale" not in meta and "qc_logit_scale" not in meta
    assert meta["emotion_tokenizer"] in manifest["files"]
    texts = ["happy", "angry sad surprised " * 20, "", "Fearful, DISGUSTED!"]  # one longer than max_length
    ours = meme_tokenizer(ExportedModel(export))(texts)
    theirs = BertTokenizerFast.from_pretrained(str(shards / "bert-tiny"))(
        texts, padding=True, truncation=True, max_length=meta["emotion_max_length"], return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


def _torch_ranking(run: Path, shards: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Keys of the held-out memes and PyTorch's [Q, G] branch scores (the task's own evaluation path)."""
    from training.runs import load_run
    from training.data import eval_loader
    from training.tasks.meme import branch_scores

    model, backbone, _ = load_run(run)
    task = model.heads["meme"]
    parts: dict[str, list[torch.Tensor]] = {"query": [], "context": [], "qi": []}
    keys: list[str] = []
    with torch.no_grad():
        for batch in eval_loader(str(shards / "val"), task, backbone, 200):
            for k, v in task.encode(backbone.model, batch).items():
                parts[k].append(v.float())
            keys += list(batch["key"])
    emb = {k: torch.cat(v) for k, v in parts.items()}
    return keys, branch_scores(emb, task.score_meta(task.fitted_alpha(backbone.model)))


def test_meme_cli_ranks_as_pytorch_without_importing_torch(meme_export, tmp_path):
    shards, run, export = meme_export
    run_infer_cli(["--model", str(export), "--shards", str(shards / "val"), "--out", str(tmp_path), "--providers", "cpu",
                   "--top-k", "3"], ("torch", "torchvision", "open_clip", "training", "transformers"))
    records = _jsonl(tmp_path / "meme.jsonl")
    keys, scores = _torch_ranking(run, shards)
    assert len(records) == len(keys) == 120 and all(len(r["results"]) == 3 for r in records)
    column = {k: j for j, k in enumerate(keys)}
    top2 = scores["fused"].topk(2, dim=1)
    margins = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    decided = [i for i, m in enumerate(margins) if m > 1e-3]
    assert len(decided) >= 0.9 * len(keys), "too many near-ties to compare"
    by_key = {r["key"]: r for r in records}
    wrong = [keys[i] for i in decided if column[by_key[keys[i]]["results"][0]["key"]] != int(top2.indices[i, 0])]
    assert not wrong, f"{len(wrong)} top-1 memes differ from PyTorch's, e.g. query {wrong[0]}"
    for i, key in enumerate(keys):  # the reported scores are the model's, branch by branch
        best = by_key[key]["results"][0]
        j = column[best["key"]]
        for branch in ("fused", "qi", "qc"):
            assert best[branch] == pytest.approx(float(scores[branch][i, j]), abs=1e-3), (key, branch)
