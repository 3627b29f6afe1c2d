"""Every registered task, through every registry: options, generator, export, predictor, torch parity.

Parametrized over ``training.registry.list_tasks()``, so a new task is checked the day it registers:
its synthetic generator writes a few samples, a fresh tiny model with the task exports (every graph
passes the exporter's parity check against torch), and its torch-free predictor serves every held-out
sample of the generator from the export, with image features equal to torch's on the same pixels.
The task-specific comparisons of predictions with PyTorch's live in tests/test_onnx_infer.py,
tests/test_onnx_meme.py and tests/test_sixth_task.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import export_untrained, tiny_config
from training.registry import get_task_class, list_tasks


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """task -> (shards, export folder, the torch backbone exported), made on first use."""
    made: dict[str, tuple[Path, Path, torch.nn.Module]] = {}

    def make(task: str) -> tuple[Path, Path, torch.nn.Module]:
        if task not in made:
            made[task] = _export_fresh_model(tmp_path_factory.mktemp(task), task)
        return made[task]

    return make


def _export_fresh_model(base: Path, task: str) -> tuple[Path, Path, torch.nn.Module]:
    from shards.synth import generate, get_synth
    from training.validation import config_from_dict

    shards = base / "shards"
    generate(shards, task=task, n_train=4, n_val=6, seed=0, shard_size=10, image_size=64)
    options = get_synth(task).run_options(shards) if get_synth(task).run_options else {}
    cfg = config_from_dict(tiny_config(shards, base / "run", tasks=[{"name": task, "options": options}]))
    return shards, base / "export", export_untrained(cfg, base / "export").model


@pytest.mark.parametrize("task", list_tasks())
def test_task_is_complete_in_every_registry(task):
    from serving.predictors import get_predictor
    from shards.synth import get_synth

    cls = get_task_class(task)
    assert isinstance(cls.Options.model_validate({}), cls.Options)
    assert cls.exports_onnx(), f"{task}: no export_onnx"
    assert get_predictor(task).task == task
    assert callable(get_synth(task).make_sample)


@pytest.mark.parametrize("task", list_tasks())
def test_export_then_torch_free_inference_round_trip(task, exports, tmp_path):
    from serving.infer import ExportedModel, infer, shard_items
    from serving.runtime import RuntimeOptions
    from training.export.exporter import FP32_TOLERANCE

    shards, export, _ = exports(task)
    manifest = json.loads((export / "manifest.json").read_text())
    assert task in manifest["tasks"]
    for name in manifest["tasks"][task].get("graphs", []):
        assert manifest["graphs"][name]["max_abs_diff_fp32"] <= FP32_TOLERANCE, name
    model = ExportedModel(export, RuntimeOptions(providers=("cpu",)))
    summary = infer(model, shard_items(str(shards / "val")), [task], tmp_path, batch_size=4)
    assert summary["errors"] == 0 and summary["predicted"] == summary["items"] == 6, summary
    records = [json.loads(line) for line in (tmp_path / f"{task}.jsonl").read_text().splitlines()]
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    assert all(set(r) - {"key", "source"} for r in records), f"{task}: records carry no prediction"


def test_image_tower_serves_torchs_features_on_the_same_pixels(exports):
    """The link every predictor shares: NumPy preprocessing + the exported tower == torch's encode_image."""
    from serving.infer import ExportedModel, shard_items
    from serving.items import load_pixels

    shards, export, clip = exports("time" if "time" in list_tasks() else list_tasks()[0])
    model = ExportedModel(export)
    items = [it for it in shard_items(str(shards / "val")) if it.data][:4]
    pixels = np.stack([load_pixels(it, model.preprocess) for it in items])
    with torch.no_grad():
        theirs = clip.encode_image(torch.from_numpy(pixels)).numpy()
    assert np.abs(model.image_features(pixels) - theirs).max() < 1e-4
