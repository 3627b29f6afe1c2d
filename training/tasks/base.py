"""What every task provides: options, a sample mapping, a training forward and an evaluation.

A task is an ``nn.Module`` holding its head's parameters. The backbone is passed in, not owned,
so all tasks share one backbone and one DeepSpeed engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from training.backbone import Backbone, SampleContext

if TYPE_CHECKING:
    from training.export.graph import HeadExport


class TaskOptions(BaseModel):
    """Base of every task's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(nn.Module):
    """Interface of a task head. Subclasses set ``Options`` and implement the four methods."""

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    # ZeRO-3 gathers a parameter only inside its own module's forward: a task that reads backbone
    # parameters elsewhere says why here, and the config refuses deepspeed.zero_stage 3 with it
    zero3_unsupported: ClassVar[str | None] = None
    # the metrics a reader looks at first (launch/report.py's tables; the trainer writes them to metrics.json)
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    # options replaced when a finished run is rebuilt to encode images only (``load_run(encoder_only=True)``):
    # data files only training reads; the run's final weights are loaded over the head anyway
    encoder_only_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: TaskOptions, backbone: Backbone):
        super().__init__()
        self.options = options

    def forward(self, backbone: nn.Module, batch: dict[str, Any]):
        """Calling the task module (not ``training_forward`` directly) lets ZeRO-3 gather its parameters."""
        return self.training_forward(backbone, batch)

    @torch.no_grad()
    def prepare(self, backbone: nn.Module) -> None:
        """Precompute what training needs from the backbone (e.g. embedded corpora); default: nothing."""

    def map_sample(self, sample: dict[str, Any], backbone: SampleContext, train: bool) -> dict[str, Any]:
        """Turn one decoded WebDataset sample into tensors (runs in data-loader workers, which get the
        backbone's transforms and tokenizer, :class:`~training.backbone.SampleContext`, not its model)."""
        raise NotImplementedError

    def training_forward(self, backbone: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Return ``({"<name>_loss": tensor, ...}, {metric: float})`` for one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Held-out metrics over an iterable of batches (every rank runs it identically)."""
        raise NotImplementedError

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        """This head's inference part for ONNX: graphs (with example inputs) plus arrays, documents and
        metadata for the manifest. ``features`` are the image tower's outputs on fixed images, example
        inputs for graphs that start from them. ``serving/predictors/<task>.py`` has the matching predictor."""
        raise NotImplementedError(f"task {self.name!r} defines no ONNX export")

    @torch.no_grad()
    def extraction_outputs(self, backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Columns the Ray extraction job writes from this head in torch (``training/extract_torch.py``),
        named as the export's ``extraction`` metadata names them; default: none."""
        return {}

    @classmethod
    def exports_onnx(cls) -> bool:
        return cls.export_onnx is not Task.export_onnx
