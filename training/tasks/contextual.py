"""contextual: pick 1 of 10 near-identical images from a description (ImageCoDe; task spec section 3).

A sample is one description with its set of 10 frames (``0.jpg`` ... ``9.jpg``, in frame order) and
``target`` (0-9) and ``static`` in its json. Three scorers, chosen by ``mode``:

- ``zero_shot``: cosine(description, each frame), argmax. Training in this mode is plain CLIP training
  on (description, target frame) pairs with the other sets in the batch as negatives: the model never
  sees a set's other frames, which is what "zero-shot" means for a backbone trained from scratch (a
  stand-in for the web-scale pretraining a real CLIP checkpoint brings).
- ``contrastive``: logit_scale * cosine over the set's 10 frames, cross-entropy to the target.
- ``contextual``: the ContextualCLIP head. x0 = (s * I) (.) T (or the concat [I; T]); x = x0 + a
  positional embedding of the frame index (zeroed for static sets, whose images have no order);
  2 post-LN transformer encoder layers over the 10 frames; x = x + x0; Linear -> 10 scores; cross-entropy.
  By default it starts as the original's (ImageCoDe contextual.py + BERT layers): positional embedding
  N(0, 1), a default-initialised nn.Linear scorer, LayerNorm eps 1e-12, no dropout after the FFN's GELU
  (dropout only on attention probabilities and on each sublayer's output). ``init: zero_shot`` is our
  departure: positions N(0, 0.02) and a scorer that starts as the zero-shot cosine (multiply fusion).

``clip_loss_weight`` adds the in-batch CLIP loss to the other two modes, so a backbone trained from
scratch learns to match texts and images while the head learns the set; with a real backbone leave it
at 0 and freeze the backbone or give it a small learning rate (``optim.lr_backbone``, 2e-6 in the paper).
Every mode reports the head's (or scorer's) accuracy and, for comparison, the zero-shot cosine accuracy
of the same backbone, each overall, on video sets and on static sets, with chance (1/10) and the strongest
trivial baseline beside them: the best constant frame index on the same held-out sets (the synthetic
video sets have a positional prior: "furthest along the motion" is the first or last frame).
"""
from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from shards import members
from training.export.graph import Graph, HeadExport
from training.losses import gather_across_ranks, initial_log_logit_scale, logit_scale, symmetric_infonce, text_id
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions, require_bool, require_int, require_str


class ContextualOptions(TaskOptions):
    mode: Literal["zero_shot", "contrastive", "contextual"] = "contextual"  # which scorer trains and is reported
    num_candidates: int = 10  # images per set (ImageCoDe: 10)
    fusion: Literal["multiply", "concat"] = "multiply"  # x0 = (s*I) (.) T, or [I; T]
    fusion_scale: float = 1000.0  # s in the multiplicative fusion (the paper's best run, 512-d CLIP; tiny 64-d: 50)
    layers: int = 2  # transformer encoder layers over the set
    heads: int = 8
    ffn_dim: int = 3072
    dropout: float = 0.1  # attention probabilities and each sublayer's output (BERT's two dropouts)
    init: Literal["original", "zero_shot"] = "original"  # original: positions N(0, 1), default nn.Linear scorer;
    # zero_shot (ours): positions N(0, 0.02), scorer weights initial_scale / s, so the head starts as the cosine
    layer_norm_eps: float = 1e-12  # the original's BERT LayerNorm; torch's default is 1e-5
    ffn_dropout: bool = False  # also drop out after the FFN's GELU (torch's encoder layer); the original does not
    clip_loss_weight: float = 0.0  # + this * in-batch CLIP loss (description vs target frame); 1.0 from scratch
    init_logit_scale: float | None = None  # contrastive / CLIP losses; None: the backbone's own


def contextual_accuracy(scores: torch.Tensor, targets: torch.Tensor, static: torch.Tensor) -> dict[str, Any]:
    """Top-1 accuracy over all sets, video sets and static sets; chance is 1 / candidates.

    Args:
        scores: [N, C] one score per candidate image; the argmax (first on ties) is the prediction.
        targets: [N] index of the described image.
        static: [N] bool, True for static (unordered) sets.
    Returns:
        ``accuracy``, ``accuracy_video`` / ``accuracy_static`` (left out when there are no such sets),
        ``accuracy_chance``, ``num_video``, ``num_static``, and the strongest trivial baseline:
        ``accuracy_baseline`` (the best constant index on these sets; lowest index on ties) with
        ``accuracy_baseline_rule`` ("index k"), and the same per subset (``accuracy_video_baseline``, ...).
    """
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0] or targets.shape != static.shape:
        raise ValueError(f"scores [N, C], targets [N], static [N] expected; got {tuple(scores.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(static.shape)}")
    correct = (scores.argmax(dim=1) == targets).double()
    static = static.bool()
    out = {"accuracy": float(correct.mean()) if len(correct) else 0.0, "accuracy_chance": 1.0 / scores.shape[1],
           "num_video": int((~static).sum()), "num_static": int(static.sum())}
    out.update(_constant_index_baseline("accuracy", targets, scores.shape[1]))
    for name, subset in (("video", ~static), ("static", static)):
        if subset.any():
            out[f"accuracy_{name}"] = float(correct[subset].mean())
            out.update(_constant_index_baseline(f"accuracy_{name}", targets[subset], scores.shape[1]))
    return out


