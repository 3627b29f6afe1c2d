"""A finished training run, rebuilt: the one way export, Grad-CAM and the benchmarks load a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.config import config_from_dict
from training.evaluation import load_weights
from training.backbone import Backbone
from training.model import MultiTaskModel, build_model


def load_run(run_dir: str | Path) -> tuple[MultiTaskModel, Backbone, dict[str, Any]]:
    """The model of a training run (eval mode), rebuilt from ``final/config.json`` and ``final/model.safetensors``.

    The backbone is built without its pretrained tag (the run's own weights replace it), so loading a run
    needs no download. Returns (model, backbone, the raw config as used).
    """
    final = Path(run_dir) / "final"
    if not (final / "config.json").is_file() or not (final / "model.safetensors").is_file():
        raise FileNotFoundError(f"{final}: expected config.json and model.safetensors (a finished training run)")
    raw = json.loads((final / "config.json").read_text())
    raw["model"] = {**raw["model"], "pretrained": None, "init_weights": None}
    cfg = config_from_dict(raw, source=str(final / "config.json"))
    model, backbone = build_model(cfg)
    load_weights(model, final / "model.safetensors")
    model.eval()
    return model, backbone, raw
