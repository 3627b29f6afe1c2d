"""Held-out evaluation shared by the trainer and ``launch/evaluate.py``."""
from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shards.samples import read_skip_logs, summarize_skips
from training.config import Config, ConfigError
from training.data import eval_loader, to_device
from training.model import MultiTaskModel, build_model

HELD_OUT_SKIPS = "held_out"  # <run>/skipped/held_out/<task>/: the held-out samples an evaluation skipped


@torch.no_grad()
def evaluate_model(model: MultiTaskModel, backbone, cfg: Config, shards=None, skip_dir: str | Path | None = None,
                   rank: int = 0) -> dict[str, float]:
    """Metrics of every task of ``model`` on ``shards`` (default: each task's val set).

    Keys are ``<task>/<metric>``. Every rank may call it; all compute the same numbers. Beside each task's
    metrics, ``<task>/skipped_samples``: the held-out samples this pass skipped (bad image, bad json, a
    field ``map_sample`` refused, ...). With ``skip_dir`` their records are written to
    ``skip_dir/<task>/skipped-rank<rank>-worker0.jsonl``, replaced on each pass (every pass reads the same
    samples, so the file holds one pass's skips, not one per evaluation); without it they are only logged.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    out = {}
    with tempfile.TemporaryDirectory(prefix="multiclip-eval-skips-") as scratch:
        for name, task in model.heads.items():
            folder = Path(skip_dir if skip_dir is not None else scratch) / name
            for stale in folder.glob(f"skipped-rank{rank}-worker*.jsonl"):
                stale.unlink()
            batch_size = min(cfg.eval.batch_size, cfg.eval.max_samples or cfg.eval.batch_size)
            batches = eval_loader(shards or cfg.val_shards(name), task, backbone, batch_size, error_log_dir=folder,
                                  rank=rank)
            if cfg.eval.max_samples:  # whole batches: the cap is rounded up to a multiple of batch_size
                batches = itertools.islice(batches, -(-cfg.eval.max_samples // batch_size))
            batches = (to_device(b, param.device) for b in batches)
            out.update({f"{name}/{k}": v for k, v in task.evaluate(model.backbone, batches).items()})
            out[f"{name}/skipped_samples"] = len(distinct_skips(read_skip_logs(folder)))
    model.train(was_training)
    return out


def distinct_skips(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per skipped sample: every rank reads the whole held-out set, so each rank's file names
    the same samples (and a file of a rank still writing holds a prefix of them)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for record in records:
        seen.setdefault((record.get("shard"), record.get("key"), record.get("reason")), record)
    return list(seen.values())


def held_out_skips(skip_dir: str | Path) -> dict[str, Any]:
    """``{"count", "by_reason", "by_task"}`` of the held-out skip logs under ``skip_dir`` (one folder per task)."""
    skip_dir = Path(skip_dir)
    by_task, every = {}, []
    for folder in sorted(p for p in skip_dir.glob("*") if p.is_dir()) if skip_dir.is_dir() else []:
        records = distinct_skips(read_skip_logs(folder))
        by_task[folder.name] = len(records)
        every += records
    return {**summarize_skips(every), "by_task": by_task}


def load_weights(model: MultiTaskModel, path: str | Path, allow_missing_heads: bool = False) -> None:
    """Load ``final/model.safetensors`` (or a run folder holding it) into ``model``, strictly.

    With ``allow_missing_heads``, heads absent from the file keep their initialisation (a run that adds
    a head to an earlier run's weights), and heads of tasks this model lacks are ignored (a head started
    on another task's backbone); the backbone and every shared head must still match exactly.
    """
    path = weights_path(path)
    state = load_file(str(path))
    own = model.state_dict()
    # only a scalar may change shape ([] <-> [1]: DeepSpeed's promoted logit scales); anything else must match
    state = {k: v.reshape(own[k].shape) if k in own and _promoted_scalar(v.shape, own[k].shape) else v
             for k, v in state.items()}
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


def _promoted_scalar(file_shape: torch.Size, own_shape: torch.Size) -> bool:
    """[] <-> [1] (or equal): the one reshape load_weights does; [1, 1], [6] -> [2, 3] and the like are refused."""
    return len(file_shape) <= 1 and len(own_shape) <= 1 and file_shape.numel() == own_shape.numel() == 1


def weights_path(path: str | Path) -> Path:
    """``final/model.safetensors`` of a run folder, ``model.safetensors`` of a final folder, or the file
    itself; FileNotFoundError naming where it looked."""
    given = Path(path)
    path = given
    if path.is_dir():
        path = path / "final" / "model.safetensors" if (path / "final").is_dir() else path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}" + (f" (from {given})" if path != given else ""))
    return path


def check_checkpoint(cfg: Config, checkpoint: str | Path) -> Path:
    """The weights file of ``checkpoint``, refused before any model is built when the run's own
    ``config.json`` beside it names another model than ``cfg`` builds (load_weights checks every tensor after)."""
    path = weights_path(checkpoint)
    saved = path.parent / "config.json"
    if saved.is_file():
        try:
            name = (json.loads(saved.read_text()).get("model") or {}).get("name")
        except (ValueError, AttributeError):
            name = None
        if name is not None and name != cfg.model.name:
            raise ConfigError(f"{path} holds weights of model {name!r} (its {saved.name} says so), but this config's "
                              f"model.name is {cfg.model.name!r}: evaluate it with the config it was trained with")
    return path


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path | None, shards=None,
                        skip_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate trained weights, or the configured (pretrained) backbone zero-shot if None.

    Raises ConfigError (weights of another model, or that do not fit this config's) or FileNotFoundError
    (no weights there) before any sample is read. ``skip_dir``: as :func:`evaluate_model`'s."""
    from training import accelerator

    if checkpoint is not None:
        checkpoint = check_checkpoint(cfg, checkpoint)
    torch.manual_seed(cfg.run.seed)  # as the trainer seeds before building: zero-shot scores its "before" model
    model, backbone = build_model(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.to(accelerator.current_device())  # the GPU of a GPU node, as in training
    accelerator.apply_precision(model, cfg.deepspeed.precision)
    return evaluate_model(model, backbone, cfg, shards, skip_dir=skip_dir)