def _constant_index_baseline(key: str, targets: torch.Tensor, num_candidates: int) -> dict[str, Any]:
    """Accuracy of always answering the most frequent target index (the lowest on ties), and that rule."""
    if not len(targets):
        return {}
    counts = torch.bincount(targets.long(), minlength=num_candidates)
    best = int(counts.argmax())  # first maximum
    return {f"{key}_baseline": float(counts[best]) / len(targets), f"{key}_baseline_rule": f"index {best}"}


class ContextualHead(nn.Module):
    """ContextualCLIP: fuse text with each image, let the 10 fused vectors attend to each other, score each."""

    def __init__(self, embed_dim: int, options: ContextualOptions, initial_scale: float = 1.0):
        super().__init__()
        self.fusion, self.scale = options.fusion, options.fusion_scale
        width = embed_dim * (2 if options.fusion == "concat" else 1)
        if width % options.heads:
            raise ValueError(f"contextual head: width {width} is not divisible by heads={options.heads}")
        self.positions = nn.Parameter(torch.zeros(options.num_candidates, width))
        nn.init.normal_(self.positions, std=1.0 if options.init == "original" else 0.02)  # original: nn.Embedding
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, options.heads, options.ffn_dim, options.dropout, activation="gelu",
                                       layer_norm_eps=options.layer_norm_eps, batch_first=True, norm_first=False)
            for _ in range(options.layers))
        if not options.ffn_dropout:
            for layer in self.layers:
                layer.dropout = nn.Identity()  # the one between the FFN's GELU and its second linear
        self.score = nn.Linear(width, 1)
        if options.init == "zero_shot" and options.fusion == "multiply":
            self._start_as_zero_shot(initial_scale)

    def _start_as_zero_shot(self, initial_scale: float) -> None:
        """Start as the zero-shot scorer, so training can only add what the set's context tells.

        With every scorer weight initial_scale / s, the residual x0 = s * I (.) T scores initial_scale *
        cosine(I, T); the layers' output adds nothing at first: post-LN output, with LayerNorm's initial
        affine, sums to zero over the features."""
        with torch.no_grad():
            self.score.weight.fill_(initial_scale / self.scale)
            self.score.bias.zero_()

    def forward(self, images: torch.Tensor, text: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """images [B, C, D] and text [B, D] normalised, static [B] -> scores [B, C]."""
        text = text[:, None, :].expand_as(images)
        x0 = self.scale * images * text if self.fusion == "multiply" else torch.cat([images, text], dim=-1)
        ordered = (~static.bool()).to(x0.dtype)[:, None, None]  # static sets: no positional embedding
        x = x0 + self.positions[None] * ordered
        for layer in self.layers:
            x = layer(x)
        return self.score(x + x0).squeeze(-1)


@register_task("contextual")
class ContextualTask(Task):
    Options = ContextualOptions
    headline_metrics = ("accuracy", "accuracy_video", "accuracy_static", "zeroshot_accuracy")

    def __init__(self, options: ContextualOptions, backbone: Backbone):
        super().__init__(options, backbone)
        self.logit_scale = nn.Parameter(torch.tensor(initial_log_logit_scale(options.init_logit_scale, backbone)))
        if options.mode == "contextual":
            self.head = ContextualHead(backbone.embed_dim, options, initial_scale=logit_scale(self.logit_scale).item())

    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        """All frames go through the evaluation transform: independent random crops per frame would move
        the content by more than the differences the descriptions are about."""
        meta = sample["json"]
        n = self.options.num_candidates
        target = require_int(meta, "target", low=0, high=n - 1)  # an index of the set's n images
        # the description; absent, null or blank: the caption (ImageCoDe's converter writes both)
        description = require_str(meta, "description", "", allow_empty=True, nullable=True)
        if not description.strip():
            if "caption" not in meta:
                raise ValueError("json.description is missing (and there is no json.caption to use instead)")
            description = require_str(meta, "caption")
        static = require_bool(meta, "static", False)
        frames = [frame_image(sample, i) for i in range(n)]
        return {"task": "contextual", "images": torch.stack([backbone.preprocess_val(f) for f in frames]),
                "text": backbone.tokenizer([description])[0], "text_id": text_id(description),
                "target": target, "static": static, "key": sample["__key__"]}

    def _embed(self, backbone: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frame embeddings [B, C, D] and text embeddings [B, D], through the backbone's forward."""
        images = batch["images"]
        b, c = images.shape[:2]
        out = backbone(image=images.flatten(0, 1), text=batch["text"])
        frames = F.normalize(out["image_features"], dim=-1).reshape(b, c, -1)
        return frames, F.normalize(out["text_features"], dim=-1)

    def scores(self, frames: torch.Tensor, text: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """[B, C] scores of the configured mode (cosine for zero_shot, scaled cosine for contrastive)."""
        if self.options.mode == "contextual":
            return self.head(frames, text, static)
        cosine = torch.einsum("bcd,bd->bc", frames, text)
        return cosine * logit_scale(self.logit_scale) if self.options.mode == "contrastive" else cosine

    def training_forward(self, backbone, batch):
        frames, text = self._embed(backbone, batch)
        losses, report = {}, {}
        targets = batch["target"]
        if self.options.mode != "zero_shot":
            scores = self.scores(frames, text, batch["static"]).float()
            losses["set_loss"] = F.cross_entropy(scores, targets)
            report["acc"] = (scores.argmax(1) == targets).float().mean()
        clip_weight = 1.0 if self.options.mode == "zero_shot" else self.options.clip_loss_weight
        if clip_weight > 0:
            losses["clip_loss"] = clip_weight * self._clip_loss(frames, text, batch)
        report["logit_scale"] = logit_scale(self.logit_scale).detach()
        return losses, report

    def _clip_loss(self, frames: torch.Tensor, text: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """CLIP's loss on (description, target frame) pairs; other sets' targets are the negatives."""
        target_frames = frames[torch.arange(frames.shape[0], device=frames.device), batch["target"]]
        ids = torch.as_tensor(batch["text_id"], device=frames.device)
        target_frames, text = gather_across_ranks(target_frames, True), gather_across_ranks(text, True)
        ids = gather_across_ranks(ids, False)
        return symmetric_infonce(target_frames, text, ids, logit_scale(self.logit_scale))

    @torch.no_grad()
    def evaluate(self, backbone, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        parts: dict[str, list[torch.Tensor]] = {"scores": [], "cosine": [], "target": [], "static": []}
        for batch in batches:
            frames, text = self._embed(backbone, batch)
            parts["scores"].append(self.scores(frames, text, batch["static"]).float().cpu())
            parts["cosine"].append(torch.einsum("bcd,bd->bc", frames, text).float().cpu())
            parts["target"].append(batch["target"].cpu())
            parts["static"].append(batch["static"].cpu())
        if not parts["target"]:
            raise ValueError("contextual: no held-out samples to evaluate")
        cat = {k: torch.cat(v) for k, v in parts.items()}
        out = contextual_accuracy(cat["scores"], cat["target"], cat["static"])
        zero_shot = contextual_accuracy(cat["cosine"], cat["target"], cat["static"])
        out.update({f"zeroshot_{k}": v for k, v in zero_shot.items() if k.startswith("accuracy") and k != "accuracy_chance"})
        return out

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        n, d = self.options.num_candidates, features.shape[-1]
        g = torch.Generator().manual_seed(1)
        frames = F.normalize(features[:3, None] + 0.1 * torch.randn(3, n, d, generator=g), dim=-1)
        text = F.normalize(features[1:4] + 0.1 * torch.randn(3, d, generator=g), dim=-1)
        graph = Graph("contextual_scorer", ContextualScorer(self),
                      {"frames": frames, "text": text, "static": torch.tensor([False, True, False])}, ["scores"])
        # images_per_item: one item (a set) sends n images through the image tower at once (TensorRT profiles)
        return HeadExport([graph], meta={"num_candidates": n, "mode": self.options.mode, "images_per_item": n})


class ContextualScorer(nn.Module):
    """frames [B, C, D] and text [B, D] (normalised), static [B] bool -> scores [B, C] (the configured mode)."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, frames, text, static):
        return self.task.scores(frames, text, static)


def frame_image(sample: dict[str, Any], index: int):
    """The decoded image member ``<index>.jpg`` (or png/webp/jpeg) of a multi-image sample."""
    image = members.frame(sample, index)
    if image is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image member '{index}.<{'|'.join(members.IMAGE_MEMBERS)}>'"
                         f" (members: {members.describe(sample)})")
    return image
