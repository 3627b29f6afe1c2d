"""Held-out evaluation shared by the trainer and ``launch/evaluate.py``."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from training.config import Config, ConfigError
from training.data import eval_loader, to_device
from training.model import MultiTaskModel, build_model


@torch.no_grad()
def evaluate_model(model: MultiTaskModel, backbone, cfg: Config, shards=None) -> dict[str, float]:
    """Metrics of every task of ``model`` on ``shards`` (default: each task's val set).

    Keys are ``<task>/<metric>``. Every rank may call it; all compute the same numbers.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    out = {}
    for name, task in model.heads.items():
        batch_size = min(cfg.eval.batch_size, cfg.eval.max_samples or cfg.eval.batch_size)
        batches = eval_loader(shards or cfg.val_shards(name), task, backbone, batch_size)
        if cfg.eval.max_samples:  # whole batches: the cap is rounded up to a multiple of batch_size
            batches = itertools.islice(batches, -(-cfg.eval.max_samples // batch_size))
        batches = (to_device(b, param.device) for b in batches)
        out.update({f"{name}/{k}": v for k, v in task.evaluate(model.backbone, batches).items()})
    model.train(was_training)
    return out


def load_weights(model: MultiTaskModel, path: str | Path, allow_missing_heads: bool = False) -> None:
    """Load ``final/model.safetensors`` (or a run folder holding it) into ``model``, strictly.

    With ``allow_missing_heads``, heads absent from the file keep their initialisation (a run that adds
    a head to an earlier run's weights), and heads of tasks this model lacks are ignored (a head started
    on another task's backbone); the backbone and every shared head must still match exactly.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "final" / "model.safetensors" if (path / "final").is_dir() else path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    state = load_file(str(path))
    own = model.state_dict()
    # only a scalar may change shape ([] <-> [1]: DeepSpeed's promoted logit scales); anything else must match
    state = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() == 1 else v for k, v in state.items()}
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ConfigError(f"{path} does not fit this config's model ({len(mismatched)} shape mismatch(es), e.g. "
                          f"{'; '.join(mismatched[:3])}): weights of another model or config?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if allow_missing_heads:
        missing = [k for k in missing if not k.startswith("heads.")]
        unexpected = [k for k in unexpected if not (k.startswith("heads.") and k.split(".")[1] not in model.heads)]
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit this config's model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path | None, shards=None) -> dict[str, Any]:
    """Evaluate trained weights, or the configured (pretrained) backbone zero-shot if None."""
    from training import accelerator

    model, backbone = build_model(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.to(accelerator.current_device())  # the GPU of a GPU node, as in training
    accelerator.apply_precision(model, cfg.deepspeed.precision)
    return evaluate_model(model, backbone, cfg, shards)
