"""Torch-free batch inference on the exported run matches the PyTorch evaluation of the same run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_infer_cli
from conftest import trained_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, retrieval_shards, time_shards, geo_shards):
    return trained_export(tmp_path_factory, retrieval_shards, time_shards, geo_shards)


@pytest.fixture(scope="module")
def torch_model(exported):
    from training.runs import load_run

    run, _ = exported
    return load_run(run)


@pytest.fixture(scope="module")
def onnx_model(exported):
    from serving.infer import ExportedModel
    from serving.runtime import RuntimeOptions

    return ExportedModel(exported[1], RuntimeOptions(providers=("cpu",)))


def _after(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["after"]


def _torch_batches(torch_model, task: str, shards: Path):
    from training.data import eval_loader

    model, backbone, _ = torch_model
    return eval_loader(str(shards / "val"), model.heads[task], backbone, 200)


def _items(shards: Path):
    from serving.infer import shard_items

    return list(shard_items(str(shards / "val")))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_where_decided(ours: list, theirs: list, margins: list[float], what: str) -> None:
    """Identical predictions, except where torch's best two scores are within float noise."""
    decided = [i for i, m in enumerate(margins) if m > 1e-4]
    assert len(decided) >= 0.9 * len(margins), f"{what}: too many near-ties to compare"
    wrong = [i for i in decided if ours[i] != theirs[i]]
    assert not wrong, f"{what}: {len(wrong)} predictions differ, e.g. item {wrong[0]}: {ours[wrong[0]]} vs {theirs[wrong[0]]}"


def _margin(scores: torch.Tensor) -> list[float]:
    top2 = scores.float().topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def test_time_predictions_and_metrics_match_pytorch(exported, torch_model, onnx_model, time_shards, tmp_path):
    from serving.infer import infer
    from training.tasks.time_of_day import score_time

    run, _ = exported
    summary = infer(onnx_model, _items(time_shards), ["time"], tmp_path, batch_size=64)
    assert summary["errors"] == 0 and summary["predicted"] == 200
    records = _jsonl(tmp_path / "time.jsonl")
    task = torch_model[0].heads["time"]
    with torch.no_grad():
        parts = [(task._logits(task.embed_images(torch_model[0].backbone, b["image"])), b) for b in _torch_batches(torch_model, "time", time_shards)]
    hour = torch.cat([p["hour"] for p, _ in parts])
    _assert_same_where_decided([r["hour_bin"] for r in records], hour.argmax(1).tolist(), _margin(hour), "hour")
    month = torch.cat([p["month"] for p, _ in parts])
    _assert_same_where_decided([r["month"] - 1 for r in records], month.argmax(1).tolist(), _margin(month), "month")
    # metrics from the ONNX graphs' outputs, by the training side's own metric function
    items = _items(time_shards)
    pixels = np.stack([onnx_model.preprocess(Image.open(__import__("io").BytesIO(it.data))) for it in items])
    out = onnx_model.session("time_head").run(image_features=onnx_model.image_features(pixels))
    minutes = torch.tensor([it.meta["hour"] * 60 + it.meta.get("minute", 30) for it in items])
    ours = score_time({"hour": torch.from_numpy(out["hour_logits"]), "month": torch.from_numpy(out["month_logits"]),
                       "image": torch.from_numpy(out["time_embedding"]), "minutes": minutes,
                       "month_true": torch.tensor([it.meta["month"] - 1 for it in items])}, task.options)
    after = _after(run)
    for key, value in ours.items():
        # image-to-image retrieval ranks packed similarities after 12 steps (3rd and 4th candidates within
        # 1e-6 for a third of the queries), so fp32 noise between the runtimes moves a few top-k sets
        tolerance = 0.05 if key.startswith("retrieval") else 0.011  # else: at most 2 near-tie items of 200
        assert value == pytest.approx(after[f"time/{key}"], abs=tolerance), key


def test_int8_towers_predict_like_fp32(exported, onnx_model, time_shards, tmp_path):
    """The int8 towers (export --int8) give the fp32 graphs' hour predictions wherever fp32 is decided."""
    from serving.infer import ExportedModel, infer
    from serving.runtime import RuntimeOptions

    int8_model = ExportedModel(exported[1], RuntimeOptions(providers=("cpu",), int8=True))
    assert int8_model.session("image_encoder").path.name == "image_encoder.int8.onnx"
    for name, model in (("fp32", onnx_model), ("int8", int8_model)):
        infer(model, _items(time_shards), ["time"], tmp_path / name, batch_size=64)
    fp32, int8 = _jsonl(tmp_path / "fp32" / "time.jsonl"), _jsonl(tmp_path / "int8" / "time.jsonl")
    same = np.mean([a["hour_bin"] == b["hour_bin"] for a, b in zip(fp32, int8)])
    assert len(int8) == len(fp32) == 200 and same >= 0.95, same


