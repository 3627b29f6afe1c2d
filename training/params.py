"""What the optimizer sees: frozen tower blocks, and AdamW groups (backbone vs heads, decay vs none)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.config import ConfigError
from training.model import MultiTaskModel


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


def build_optimizer(groups: list[dict[str, Any]], betas: tuple[float, float], eps: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``groups``. ``fused``: torch's one-kernel update of every parameter (the same update up to
    float rounding); off, torch's default for the device (a loop over the tensors on CPU)."""
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True if fused else None)


def adamw_kernel(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW implementation ``optimizer`` steps with, for the log."""
    return "fused" if optimizer.defaults.get("fused") else "default (for-loop on CPU, foreach on CUDA)"
