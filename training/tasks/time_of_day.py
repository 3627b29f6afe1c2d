"""time: hour of day and month from a still image (TICL; task spec section 5).

Head: an image adapter on the image embedding (D -> D/4 -> D, ReLU, no biases as in TICL unless
``adapter_bias``), and a time encoder that maps every hour bin (and, beyond the original, every month)
to the embedding space; logits = exp(t) * cos(image, bin) against all bins, cross-entropy to the true
bin. Unlike the original's in-batch B x B loss, images of the same hour are never each other's
negatives. Bins are encoded one-hot or cyclically (sin/cos), so 23:00 and 00:00 can be neighbours.

Per-sample json fields read (written by ``shards.synth.time_of_day`` and ``shards.convert.toc``):
``hour`` (0-23), ``minute`` (0-59, default 30), ``month`` (1-12) and, optionally, ``retrieval_role``
(``"query"`` or ``"database"``: the sample's side in time-based retrieval; absent: neither).

Metrics: top-1/3/5, MAE in minutes (bin centre vs true time, wrapped around 24 h), share of errors
<= 30 min, month top-1/3 and MAE in months (wrapped around 12). Beside each, ``<m>_chance`` (uniform
guessing) and ``<m>_baseline`` / ``<m>_baseline_rule``: the strongest trivial rule on the same held-out
data, a constant prediction chosen with the held-out labels (the evaluation sees no training labels, so
this is the held-out majority bin, or the best constant bin for MAE: a bar at least as high as the
training majority's).

Time-based image retrieval (positive if the cyclic hour difference <= 0.5 h; R@1/3/5/10/20 averaged
per query, queries without a positive left out):

- ``retrieval_R@k``: TICL's protocol, the ``query`` samples against the ``database`` samples (TOC: 48
  queries, 13,043 database images); reported only when the held-out set marks both roles, with
  ``retrieval_num_queries`` / ``retrieval_num_database``.
- ``retrieval_loo_R@k``: leave-one-out, every held-out image against all the others; always reported,
  the only retrieval figure when no roles are marked. Not comparable with TICL's figures.

``retrieval_R@k_chance`` / ``retrieval_loo_R@k_chance``: the expected R@k of a uniformly random ranking
(exact, per query). TICL ranks by L2 distance between unnormalised adapter outputs; here by cosine
similarity of the normalised ones (the embedding the head is trained on), ties to the lower index.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from training import metrics
from training.export.graph import Graph, HeadExport
from training.losses import logit_scale
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions, require_int, require_str


MINUTES_PER_DAY = 24 * 60
ROLES = {"database": 0, "query": 1}  # json retrieval_role -> batch "role"; absent -> NO_ROLE
NO_ROLE = -1
TICL_DROPOUT = (0.1, 0.3, 0.3, 0.1)


class TimeOptions(TaskOptions):
    hour_bins: int = 24  # C: bins of the day
    predict_month: bool = True  # a second encoder over the 12 months
    encoding: Literal["onehot", "cyclic"] = "onehot"  # how a bin is fed to the time encoder
    hidden: tuple[int, ...] = (512, 1024, 1024, 1024)  # time-encoder MLP widths (TICL)
    # time-encoder dropout after each hidden layer: one value for all, or a schedule (TICL's), stretched
    # over len(hidden) layers by relative position when the lengths differ (see layer_dropouts)
    dropout: float | tuple[float, ...] = TICL_DROPOUT
    adapter_bias: bool = False  # TICL's image adapter has no biases
    init_logit_scale: float = math.log(1 / 0.07)
    retrieval_tolerance_hours: float = 0.5  # time-based retrieval: positive within this many hours
    retrieval_ks: tuple[int, ...] = (1, 3, 5, 10, 20)

    @field_validator("dropout")
    @classmethod
    def _dropout_in_range(cls, value):
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(not 0.0 <= p < 1.0 for p in values):
            raise ValueError(f"dropout must be one value or a non-empty list of values in [0, 1), got {value}")
        return value


def layer_dropouts(dropout: float | Sequence[float], layers: int) -> tuple[float, ...]:
    """Dropout of each of ``layers`` hidden layers: a float for all, or a schedule of any length.

    A schedule of another length is stretched by relative position (layer i of n takes entry
    round(i * (m - 1) / (n - 1))), so TICL's (0.1, 0.3, 0.3, 0.1) keeps 0.1 on the outer layers:
    2 layers (0.1, 0.1), 3 layers (0.1, 0.3, 0.1), 5 layers (0.1, 0.3, 0.3, 0.3, 0.1).
    """
    if not isinstance(dropout, (tuple, list)):
        return (float(dropout),) * layers
    m = len(dropout)
    if m == layers:
        return tuple(float(p) for p in dropout)
    if layers == 1 or m == 1:
        return (float(dropout[0]),) * layers
    return tuple(float(dropout[int(i * (m - 1) / (layers - 1) + 0.5)]) for i in range(layers))


def bin_inputs(num_bins: int, encoding: str) -> torch.Tensor:
    """Encoder inputs for every bin: one-hot rows, or sin/cos of the bin centre's angle."""
    if encoding == "onehot":
        return torch.eye(num_bins)
    angle = 2 * math.pi * (torch.arange(num_bins) + 0.5) / num_bins
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)


