"""DeepSpeed workarounds the engine needs around the open_clip backbone (any ZeRO stage, and ZeRO-3)."""
from __future__ import annotations

import torch
from torch import nn


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
