"""How much general ability a fine-tune cost, and WiSE-FT weight interpolation to win it back.

WiSE-FT (Wortsman et al., 2022): backbone = (1 - alpha) * initial + alpha * fine-tuned, heads as
fine-tuned. Each alpha is evaluated on the task's held-out set and, when ``eval.general`` names one,
on a general zero-shot set, beside the initial (alpha = 0) and fine-tuned (alpha = 1) weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.config import Config


def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the backbone's weights before training."""
    return {k: v.detach().float().cpu().clone() for k, v in backbone.state_dict().items()}


def interpolate(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], alpha: float,
                prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """``final`` with its backbone entries replaced by (1 - alpha) * initial + alpha * final."""
    out = dict(final)
    for key, start in initial.items():
        end = final[prefix + key]
        out[prefix + key] = torch.lerp(start.reshape(end.shape).to(end.dtype), end, alpha) \
            if end.is_floating_point() else end
    return out


def evaluate_interpolations(cfg: Config, initial: dict[str, torch.Tensor],
                            final: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Metrics per alpha (0 = initial, 1 = fine-tuned, plus ``eval.wise_ft_alphas``), per eval set."""
    from training.evaluation import evaluate_model
    from training.model import build_model

    from training import accelerator

    model, backbone = build_model(cfg)
    model.to(accelerator.current_device())  # on the rank's GPU when there is one, like training
    accelerator.apply_precision(model, cfg.deepspeed.precision)
    sets = {"val": None, **({"general": cfg.eval.general} if cfg.eval.general else {})}
    results = {}
    for alpha in sorted({0.0, 1.0, *cfg.eval.wise_ft_alphas}):
        model.load_state_dict(interpolate(initial, final, alpha))  # copies into the model's device
        results[f"{alpha:g}"] = {name: evaluate_model(model, backbone, cfg, shards) for name, shards in sets.items()}
    return results


def flatten(results: dict[str, Any]) -> dict[str, float]:
    return {f"alpha={a}/{s}/{k}": v for a, per_set in results.items() for s, m in per_set.items() for k, v in m.items()}
