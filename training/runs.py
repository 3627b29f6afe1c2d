"""A finished training run, rebuilt: the one way export, the jobs, Grad-CAM and the benchmarks load a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.validation import config_from_dict
from training.evaluation import load_weights
from training.backbone import Backbone
from training.model import MultiTaskModel, build_model
from training.registry import get_task_class
from training.shipped import resolve_model_config_dir


def final_dir(run_dir: str | Path) -> Path:
    """A run's ``final/`` folder (``run_dir`` may be it; an fsspec URL is downloaded once, see
    :func:`training.remote_runs.fetch_final`); FileNotFoundError if the run did not finish."""
    from shards.samples import is_url
    from training.remote_runs import fetch_final

    if is_url(str(run_dir)):
        return final_dir(fetch_final(str(run_dir)))
    path = Path(run_dir)
    final = path / "final" if (path / "final").is_dir() else path
    if not (final / "config.json").is_file() or not (final / "model.safetensors").is_file():
        raise FileNotFoundError(f"{final}: expected config.json and model.safetensors (a finished training run)")
    return final


def rebuild_config(raw: dict[str, Any], encoder_only: bool = False) -> dict[str, Any]:
    """The run's config for rebuilding it: no pretrained tag or init weights (the final weights replace
    them, so nothing is downloaded), model configs found from the repository too, and with
    ``encoder_only`` each task's :attr:`~training.tasks.base.Task.encoder_only_options` applied."""
    raw = json.loads(json.dumps(raw))
    raw["model"] = {**raw["model"], "pretrained": None, "init_weights": None}
    model_dir = resolve_model_config_dir(raw["model"].get("model_config_dir", "configs/models"))
    raw["model"]["model_config_dir"] = str(model_dir)
    if encoder_only:
        for task in raw["tasks"]:
            task["options"] = {**task.get("options", {}), **get_task_class(task["name"]).encoder_only_options}
    return raw


def load_run(run_dir: str | Path, encoder_only: bool = False) -> tuple[MultiTaskModel, Backbone, dict[str, Any]]:
    """The model of a training run (eval mode), rebuilt from ``final/config.json`` and ``final/model.safetensors``.

    The one way export, the torch extraction backend, Grad-CAM, the classical comparison and the
    benchmarks load a run. ``encoder_only``: leave out what only training reads (see
    :func:`rebuild_config`). Returns (model, backbone, the raw config as used).
    """
    final = final_dir(run_dir)
    raw = rebuild_config(json.loads((final / "config.json").read_text()), encoder_only)
    cfg = config_from_dict(raw, source=str(final / "config.json"))
    model, backbone = build_model(cfg)
    load_weights(model, final / "model.safetensors")
    model.eval()
    return model, backbone, raw
