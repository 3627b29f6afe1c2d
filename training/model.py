"""The multi-task model: the shared backbone plus one head per task, built from a validated config."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.backbone import Backbone, compile_towers, create_backbone
from training.config import Config, ConfigError
from training.registry import get_task_class


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
    """Backbone + the heads named in the config, ready for ``deepspeed.initialize``.

    With ``model.compile`` the towers' trunks are compiled for training steps
    (:func:`training.backbone.compile_towers`); evaluation and export run them eagerly.
    """
    check_compile_supported(cfg)
    backbone = create_backbone(cfg.model)
    if cfg.model.compile:
        compile_towers(backbone.model, cfg.model.compile_backend)
    heads = {}
    for task_cfg in cfg.tasks:
        cls = get_task_class(task_cfg.name)
        heads[task_cfg.name] = cls(cls.Options.model_validate(task_cfg.options), backbone)
    weights = {t.name: t.loss_weight for t in cfg.tasks}
    return MultiTaskModel(backbone.model, heads, weights), backbone


def check_compile_supported(cfg: Config) -> None:
    """Refuse ``model.compile`` where it cannot work, before any model is built.

    ZeRO-3 gathers each sub-module's parameters in forward pre-hooks and frees them after; inside a
    compiled trunk those hooks would be traced by dynamo (graph breaks on every block, or a trace of the
    partitioned placeholders), so the combination is refused rather than run slowly or wrongly.
    """
    if cfg.model.compile:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if cfg.model.compile_backend not in known:
            raise ConfigError(f"model.compile_backend: unknown torch.compile backend {cfg.model.compile_backend!r}; "
                              f"known: {', '.join(sorted(known))}")
    if cfg.model.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("model.compile: not supported with deepspeed.zero_stage 3 (ZeRO-3 fetches parameters "
                          "in per-module hooks inside the compiled towers); use zero_stage 0-2 or compile: false")
