"""Losses shared by tasks: multi-positive InfoNCE, SigLIP's sigmoid loss and the cross-rank feature gather they need."""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


MAX_LOGIT_SCALE = math.log(100)  # CLIP's cap on the learned temperature


def logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp of a learned log logit scale, capped at 100 as in CLIP."""
    return log_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def initial_log_logit_scale(configured: float | None, backbone) -> float:
    """A head's starting log logit scale: the configured value, else the backbone's own, else CLIP's 1/0.07."""
    if configured is not None:
        return float(configured)
    if hasattr(backbone.model, "logit_scale"):
        return float(backbone.model.logit_scale.detach())
    return math.log(1 / 0.07)


def text_id(text: str) -> int:
    """A stable integer id of a text (case and outer spaces ignored), so ranks can compare texts cheaply."""
    return zlib.crc32(text.strip().lower().encode("utf-8"))


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target spread evenly over each row's positives.

    With one positive per row this is the usual InfoNCE; duplicates are no longer negatives.
    """
    target = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(a->b + b->a) / 2 on normalised features; rows with equal ``ids`` are positives."""
    logits = scale * a.float() @ b.float().T
    positives = ids[:, None] == ids[None, :]
    return (multi_positive_infonce(logits, positives) + multi_positive_infonce(logits.T, positives.T)) / 2


SIGLIP_LOG_LOGIT_SCALE = math.log(10)  # SigLIP's starting temperature (scale 10)
SIGLIP_LOGIT_BIAS = -10.0  # SigLIP's starting bias: most pairs are negatives, so start near "no"


def sigmoid_pair_loss(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: each image-text pair is its own binary decision (+1 positive, -1 negative).

    Summed over the texts, averaged over the images. No softmax ties a row to the others, so a rank can
    score its own images against every rank's texts, and the per-rank losses times the local batch add up
    to the loss of the concatenated batch.
    """
    logits = scale * image.float() @ text.float().T + bias
    signs = positives.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def gather_across_ranks(t: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``t`` from every rank (rank order); gradients flow back when ``with_grad``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if with_grad:
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(t), dim=0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out, dim=0)
