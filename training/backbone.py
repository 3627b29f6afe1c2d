"""The shared open_clip backbone, built only through ``open_clip.create_model_and_transforms``.

An open_clip model name with a pretrained tag, a name with a local checkpoint path, or a tiny JSON
config from ``configs/models`` registered with open_clip's own ``add_model_config`` (the shipped copy when
the working directory has none: :func:`training.shipped.resolve_model_config_dir`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn

from training.config import ConfigError, ModelConfig
from training.shipped import resolve_model_config_dir

_registered_dirs: set[str] = set()


def register_model_configs(config_dir: str | Path) -> None:
    """Register every ``*.json`` in ``config_dir`` with open_clip (keyed by file stem).

    open_clip silently skips JSON files that lack its required keys, so we check that each one
    really appears in ``open_clip.list_models()``. A relative ``config_dir`` missing from the working
    directory is looked up in the package's own folder (the default ``configs/models``: the shipped JSONs).
    """
    config_dir = resolve_model_config_dir(config_dir)
    if str(config_dir.resolve()) in _registered_dirs or not config_dir.is_dir():
        return
    open_clip.add_model_config(config_dir)
    missing = [p.stem for p in config_dir.glob("*.json") if p.stem not in open_clip.list_models()]
    if missing:
        raise ConfigError(f"{config_dir}: open_clip rejected model config(s) {missing} "
                          "(each needs embed_dim, vision_cfg and text_cfg)")
    _registered_dirs.add(str(config_dir.resolve()))


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def check_model_config(cfg: ModelConfig) -> None:
    """Fail before any work if the model name or pretrained tag/path cannot be resolved."""
    register_model_configs(cfg.model_config_dir)
    name = cfg.name
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        config_dir = resolve_model_config_dir(cfg.model_config_dir)
        where = config_dir if config_dir.is_dir() else \
            f"{cfg.model_config_dir} (model.model_config_dir: no such directory)"
        raise ConfigError(f"model.name: unknown open_clip model {name!r} "
                          f"(add a JSON to {where} or use one of open_clip.list_models())")
    if cfg.pretrained is None or name.startswith(("hf-hub:", "local-dir:")):
        return
    if _looks_like_path(cfg.pretrained):
        if not Path(cfg.pretrained).is_file():
            raise ConfigError(f"model.pretrained: checkpoint file not found: {cfg.pretrained}")
    elif cfg.pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ConfigError(f"model.pretrained: {name!r} has no pretrained tag {cfg.pretrained!r}; "
                          f"known: {open_clip.list_pretrained_tags_by_model(name)}")


@dataclass(frozen=True)
class SampleContext:
    """What a task's ``map_sample`` may use in the data workers: transforms and tokenizer, not the model."""

    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    embed_dim: int


@dataclass(frozen=True)
class Backbone:
    """The open_clip model with what data workers need to turn samples into tensors."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    embed_dim: int

    def sample_context(self) -> SampleContext:
        """The part the data workers receive (so no copy of the model travels to them)."""
        return SampleContext(self.preprocess_train, self.preprocess_val, self.tokenizer, self.embed_dim)


def create_backbone(cfg: ModelConfig) -> Backbone:
    """Build the open_clip backbone from a model name + pretrained tag or local checkpoint.

    Args:
        cfg: the ``model`` section of the run config.
    Returns:
        A :class:`Backbone`; the model returns dicts (``output_dict=True``).
    """
    check_model_config(cfg)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        cfg.name, pretrained=cfg.pretrained, output_dict=True
    )
    tokenizer = open_clip.get_tokenizer(cfg.name)
    embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") and \
        model.text_projection is not None else int(model.visual.output_dim)
    return Backbone(model, preprocess_train, preprocess_val, tokenizer, embed_dim)


# --------------------------------------------------------------------------- model.compile


def compile_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The towers' transformer trunks (where the FLOPs are), by their names in the model.

    The trunks rather than whole towers, because some heads call a trunk directly (geo_time's extra
    [CLS] tokens run ``visual.transformer``, meme's token states the text ``transformer``); a tower
    without a trunk (a ResNet image tower, an HF text tower) is compiled whole.
    """
    found: dict[str, nn.Module] = {}
    for tower_name in ("visual", "text"):
        tower = getattr(model, tower_name, None)
        if isinstance(tower, nn.Module):
            trunk = getattr(tower, "transformer", None)
            found[f"{tower_name}.transformer" if isinstance(trunk, nn.Module) else tower_name] = \
                trunk if isinstance(trunk, nn.Module) else tower
    if isinstance(getattr(model, "transformer", None), nn.Module):  # CLIP's built-in text trunk
        found["transformer"] = model.transformer
    return found


def compile_towers(model: nn.Module, backend: str = "inductor") -> list[str]:
    """``torch.compile`` each tower trunk's ``forward`` for training; returns the compiled names.

    Only the bound ``forward`` is replaced (an instance attribute), so parameter and state-dict names,
    DeepSpeed's wrapping and hooks on the trunk (bf16 autocast, ZeRO) are unchanged and run eagerly
    around it. The compiled graph runs only in training mode with gradients on: evaluation, ``no_grad``
    feature extraction and ONNX export (``torch.export`` traces eval-mode modules) take the eager
    ``forward``, so they neither recompile for other shapes nor trace through dynamo.
    :func:`uncompile_towers` puts the eager ``forward`` back.
    """
    names = []
    for name, module in compile_targets(model).items():
        if "forward" in vars(module):  # already compiled
            continue
        module.forward = _training_dispatch(module, module.forward, torch.compile(module.forward, backend=backend))
        names.append(name)
    return names


def uncompile_towers(model: nn.Module) -> None:
    """Undo :func:`compile_towers` (the class's eager ``forward`` again)."""
    for module in compile_targets(model).values():
        vars(module).pop("forward", None)


def is_compiled(module: nn.Module) -> bool:
    return getattr(vars(module).get("forward"), "compiled", None) is not None


def _training_dispatch(module: nn.Module, eager: Callable, compiled: Callable) -> Callable:
    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled() and not torch.compiler.is_exporting():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    forward.compiled = compiled  # type: ignore[attr-defined]
    return forward
