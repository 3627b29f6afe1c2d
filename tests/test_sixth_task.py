"""A sixth task, defined here and registered from outside the tree, runs the whole pipeline.

The toy task (``toy_colour``: name an image's background colour) is three small modules written by this
test into a temporary folder: its training head, its torch-free predictor and its synthetic generator.
``MULTICLIP_PLUGINS`` names them, so no file of the project is edited. It then goes synth -> the real
``deepspeed`` launcher (2 CPU ranks) -> export -> torch-free inference, and the predictions served
from ONNX score what the torch evaluation scored, well above the majority class.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from conftest import _run, _train, _write_config, run_infer_cli, tiny_config

TASK = "toy_colour"
COLOURS = ("red", "green", "blue", "yellow")

TOY_DATA = '''
"""Synthetic data of the toy task: a solid background colour (the label), a few grey squares, noise."""
import numpy as np
from PIL import Image

from shards.synth import SynthTask, register_synth
from shards.writer import encode_image

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "yellow": (210, 200, 40)}


def describe(seed):
    return {"classes": list(COLOURS)}


def make_sample(rng, split, image_size, task_meta):
    label = rng.choice(task_meta["classes"])
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 25, (image_size, image_size, 3))
    pixels = np.clip(np.array(COLOURS[label], np.float32) + noise, 0, 255).astype(np.uint8)
    for _ in range(3):
        x, y = rng.randrange(image_size - 12), rng.randrange(image_size - 12)
        pixels[y:y + 12, x:x + 12] = rng.randrange(60, 200)
    return {"png": encode_image(Image.fromarray(pixels), "png")}, {"caption": f"a {label} picture", "label": label}


register_synth("toy_colour", SynthTask(describe=describe, make_sample=make_sample))
'''

TOY_HEAD = '''
"""Training side of the toy task: a linear classifier on the shared image features."""
import torch
import torch.nn.functional as F
from torch import nn

from training.export.graph import Graph, HeadExport
from training.registry import register_task
from training.tasks.base import Task, TaskOptions


class ToyOptions(TaskOptions):
    classes: tuple[str, ...] = ("red", "green", "blue", "yellow")
    logit_scale: float = 10.0


@register_task("toy_colour")
class ToyColourTask(Task):
    Options = ToyOptions
    headline_metrics = ("accuracy",)

    def __init__(self, options, backbone):
        super().__init__(options, backbone)
        self.classifier = nn.Linear(backbone.embed_dim, len(options.classes))

    def map_sample(self, sample, backbone, train):
        label = self.options.classes.index(sample["json"]["label"])
        preprocess = backbone.preprocess_train if train else backbone.preprocess_val
        return {"task": self.name, "image": preprocess(sample["image"]), "key": sample["__key__"], "label": label}

    def logits(self, image_features):
        return self.options.logit_scale * self.classifier(F.normalize(image_features, dim=-1))

    def training_forward(self, backbone, batch):
        logits = self.logits(backbone(image=batch["image"])["image_features"])
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        return {"toy_loss": F.cross_entropy(logits.float(), batch["label"])}, {"toy_acc": accuracy}

    @torch.no_grad()
    def evaluate(self, backbone, batches):
        right = total = 0
        for batch in batches:
            pred = self.logits(backbone(image=batch["image"])["image_features"]).argmax(1)
            right += int((pred == batch["label"]).sum())
            total += len(pred)
        return {"accuracy": right / max(total, 1)}

    def export_onnx(self, backbone, features):
        graph = Graph("toy_colour_head", ToyHead(self), {"image_features": features}, ["logits"])
        return HeadExport([graph], meta={"classes": list(self.options.classes)})


class ToyHead(nn.Module):
    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, image_features):
        return self.task.logits(image_features)
'''

TOY_SERVE = '''
"""Serving side of the toy task: imports no torch."""
from serving.predictors import Predictor, register_predictor


@register_predictor("toy_colour")
class ToyColourPredictor(Predictor):
    def predict(self, batch):
        logits = self.model.session("toy_colour_head").run(image_features=batch.features)["logits"]
        return [{"label": self.meta["classes"][int(i)]} for i in logits.argmax(axis=1)]
'''


def _plugins(folder: Path) -> dict[str, str]:
    folder.mkdir()
    for name, source in (("toy_data", TOY_DATA), ("toy_head", TOY_HEAD), ("toy_serve", TOY_SERVE)):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return {"PYTHONPATH": str(folder), "MULTICLIP_PLUGINS": "synth:toy_data,tasks:toy_head,predictors:toy_serve"}


def test_a_sixth_task_registered_from_outside_runs_synth_train_export_infer(tmp_path):
    env = _plugins(tmp_path / "plugins")
    data, run, export, preds = tmp_path / "data", tmp_path / "run", tmp_path / "export", tmp_path / "preds"
    proc = _run([sys.executable, "-m", "shards.synth", "--task", TASK, "--out", str(data), "--train", "800",
                 "--val", "200", "--shard-size", "100", "--image-size", "48"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = tiny_config(data, run, tasks=[{"name": TASK}], eval={"max_samples": None, "batch_size": 100},
                      optim={"max_steps": 40, "micro_batch_size": 16, "lr_backbone": 1e-3, "lr_head": 1e-2,
                             "warmup_steps": 2}, schedule={"log_every": 10})
    proc = _train(_write_config(tmp_path, raw), ranks=2, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = json.loads((run / "metrics.json").read_text())["after"][f"{TASK}/accuracy"]
    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in json.loads((export / "manifest.json").read_text())["tasks"]

    run_infer_cli(["--model", str(export), "--shards", str(data / "val"), "--out", str(preds), "--providers", "cpu"],
                  ("torch", "torchvision", "open_clip", "training", "deepspeed"), env=env)
    records = [json.loads(line) for line in (preds / f"{TASK}.jsonl").read_text().splitlines()]
    gold = _gold_labels(data / "val")
    assert len(records) == len(gold) == 200
    served = sum(r["label"] == gold[r["key"]] for r in records) / len(records)
    majority = max(list(gold.values()).count(c) for c in COLOURS) / len(gold)
    assert served >= majority + 0.3, (served, majority)  # learnt, on held-out data, well above the majority class
    assert abs(served - trained) <= 1.5 / len(gold), (served, trained)  # ONNX serves what torch evaluated


def _gold_labels(shards: Path) -> dict[str, str]:
    from serving.items import shard_items

    return {it.key: it.meta["label"] for it in shard_items(str(shards))}
