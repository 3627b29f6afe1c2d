"""The ``torch-run`` backend of the Ray extraction job: a training run's final/ weights, in torch.

Importing this module registers the backend in ``serving.extract.BACKENDS``; serving itself stays
torch-free. ``launch/extract.py --run RUN_DIR`` imports it, and a pickled ``EncoderSpec("torch-run", ...)``
imports it in every Ray worker that unpickles the spec. Columns: the backbone's normalised image
embedding plus each head's ``extraction_outputs`` (named as its export's ``extraction`` metadata names
them), so both backends write the same columns. The run is rebuilt by ``training.runs.load_run``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.extract import EncoderSpec, register_backend
from shards.atomic import file_sha256
from training.runs import final_dir, load_run, rebuild_config

KIND = "torch-run"


def run_preprocess_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """open_clip's evaluation preprocessing for the run's model (and its pretrained tag's mean/std)."""
    import open_clip

    from training.backbone import register_model_configs

    model_cfg = rebuild_config(raw)["model"]
    register_model_configs(model_cfg["model_config_dir"])
    bare = open_clip.create_model(model_cfg["name"], pretrained=None)
    cfg = dict(open_clip.get_model_preprocess_cfg(bare))
    tag = raw["model"].get("pretrained")
    if tag and "/" not in tag and not tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
        pretrained = open_clip.get_pretrained_cfg(model_cfg["name"], tag)
        cfg.update({k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


_TRANSFORMS: dict[str, Any] = {}


def eval_transform(cfg: dict[str, Any]):
    """open_clip's evaluation transform, built once per worker process."""
    key = json.dumps(cfg, sort_keys=True)
    if key not in _TRANSFORMS:
        import open_clip

        _TRANSFORMS[key] = open_clip.image_transform(
            tuple(cfg["size"]), is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg.get("fill_color", 0))
    return _TRANSFORMS[key]


class TorchRunEncoder:
    """The torch weights of a run: the backbone's image embedding, plus each head's extraction outputs."""

    def __init__(self, final: Path, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model, self.backbone, raw = load_run(final, encoder_only=True)
        self._torch = torch
        size = run_preprocess_cfg(raw)["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        self._shapes = {k: v.shape[1:] for k, v in self.encode(np.zeros((1, 3, *size), np.float32)).items()}

    @classmethod
    def from_spec(cls, spec: EncoderSpec, threads: int = 1) -> "TorchRunEncoder":
        return cls(final_dir(spec.path), threads)

    @staticmethod
    def check(spec: EncoderSpec) -> None:
        final_dir(spec.path)

    @staticmethod
    def describe(spec: EncoderSpec) -> dict[str, Any]:
        final = final_dir(spec.path)
        config = json.loads((final / "config.json").read_text())
        return {"backend": KIND, "run": str(Path(spec.path).resolve()), "model": config["model"]["name"],
                "tasks": [t["name"] for t in config["tasks"]],
                "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
                "weights_sha256": file_sha256(final / "model.safetensors")}

    @staticmethod
    def preprocess_cfg(spec: EncoderSpec) -> dict[str, Any]:
        return run_preprocess_cfg(json.loads((final_dir(spec.path) / "config.json").read_text()))

    @staticmethod
    def image_transform(cfg: dict[str, Any]) -> Callable[[Any], np.ndarray]:
        transform = eval_transform(cfg)
        return lambda image: transform(image).numpy()

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            backbone = self.model.backbone
            out = {"image_embedding": torch.nn.functional.normalize(backbone.encode_image(x), dim=-1)}
            for head in self.model.heads.values():
                out.update(head.extraction_outputs(backbone, x))
        return {k: v.float().numpy() for k, v in out.items()}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        from training.knowledge import embed_texts

        return embed_texts(self.model.backbone, self.backbone.tokenizer, list(texts)).float().numpy()


register_backend(KIND, TorchRunEncoder)
