"""retrieval: text<->image contrastive fine-tuning (task spec section 1).

Head: the backbone's own projections plus a learnable logit scale. Loss (``options.loss``): symmetric
InfoNCE where every pair with the same caption is a positive (multi-positive), gathered across ranks; or
SigLIP's sigmoid loss (one binary decision per pair, with a learnable logit bias), where each rank scores
its own images against every rank's texts, positives again the pairs with the same caption. Both losses
split into ``training_features`` + ``features_loss``, so ``optim.accum_mode: features`` can take them over a
step's whole accumulated batch (training/feature_cache.py).
Metrics: image->text / text->image R@1/5/10, zero-shot top-1/top-5 from class prompts, and the
original work's candidate-batch precision/recall/F1 (cosine similarity, threshold): ``candidate_precision``
/ ``_recall`` / ``_f1`` are the original's figures (per batch, the mean over the "relevant" and "not relevant"
classes, as sklearn's per-class arrays; the query class uniform among the batch's distinct classes), and
``candidate_*_relevant`` the relevant class alone.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from training import metrics
from training.export.graph import HeadExport
from training.losses import (SIGLIP_LOG_LOGIT_SCALE, SIGLIP_LOGIT_BIAS, gather_across_ranks, initial_log_logit_scale,
                             logit_scale, sigmoid_pair_loss, symmetric_infonce, text_id)
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions, require_str

LOGGER = logging.getLogger("multiclip.retrieval")


class RetrievalOptions(TaskOptions):
    templates: tuple[str, ...] = ("this is a photo of a {}",)  # zero-shot class prompts
    classnames: tuple[str, ...] | None = None  # zero-shot classes; None: the labels seen in eval data
    loss: Literal["infonce", "siglip"] = "infonce"  # siglip: SigLIP's sigmoid loss with a learned bias
    init_logit_scale: float | None = None  # None: the backbone's logit scale (infonce), log 10 (siglip)
    init_logit_bias: float = SIGLIP_LOGIT_BIAS  # -10; siglip only: SigLIP's starting bias; a training-only term
    gather_across_ranks: bool = True  # negatives from every rank's batch, as open_clip does
    candidate_batch_size: int = 10  # N candidates per batch in the candidate-batch protocol
    candidate_threshold: float = 0.25  # cosine at or above which a candidate counts as retrieved
    candidate_batches: int = 200  # batches drawn for the candidate-batch protocol


@register_task("retrieval")
class RetrievalTask(Task):
    Options = RetrievalOptions
    headline_metrics = ("t2i_R@1", "i2t_R@1", "t2i_R@10", "zeroshot_top1", "candidate_f1")

    def __init__(self, options: RetrievalOptions, backbone: Backbone):
        super().__init__(options, backbone)
        self.logit_scale = nn.Parameter(torch.tensor(self._initial_log_scale(options, backbone)))
        if options.loss == "siglip":  # a 0-d parameter: saved with the head, no weight decay (training.params)
            self.logit_bias = nn.Parameter(torch.tensor(float(options.init_logit_bias)))
        self.tokenizer = backbone.tokenizer  # for zero-shot class prompts at evaluation

    @staticmethod
    def _initial_log_scale(options: RetrievalOptions, backbone: Backbone) -> float:
        """SigLIP starts from its own scale (10): the backbone's (CLIP's ~100) saturates the sigmoids."""
        if options.loss == "siglip" and options.init_logit_scale is None:
            return SIGLIP_LOG_LOGIT_SCALE
        return initial_log_logit_scale(options.init_logit_scale, backbone)

    @classmethod
    def min_held_out_samples(cls, options: RetrievalOptions) -> tuple[int, str]:
        return options.candidate_batch_size, "options.candidate_batch_size"

    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        """json ``caption`` (a non-empty string) and ``label`` (a non-empty string; absent: the caption)."""
        meta = sample["json"]
        caption = require_str(meta, "caption")
        label = require_str(meta, "label", caption)
        preprocess = backbone.preprocess_train if train else backbone.preprocess_val
        return {
            "task": "retrieval",
            "image": preprocess(sample["image"]),
            "text": backbone.tokenizer([caption])[0],
            "caption_id": text_id(caption),
            "caption": caption,
            "label": label,
            "key": sample["__key__"],
        }

    def _encode(self, backbone: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # through the backbone's forward (not encode_*), so ZeRO-3 gathers its top-level parameters
        out = backbone(image=batch["image"], text=batch["text"])
        return F.normalize(out["image_features"], dim=-1), F.normalize(out["text_features"], dim=-1)

    def training_forward(self, backbone, batch):
        return self.features_loss(self.training_features(backbone, batch))

    def training_features(self, backbone, batch):
        """Normalised image and text features plus caption ids (positives: equal ids) of one micro batch."""
        image, text = self._encode(backbone, batch)
        return {"image": image, "text": text, "caption_id": torch.as_tensor(batch["caption_id"], device=image.device)}

    def features_loss(self, features):
        image, text, ids = features["image"], features["text"], features["caption_id"]
        if self.options.loss == "siglip":
            return self._siglip_forward(image, text, ids)
        if self.options.gather_across_ranks:
            image, text = gather_across_ranks(image, True), gather_across_ranks(text, True)
            ids = gather_across_ranks(ids, False)
        scale = logit_scale(self.logit_scale)
        loss = symmetric_infonce(image, text, ids, scale)
        return {"contrastive_loss": loss}, {"logit_scale": scale.detach()}

    def _siglip_forward(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor):
        """This rank's images against every rank's texts (gradients flow back to each text's owner).

        DeepSpeed averages gradients over ranks, so the mean of the per-rank losses is what is optimised:
        with equal local batches that is the sigmoid loss of the concatenated batch.
        """
        local_ids = ids
        if self.options.gather_across_ranks:
            text, ids = gather_across_ranks(text, True), gather_across_ranks(ids, False)
        scale = logit_scale(self.logit_scale)
        positives = local_ids[:, None] == ids[None, :]  # the same sample, or another with the same caption
        loss = sigmoid_pair_loss(image, text, positives, scale, self.logit_bias)
        return {"contrastive_loss": loss}, {"logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach()}

    @torch.no_grad()
    def embed(self, backbone: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Normalised image and text embeddings of a held-out set, with captions and labels."""
        images, texts, captions, labels = [], [], [], []
        for batch in batches:
            image, text = self._encode(backbone, batch)
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
            captions += list(batch["caption"])
            labels += list(batch["label"])
        return {"image": torch.cat(images), "text": torch.cat(texts), "caption": captions, "label": labels}

    @torch.no_grad()
    def class_embeddings(self, backbone: nn.Module, classnames: list[str]) -> torch.Tensor:
        """One normalised text embedding per class: the mean over prompt templates."""
        device = next(backbone.parameters()).device
        out = []
        for name in classnames:
            tokens = self.tokenizer([t.format(name) for t in self.options.templates]).to(device)
            emb = F.normalize(backbone(text=tokens)["text_features"].float(), dim=-1).mean(0)
            out.append(F.normalize(emb, dim=-1))
        return torch.stack(out).cpu()

    @torch.no_grad()
    def evaluate(self, backbone, batches):
        emb = self.embed(backbone, batches)
        classnames = self._classnames(emb)
        return score_retrieval(emb, self.class_embeddings(backbone, classnames), classnames, self.options)

    def _classnames(self, emb: dict[str, Any]) -> list[str]:
        return list(self.options.classnames) if self.options.classnames else sorted(set(emb["label"]))

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        """Retrieval is cosine similarity of the towers' normalised outputs: no graph of its own."""
        opts = self.options
        return HeadExport([], meta={"templates": list(opts.templates),
                                    "classnames": list(opts.classnames) if opts.classnames else None,
                                    "logit_scale": float(self.logit_scale.detach().exp().clamp(max=100))})


def score_retrieval(emb: dict[str, Any], class_emb: torch.Tensor, classnames: list[str],
                    options: RetrievalOptions) -> dict[str, float]:
    """All retrieval metrics from held-out embeddings (shared by torch and ONNX evaluation)."""
    sim_t2i = emb["text"] @ emb["image"].T
    same_caption = metrics.positives_from_labels(emb["caption"], emb["caption"])
    out = {}
    out.update({f"t2i_{k}": v for k, v in metrics.recall_at_k(sim_t2i, same_caption, (1, 5, 10)).items()})
    out.update({f"i2t_{k}": v for k, v in metrics.recall_at_k(sim_t2i.T, same_caption.T, (1, 5, 10)).items()})
    out["t2i_R@1_chance"] = metrics.chance_recall_at_1(same_caption)
    index = {c: i for i, c in enumerate(classnames)}
    known = [i for i, lab in enumerate(emb["label"]) if lab in index]
    if known:
        targets = torch.tensor([index[emb["label"][i]] for i in known])
        logits = emb["image"][known] @ class_emb.T
        out.update({f"zeroshot_{k}": v for k, v in metrics.topk_accuracy(logits, targets, (1, 5)).items()})
        out["zeroshot_top1_chance"] = 1.0 / len(classnames)
        if len(known) >= options.candidate_batch_size:
            prf = metrics.candidate_batch_prf(class_emb, emb["image"][known], targets,
                                              batch_size=options.candidate_batch_size,
                                              threshold=options.candidate_threshold,
                                              num_batches=options.candidate_batches)
            out.update({f"candidate_{k}": v for k, v in prf.items() if k != "batches"})
        else:  # the start-up check counted enough; skipped samples or classnames left fewer
            LOGGER.warning("retrieval: candidate_* metrics left out: %d held-out sample(s) with a label among the "
                           "classes, fewer than options.candidate_batch_size = %d", len(known),
                           options.candidate_batch_size)
    out["num_samples"] = len(emb["caption"])
    return out
