"""What every task provides: options, a sample mapping, a training forward and an evaluation.

A task is an ``nn.Module`` holding its head's parameters. The backbone is passed in, not owned,
so all tasks share one backbone and one DeepSpeed engine.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Collection, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from training.backbone import Backbone, SampleContext

CACHE_KEY = "feature_cache"  # a micro batch's (step cache, index) under accum_mode: features (training.feature_cache)

if TYPE_CHECKING:
    from training.export.graph import HeadExport


# --------------------------------------------------------------------------- per-sample json fields
#
# ``map_sample`` runs inside the loader's fault-tolerant stage (``shards.samples.map_samples``): what it
# raises skips the one sample as ``map_error``, logged with its shard and key. A field of the wrong type
# that it let through would fail later, in collation, the loss or the metrics, where it kills the run.
# So every field a task reads goes through one of these; the message names the field and what it got.

REQUIRED: Any = object()  # ``default`` of a field that must be present


def _got(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 63 else text


def _present(meta: Any, name: str, default: Any, nullable: bool) -> tuple[bool, Any]:
    """(True, value) for a present field; (False, default) when it may be left out (``nullable``: null too)."""
    if not isinstance(meta, dict):
        raise ValueError(f"json must be an object, got {type(meta).__name__}")
    if name not in meta or (nullable and meta[name] is None):
        if default is REQUIRED:
            raise ValueError(f"json.{name} is missing")
        return False, default
    return True, meta[name]


def require_str(meta: dict[str, Any], name: str, default: Any = REQUIRED, *, allow_empty: bool = False,
                nullable: bool = False, choices: Collection[str] | None = None) -> str:
    """``meta[name]`` as a string: non-empty (not only blanks) unless ``allow_empty``, one of ``choices``
    when given. Absent (or null, with ``nullable``): ``default``, or an error without one. Anything else
    (a number, null, a list, an object) is a ValueError naming ``json.<name>``."""
    present, value = _present(meta, name, default, nullable)
    if not present:
        return value
    if not isinstance(value, str):
        raise ValueError(f"json.{name} must be a string, got {_got(value)} ({type(value).__name__})")
    if not allow_empty and not value.strip():
        raise ValueError(f"json.{name} must be a non-empty string, got {_got(value)}")
    if choices is not None and value not in choices:
        raise ValueError(f"json.{name} must be one of {sorted(choices)}, got {_got(value)}")
    return value


def require_int(meta: dict[str, Any], name: str, default: Any = REQUIRED, *, low: int | None = None,
                high: int | None = None) -> int:
    """``meta[name]`` as an int in ``[low, high]`` (inclusive). A whole float (``18.0``, as pandas writes
    integers) is accepted; a bool, a fractional float, a string of digits, null or a list is not."""
    present, value = _present(meta, name, default, False)
    if not present:
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"json.{name} must be an integer, got {_got(value)} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"json.{name} must lie in [{low}, {high}], got {value}")
    return value


def require_bool(meta: dict[str, Any], name: str, default: Any = REQUIRED) -> bool:
    """``meta[name]`` as a bool: ``true`` or ``false`` only (not 0/1, not the string "false")."""
    present, value = _present(meta, name, default, False)
    if present and not isinstance(value, bool):
        raise ValueError(f"json.{name} must be true or false, got {_got(value)} ({type(value).__name__})")
    return value


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
        """Calling the task module (not ``training_forward`` directly) lets ZeRO-3 gather its parameters.

        A micro batch of ``accum_mode: features`` carries its step's cache: it is recomputed with gradients
        against the whole step's loss (:mod:`training.feature_cache`)."""
        cached = batch.get(CACHE_KEY)
        if cached is not None:
            step, micro = cached
            return step.recompute(self, backbone, batch, micro)
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

    # ------------------------------------------------------------------ optional: feature-caching accumulation
    # A task whose loss couples the samples of a batch only through per-sample features (contrastive losses)
    # can split ``training_forward`` into these two; ``optim.accum_mode: features`` needs both (checked at
    # config validation). ``training_forward(b, batch)`` must equal ``features_loss(training_features(b, batch))``.

    def training_features(self, backbone: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample tensors of one micro batch (batch dimension first); floating ones receive gradients,
        others (ids) ride along. Called twice per step (without, then with gradients): same RNG state both times."""
        raise NotImplementedError(f"task {self.name!r} does not support accum_mode: features")

    def features_loss(self, features: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``training_forward``'s ``(losses, report)`` from the features of one or several micro batches,
        concatenated (cross-rank gathers happen here, as in ``training_forward``)."""
        raise NotImplementedError(f"task {self.name!r} does not support accum_mode: features")

    @classmethod
    def supports_feature_cache(cls) -> bool:
        return cls.training_features is not Task.training_features and cls.features_loss is not Task.features_loss

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
    def min_held_out_samples(cls, options: TaskOptions) -> tuple[int, str]:
        """(the fewest held-out samples this task's evaluation can score, the option that sets it);
        checked against the held-out shards' counts before any work (``training.data.check_held_out``)."""
        return 1, ""

    @classmethod
    def exports_onnx(cls) -> bool:
        return cls.export_onnx is not Task.export_onnx