def test_retrieval_gallery_and_metrics_match_pytorch(exported, torch_model, onnx_model, retrieval_shards, tmp_path):
    from serving.infer import Settings, answer_queries, infer
    from serving.predictors.retrieval import class_embeddings
    from training.tasks.retrieval import score_retrieval

    run, _ = exported
    items = _items(retrieval_shards)
    infer(onnx_model, items, ["retrieval"], tmp_path / "images")
    gallery = np.load(tmp_path / "images" / "gallery" / "embeddings.npy")
    task = torch_model[0].heads["retrieval"]
    with torch.no_grad():
        emb = task.embed(torch_model[0].backbone, _torch_batches(torch_model, "retrieval", retrieval_shards))
    assert np.abs(gallery - emb["image"].numpy()).max() < 1e-4
    captions = [it.meta["caption"] for it in items]
    labels = [it.meta.get("label", it.meta["caption"]) for it in items]
    classes = sorted(set(labels))
    ours = score_retrieval({"image": torch.from_numpy(gallery), "text": torch.from_numpy(onnx_model.text_embeddings(captions)),
                            "caption": captions, "label": labels},
                           torch.from_numpy(class_embeddings(onnx_model, classes, list(task.options.templates))),
                           classes, task.options)
    after = _after(run)
    for key, value in ours.items():
        assert value == pytest.approx(after[f"retrieval/{key}"], abs=0.011), key
    # text queries against the gallery: the same ranking as torch's text->image similarities
    answer_queries(onnx_model, captions[:20], tmp_path / "queries", ["retrieval"],
                   Settings(top_k=5, options={"gallery": tmp_path / "images" / "gallery"}))
    results = _jsonl(tmp_path / "queries" / "retrieval.jsonl")
    sim = emb["text"][:20] @ emb["image"].T
    keys = [it.key for it in items]
    margins = _margin(sim)
    _assert_same_where_decided([r["results"][0]["key"] for r in results], [keys[i] for i in sim.argmax(1).tolist()],
                               margins, "text->image top-1")


def test_geo_time_predictions_and_metrics_match_pytorch(exported, torch_model, onnx_model, geo_shards, tmp_path):
    from serving.infer import Settings, infer
    from training.tasks.geo_time import QUANTITIES, score_predictions

    run, _ = exported
    items = _items(geo_shards)
    golds = {q: [it.meta[f"gold_{q}"] for it in items] for q in QUANTITIES}
    candidates = {q: sorted(set(g)) for q, g in golds.items()}  # TARA: the evaluated set's labels
    infer(onnx_model, items, ["geo_time"], tmp_path, Settings(options={"geo_labels": candidates}))
    records = _jsonl(tmp_path / "geo_time.jsonl")
    after = _after(run)
    model, backbone, _ = torch_model
    task = model.heads["geo_time"]
    task.prepare(model.backbone, cache=False)
    for q in QUANTITIES:
        cand = task.label_embeddings(model.backbone, q, candidates[q])
        base, fused = [], []
        with torch.no_grad():
            for batch in _torch_batches(torch_model, "geo_time", geo_shards):
                image, tokens = task.encode(model.backbone, batch["image"])
                base.append((tokens[q] @ cand.T).amax(dim=1))
                fused.append(task.knowledge_scores(q, tokens[q], task.fuse_knowledge(q, image, tokens[q]), cand))
        for name, scores in (("base", torch.cat(base)), ("knowledge", torch.cat(fused))):
            ours = [r[f"{q}_{name}"] for r in records]
            _assert_same_where_decided(ours, [candidates[q][i] for i in scores.argmax(1).tolist()], _margin(scores), f"{q} {name}")
            for key, value in score_predictions(q, ours, golds[q], name).items():
                assert value == pytest.approx(after[f"geo_time/{key}"], abs=0.011), key


def test_bad_image_is_reported_and_the_batch_goes_on(onnx_model, tmp_path):
    from serving.infer import folder_items, infer

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 60), (60 * i, 100, 200)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    summary = infer(onnx_model, folder_items(folder), ["time", "retrieval"], tmp_path / "out", batch_size=4)
    assert summary == {"items": 4, "predicted": 3, "errors": 1, "tasks": ["time", "retrieval"]}
    errors = _jsonl(tmp_path / "out" / "errors.jsonl")
    assert [e["key"] for e in errors] == ["broken.jpg"] and errors[0]["error"].startswith("bad_image")
    assert [r["key"] for r in _jsonl(tmp_path / "out" / "time.jsonl")] == ["ok0.png", "ok1.png", "ok2.png"]


def test_inference_cli_imports_no_torch(exported, time_shards, tmp_path):
    """launch/infer.py end to end in a fresh interpreter: predictions written, torch never imported."""
    _, export = exported
    proc = run_infer_cli(["--model", str(export), "--shards", str(time_shards / "val" / "shard-000000.tar"), "--out", str(tmp_path)],
                         ("torch", "torchvision", "open_clip", "training"))
    assert len(_jsonl(tmp_path / "time.jsonl")) == 200 and len(_jsonl(tmp_path / "geo_time.jsonl")) == 200
    import onnxruntime as ort

    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):  # one clear line per missing provider
        if provider not in ort.get_available_providers():
            assert proc.stderr.count(f"has no {provider}") == 1, proc.stderr[-2000:]