class TimeEncoder(nn.Module):
    """MLP from a bin's encoding to the embedding space (Linear -> BatchNorm -> ReLU -> Dropout ...)."""

    def __init__(self, num_bins: int, encoding: str, hidden: tuple[int, ...], out_dim: int,
                 dropout: float | Sequence[float]):
        super().__init__()
        self.register_buffer("inputs", bin_inputs(num_bins, encoding), persistent=False)
        layers, width = [], self.inputs.shape[1]
        for h, p in zip(hidden, layer_dropouts(dropout, len(hidden))):
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(p)]
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
                        "retrieval_R@1", "retrieval_loo_R@1")

    def __init__(self, options: TimeOptions, backbone: Backbone):
        super().__init__(options, backbone)
        d, bias = backbone.embed_dim, options.adapter_bias
        self.adapter = nn.Sequential(nn.Linear(d, max(1, d // 4), bias=bias), nn.ReLU(),
                                     nn.Linear(max(1, d // 4), d, bias=bias), nn.ReLU())
        self.hour_encoder = TimeEncoder(options.hour_bins, options.encoding, options.hidden, d, options.dropout)
        self.hour_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        if options.predict_month:
            self.month_encoder = TimeEncoder(12, options.encoding, options.hidden, d, options.dropout)
            self.month_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))

    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        meta = sample["json"]
        hour, month = require_int(meta, "hour", low=0, high=23), require_int(meta, "month", low=1, high=12)
        minute = require_int(meta, "minute", 30, low=0, high=59)
        role = require_str(meta, "retrieval_role", None, nullable=True, choices=ROLES)  # absent or null: neither
        minutes = hour * 60 + minute
        preprocess = backbone.preprocess_train if train else backbone.preprocess_val
        return {"task": "time", "image": preprocess(sample["image"]), "key": sample["__key__"],
                "minutes": minutes, "hour_bin": minutes * self.options.hour_bins // MINUTES_PER_DAY,
                "month": month - 1, "role": NO_ROLE if role is None else ROLES[role]}

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
        parts: dict[str, list] = {"image": [], "hour": [], "month": [], "minutes": [], "month_true": [], "role": []}
        for batch in batches:
            image = self.embed_images(backbone, batch["image"])
            logits = self._logits(image)
            parts["image"].append(image.float().cpu())
            parts["hour"].append(logits["hour"].float().cpu())
            if "month" in logits:
                parts["month"].append(logits["month"].float().cpu())
            parts["minutes"].append(batch["minutes"].cpu())
            parts["month_true"].append(batch["month"].cpu())
            if "role" in batch:
                parts["role"].append(batch["role"].cpu())
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


# --------------------------------------------------------------------------- metrics


def score_time(out: dict[str, torch.Tensor], options: TimeOptions) -> dict[str, Any]:
    """All time metrics from held-out logits and embeddings (shared by torch and ONNX evaluation).

    ``out``: ``hour`` logits [N, C], ``minutes`` of the day [N], ``image`` embeddings [N, D], optionally
    ``month`` logits [N, 12] with ``month_true`` (0-11) and ``role`` (1 query, 0 database, -1 neither).
    """
    bins = options.hour_bins
    true_bins = out["minutes"] * bins // MINUTES_PER_DAY
    result: dict[str, Any] = {f"hour_{k}": v for k, v in metrics.topk_accuracy(out["hour"], true_bins, (1, 3, 5)).items()}
    result["hour_top1_chance"] = 1 / bins
    errors = metrics.time_of_day_errors(out["hour"].argmax(1), out["minutes"], bins)
    result["hour_mae_minutes"] = float(errors.mean())
    result["hour_within_30min"] = float((errors <= 30).double().mean())
    result.update(hour_baselines(out["minutes"], bins))
    if "month" in out:
        result.update({f"month_{k}": v for k, v in metrics.topk_accuracy(out["month"], out["month_true"], (1, 3)).items()})
        result["month_top1_chance"] = 1 / 12
        result["month_mae"] = float(metrics.cyclic_distance(out["month"].argmax(1), out["month_true"], 12).double().mean())
        result.update(month_baselines(out["month_true"]))
    result.update(time_retrieval(out["image"], out["minutes"] / 60, options, out.get("role")))
    return result


def most_frequent(labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """The k most frequent classes, ties to the lower class index."""
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return torch.sort(counts, descending=True, stable=True).indices[:k]


def _top_k_baselines(labels: torch.Tensor, num_classes: int, prefix: str, ks: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ks:
        top = most_frequent(labels, num_classes, k)
        out[f"{prefix}_top{k}_baseline"] = float(torch.isin(labels.long(), top).double().mean())
        out[f"{prefix}_top{k}_baseline_rule"] = "majority bin" if k == 1 else f"{k} most frequent bins"
    return out


def hour_baselines(minutes: torch.Tensor, bins: int) -> dict[str, Any]:
    """Constant predictions chosen on these (held-out) labels: the majority bin(s) for top-k, the best
    constant bin for MAE and for the share within 30 min."""
    minutes = torch.as_tensor(minutes)
    out = _top_k_baselines(minutes * bins // MINUTES_PER_DAY, bins, "hour", (1, 3, 5))
    # errors of every constant bin against every sample: [bins, N]
    errors = torch.stack([metrics.time_of_day_errors(torch.full_like(minutes, b), minutes, bins) for b in range(bins)])
    out["hour_mae_minutes_baseline"] = float(errors.mean(dim=1).min())
    out["hour_mae_minutes_baseline_rule"] = "best constant bin"
    out["hour_within_30min_baseline"] = float((errors <= 30).double().mean(dim=1).max())
    out["hour_within_30min_baseline_rule"] = "best constant bin"
    return out


def month_baselines(months: torch.Tensor) -> dict[str, Any]:
    """As hour_baselines, for months 0-11 (MAE in months, wrapped around 12)."""
    months = torch.as_tensor(months)
    out = _top_k_baselines(months, 12, "month", (1, 3))
    errors = torch.stack([metrics.cyclic_distance(torch.full_like(months, m), months, 12).double() for m in range(12)])
    out["month_mae_baseline"] = float(errors.mean(dim=1).min())
    out["month_mae_baseline_rule"] = "best constant month"
    return out


def chance_recall(num_positives: torch.Tensor, gallery: int, ks: Sequence[int]) -> dict[str, float]:
    """Expected R@k of a uniformly random ranking of ``gallery`` items, mean over queries with ``num_positives``
    (each >= 1): 1 - C(G - P, k) / C(G, k)."""
    p = torch.as_tensor(num_positives, dtype=torch.float64)
    out = {}
    for k in ks:
        kk = min(int(k), gallery)
        none = torch.lgamma(gallery - p + 1) - torch.lgamma(gallery - p - kk + 1) - \
            (math.lgamma(gallery + 1) - math.lgamma(gallery - kk + 1))
        miss = torch.where(gallery - p >= kk, torch.exp(none), torch.zeros_like(p))
        out[f"R@{k}"] = float((1 - miss).mean())
    return out


def query_database_recall(query_emb: torch.Tensor, query_hours: torch.Tensor, db_emb: torch.Tensor,
                          db_hours: torch.Tensor, tolerance: float, ks: Sequence[int]) -> dict[str, float]:
    """TICL's time-based retrieval: each query ranks the whole database by cosine similarity (ties to
    the lower database index); a hit is a database image within ``tolerance`` cyclic hours. Recall is
    averaged per query, over the queries with at least one positive; ``num_queries`` counts them."""
    positives = metrics.cyclic_positives(query_hours, db_hours, tolerance, 24)
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return {}
    sim = query_emb.float() @ db_emb.float().T
    out = dict(metrics.recall_at_k(sim[has_positive], positives[has_positive], ks))
    out.update({f"{k}_chance": v for k, v in chance_recall(positives[has_positive].sum(1), len(db_hours), ks).items()})
    out["num_queries"] = int(has_positive.sum())
    return out


def leave_one_out_recall(emb: torch.Tensor, hours: torch.Tensor, tolerance: float, ks: Sequence[int],
                         block: int = 1024) -> dict[str, float]:
    """Every image queries all the others (itself excluded), in blocks of queries to bound memory."""
    n = len(hours)
    if n < 2:
        return {}
    emb = emb.float()
    hits = {k: 0.0 for k in ks}
    chance = {k: 0.0 for k in ks}
    counted = 0
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n))
        sim = emb[rows] @ emb.T
        positives = metrics.cyclic_positives(hours[rows], hours, tolerance, 24)
        sim[torch.arange(len(rows)), rows] = -float("inf")
        positives[torch.arange(len(rows)), rows] = False
        keep = positives.any(dim=1)
        if not keep.any():
            continue
        # the self column sorts last (-inf) and is never positive, so the others keep their order
        part = metrics.recall_at_k(sim[keep], positives[keep], ks)
        part_chance = chance_recall(positives[keep].sum(1), n - 1, ks)
        m = int(keep.sum())
        for k in ks:
            hits[k] += part[f"R@{k}"] * m
            chance[k] += part_chance[f"R@{k}"] * m
        counted += m
    if not counted:
        return {}
    out = {f"R@{k}": hits[k] / counted for k in ks}
    out.update({f"R@{k}_chance": chance[k] / counted for k in ks})
    return out


def time_retrieval(embeddings: torch.Tensor, hours: torch.Tensor, options: TimeOptions,
                   roles: torch.Tensor | None = None) -> dict[str, Any]:
    """``retrieval_*`` (queries vs database, when ``roles`` marks both) and ``retrieval_loo_*`` (always)."""
    tolerance, ks = options.retrieval_tolerance_hours, options.retrieval_ks
    out: dict[str, Any] = {}
    if roles is not None:
        query, database = roles == ROLES["query"], roles == ROLES["database"]
        if query.any() and database.any():
            split = query_database_recall(embeddings[query], hours[query], embeddings[database], hours[database],
                                          tolerance, ks)
            if split:
                out.update({f"retrieval_{k}": v for k, v in split.items()})
                out["retrieval_num_database"] = int(database.sum())
    out.update({f"retrieval_loo_{k}": v for k, v in leave_one_out_recall(embeddings, hours, tolerance, ks).items()})
    return out
