"""The shared open_clip backbone and the multi-task model that carries one head per task.

The backbone is only ever built through ``open_clip.create_model_and_transforms``: an open_clip
model name with a pretrained tag, a name with a local checkpoint path, or a tiny JSON config from
``configs/models`` registered with open_clip's own ``add_model_config``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from training.config import Config, ConfigError, ModelConfig

_registered_dirs: set[str] = set()


def register_model_configs(config_dir: str | Path) -> None:
    """Register every ``*.json`` in ``config_dir`` with open_clip (keyed by file stem).

    open_clip silently skips JSON files that lack its required keys, so we check that each one
    really appears in ``open_clip.list_models()``.
    """
    config_dir = Path(config_dir)
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
        raise ConfigError(f"model.name: unknown open_clip model {name!r} "
                          f"(add a JSON to {cfg.model_config_dir} or use one of open_clip.list_models())")
    if cfg.pretrained is None or name.startswith(("hf-hub:", "local-dir:")):
        return
    if _looks_like_path(cfg.pretrained):
        if not Path(cfg.pretrained).is_file():
            raise ConfigError(f"model.pretrained: checkpoint file not found: {cfg.pretrained}")
    elif cfg.pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ConfigError(f"model.pretrained: {name!r} has no pretrained tag {cfg.pretrained!r}; "
                          f"known: {open_clip.list_pretrained_tags_by_model(name)}")


@dataclass(frozen=True)
class Backbone:
    """The open_clip model with what data workers need to turn samples into tensors."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    embed_dim: int


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


class MultiTaskModel(nn.Module):
    """The shared backbone plus one head per task; ``forward`` dispatches a batch to its task.

    A batch carries a ``task`` name; the loss is the task's loss weight times the sum of the
    task's ``*_loss`` entries, which is what DeepSpeed's ``engine.backward`` receives.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], loss_weights: dict[str, float]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = dict(loss_weights)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        task = batch["task"]
        losses, report = self.heads[task](self.backbone, batch)
        total = sum(v for k, v in losses.items() if k.endswith("_loss")) * self.loss_weights[task]
        # detached tensors, not floats: the trainer fetches them once per logging step
        report = {**{f"{task}/{k}": v.detach() for k, v in losses.items()},
                  **{f"{task}/{k}": v.detach() if isinstance(v, torch.Tensor) else v for k, v in report.items()}}
        return total, report


def build_model(cfg: Config) -> tuple[MultiTaskModel, Backbone]:
    """Backbone + the heads named in the config, ready for ``deepspeed.initialize``."""
    from training.registry import get_task_class

    backbone = create_backbone(cfg.model)
    heads = {}
    for task_cfg in cfg.tasks:
        cls = get_task_class(task_cfg.name)
        heads[task_cfg.name] = cls(cls.Options.model_validate(task_cfg.options), backbone)
    weights = {t.name: t.loss_weight for t in cfg.tasks}
    return MultiTaskModel(backbone.model, heads, weights), backbone


def _tower_parts(backbone: nn.Module, tower: str) -> tuple[list[nn.Module | nn.Parameter], nn.ModuleList]:
    """(embedding parts, transformer blocks) of an open_clip ViT image or text tower."""
    if tower == "vision":
        visual = backbone.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        embeds = [getattr(visual, n) for n in ("conv1", "class_embedding", "positional_embedding", "ln_pre")
                  if getattr(visual, n, None) is not None]
    else:
        blocks = getattr(getattr(backbone, "transformer", None), "resblocks", None)
        embeds = [getattr(backbone, n) for n in ("token_embedding", "positional_embedding")
                  if getattr(backbone, n, None) is not None]
    if blocks is None:
        raise ConfigError(f"optim.freeze_{tower}_blocks: the {tower} tower of this backbone has no "
                          "transformer blocks (only open_clip ViT towers are supported)")
    return embeds, blocks


def freeze_first_blocks(backbone: nn.Module, vision_blocks: int, text_blocks: int) -> None:
    """Lock the embeddings and the first N transformer blocks of each tower."""
    for tower, n in (("vision", vision_blocks), ("text", text_blocks)):
        if n == 0:
            continue
        embeds, blocks = _tower_parts(backbone, tower)
        if n > len(blocks):
            raise ConfigError(f"optim.freeze_{tower}_blocks={n}, but the {tower} tower has {len(blocks)} blocks")
        for part in [*embeds, *blocks[:n]]:
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for p in params:
                p.requires_grad_(False)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, embeddings of rank < 2 and logit scales get no weight decay."""
    return param.ndim < 2 or "logit_scale" in name or name.endswith(".bias")


def param_groups(model: MultiTaskModel, lr_backbone: float, lr_head: float, weight_decay: float,
                 freeze_backbone: bool) -> list[dict[str, Any]]:
    """AdamW parameter groups: backbone vs heads (own learning rates), decay vs no decay.

    Parameters already frozen (``requires_grad=False``) are left out.
    """
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    groups = []
    for part, lr in (("backbone", lr_backbone), ("heads", lr_head)):
        module = getattr(model, part)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not is_no_decay(n, p)]
        no_decay = [p for n, p in named if is_no_decay(n, p)]
        for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{part}/{suffix}"})
    return groups


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """Give 0-dim parameters (open_clip's ``logit_scale``) shape [1]; return their names.

    DeepSpeed 0.19.8 broadcasts each parameter as ``p.data.view(torch.uint8)`` at start-up, which
    fails on a 0-dim tensor. Shape [1] broadcasts identically in every use; the final weights are
    written back with shape [] (:func:`restore_scalar_shapes`) so open_clip loads them as usual.
    """
    names = []
    for name, param in model.named_parameters():
        if param.ndim == 0:
            param.data = param.data.reshape(1)
            names.append(name)
    return names


def restore_scalar_shapes(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(()) if k in names else v for k, v in state.items()}


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Let ZeRO-3 gather ``nn.MultiheadAttention.out_proj`` when the attention module runs.

    ``F.multi_head_attention_forward`` reads ``out_proj.weight`` without calling ``out_proj``, so
    ZeRO-3's per-module hooks never fetch it (a 1-D placeholder reaches ``addmm``). Registering the
    parameters as external to the attention module makes its own hook fetch them.
    """
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter

    count = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            for param in module.out_proj.parameters():
                register_external_parameter(module, param)
                count += 1
    return count
