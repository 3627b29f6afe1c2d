"""time: hour of day and month from a still image (TICL; task spec section 5).

Head: an image adapter on the image embedding, and a time encoder that maps every hour bin (and,
beyond the original, every month) to the embedding space; logits = exp(t) * cos(image, bin) against
all bins, cross-entropy to the true bin. Unlike the original's in-batch B x B loss, images of the same
hour are never each other's negatives. Bins are encoded one-hot or cyclically (sin/cos), so 23:00 and
00:00 can be neighbours.
Metrics: top-1/3/5, MAE in minutes (bin centre vs true time, wrapped around 24 h), share of errors
<= 30 min, month top-1/3 and MAE in months (wrapped around 12), and time-based image retrieval
(positive if the cyclic hour difference <= 0.5 h), R@1/3/5/10/20 averaged per query.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from training import metrics
from training.export.graph import Graph, HeadExport
from training.losses import logit_scale
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions


MINUTES_PER_DAY = 24 * 60


class TimeOptions(TaskOptions):
    hour_bins: int = 24  # C: bins of the day
    predict_month: bool = True  # a second encoder over the 12 months
    encoding: Literal["onehot", "cyclic"] = "onehot"  # how a bin is fed to the time encoder
    hidden: tuple[int, ...] = (512, 1024, 1024, 1024)  # time-encoder MLP widths (TICL)
    dropout: float = 0.1
    init_logit_scale: float = math.log(1 / 0.07)
    retrieval_tolerance_hours: float = 0.5  # time-based retrieval: positive within this many hours
    retrieval_ks: tuple[int, ...] = (1, 3, 5, 10, 20)


def bin_inputs(num_bins: int, encoding: str) -> torch.Tensor:
    """Encoder inputs for every bin: one-hot rows, or sin/cos of the bin centre's angle."""
    if encoding == "onehot":
        return torch.eye(num_bins)
    angle = 2 * math.pi * (torch.arange(num_bins) + 0.5) / num_bins
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)


class TimeEncoder(nn.Module):
    """MLP from a bin's encoding to the embedding space (Linear -> BatchNorm -> ReLU -> Dropout ...)."""

    def __init__(self, num_bins: int, encoding: str, hidden: tuple[int, ...], out_dim: int, dropout: float):
        super().__init__()
        self.register_buffer("inputs", bin_inputs(num_bins, encoding), persistent=False)
        layers, width = [], self.inputs.shape[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self) -> torch.Tensor:
        """Normalised embeddings of all bins, [num_bins, D]."""
        return F.normalize(self.mlp(self.inputs.to(self.mlp[0].weight.dtype)), dim=-1)


