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