@register_task("time")
class TimeTask(Task):
    Options = TimeOptions
    headline_metrics = ("hour_top1", "hour_top3", "hour_mae_minutes", "hour_within_30min", "month_top1",
                        "retrieval_R@1")

    def __init__(self, options: TimeOptions, backbone: Backbone):
        super().__init__(options, backbone)
        d = backbone.embed_dim
        self.adapter = nn.Sequential(nn.Linear(d, max(1, d // 4)), nn.ReLU(), nn.Linear(max(1, d // 4), d), nn.ReLU())
        self.hour_encoder = TimeEncoder(options.hour_bins, options.encoding, options.hidden, d, options.dropout)
        self.hour_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        if options.predict_month:
            self.month_encoder = TimeEncoder(12, options.encoding, options.hidden, d, options.dropout)
            self.month_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))

    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        meta = sample["json"]
        hour, minute, month = int(meta["hour"]), int(meta.get("minute", 30)), int(meta["month"])
        if not (0 <= hour < 24 and 0 <= minute < 60 and 1 <= month <= 12):
            raise ValueError(f"time out of range: hour={hour} minute={minute} month={month}")
        minutes = hour * 60 + minute
        preprocess = backbone.preprocess_train if train else backbone.preprocess_val
        return {"task": "time", "image": preprocess(sample["image"]), "key": sample["__key__"],
                "minutes": minutes, "hour_bin": minutes * self.options.hour_bins // MINUTES_PER_DAY,
                "month": month - 1}

    def embed_images(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        features = backbone(image=images)["image_features"]
        return F.normalize(self.adapter(features), dim=-1)

    def _logits(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"hour": logit_scale(self.hour_logit_scale) * image @ self.hour_encoder().T}
        if self.options.predict_month:
            out["month"] = logit_scale(self.month_logit_scale) * image @ self.month_encoder().T
        return out

    def training_forward(self, backbone, batch):
        logits = self._logits(self.embed_images(backbone, batch["image"]))
        losses = {"hour_loss": F.cross_entropy(logits["hour"].float(), batch["hour_bin"])}
        report = {"hour_acc": (logits["hour"].argmax(1) == batch["hour_bin"]).float().mean()}
        if "month" in logits:
            losses["month_loss"] = F.cross_entropy(logits["month"].float(), batch["month"])
            report["month_acc"] = (logits["month"].argmax(1) == batch["month"]).float().mean()
        return losses, report

    @torch.no_grad()
    def evaluate(self, backbone, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        parts: dict[str, list] = {"image": [], "hour": [], "month": [], "minutes": [], "month_true": []}
        for batch in batches:
            image = self.embed_images(backbone, batch["image"])
            logits = self._logits(image)
            parts["image"].append(image.float().cpu())
            parts["hour"].append(logits["hour"].float().cpu())
            if "month" in logits:
                parts["month"].append(logits["month"].float().cpu())
            parts["minutes"].append(batch["minutes"].cpu())
            parts["month_true"].append(batch["month"].cpu())
        cat = {k: torch.cat(v) for k, v in parts.items() if v}
        return score_time(cat, self.options)

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        opts = self.options
        outputs = ["time_embedding", "hour_logits"] + (["month_logits"] if opts.predict_month else [])
        graph = Graph("time_head", TimeHead(self), {"image_features": features}, outputs)
        bins = opts.hour_bins
        centres = [(i + 0.5) * 24 * 60 / bins for i in range(bins)]
        return HeadExport([graph], meta={"hour_bins": bins, "hour_bin_centre_minutes": centres,
                                         "predict_month": opts.predict_month, "months": list(range(1, 13))})


class TimeHead(nn.Module):
    """image_features -> (time embedding, hour logits, month logits); bin embeddings are constants."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, image_features: torch.Tensor):
        # the task's adapter reads the backbone forward's output, which open_clip normalises
        image = F.normalize(self.task.adapter(F.normalize(image_features, dim=-1)), dim=-1)
        logits = self.task._logits(image)
        return (image, logits["hour"], logits["month"]) if "month" in logits else (image, logits["hour"])


def score_time(out: dict[str, torch.Tensor], options: TimeOptions) -> dict[str, float]:
    """All time metrics from held-out logits and embeddings (shared by torch and ONNX evaluation)."""
    bins = options.hour_bins
    true_bins = out["minutes"] * bins // MINUTES_PER_DAY
    result = {f"hour_{k}": v for k, v in metrics.topk_accuracy(out["hour"], true_bins, (1, 3, 5)).items()}
    result["hour_top1_chance"] = 1 / bins
    errors = metrics.time_of_day_errors(out["hour"].argmax(1), out["minutes"], bins)
    result["hour_mae_minutes"] = float(errors.mean())
    result["hour_within_30min"] = float((errors <= 30).double().mean())
    if "month" in out:
        result.update({f"month_{k}": v for k, v in metrics.topk_accuracy(out["month"], out["month_true"], (1, 3)).items()})
        result["month_top1_chance"] = 1 / 12
        result["month_mae"] = float(metrics.cyclic_distance(out["month"].argmax(1), out["month_true"], 12).double().mean())
    result.update(time_retrieval(out["image"], out["minutes"] / 60, options))
    return result


def time_retrieval(embeddings: torch.Tensor, hours: torch.Tensor, options: TimeOptions) -> dict[str, float]:
    """Every image queries all the others; a hit is within the tolerance in cyclic hours, per query."""
    sim = embeddings @ embeddings.T
    positives = metrics.cyclic_positives(hours, hours, options.retrieval_tolerance_hours, 24)
    sim.fill_diagonal_(-float("inf"))
    positives.fill_diagonal_(False)
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return {}
    recall = metrics.recall_at_k(sim[has_positive], positives[has_positive], options.retrieval_ks)
    return {f"retrieval_{k}": v for k, v in recall.items()}
