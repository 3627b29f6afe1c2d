"""meme: query -> meme retrieval (CLIP4Meme; task spec section 4).

Every meme is an image, a context caption (what a captioning model said about it) and the emotion
words of the people in it; a query is a short text. Two branches score a query against a meme:

- QI: v = l2norm(the raw image embedding + g * l2norm(Linear(mean-pooled frozen-BERT states of the
  emotion words))), g a learnable gate (0.1 at start); v goes through a co-attention block with the
  text tower's token states of the context (padding masked; both cross-attentions read the raw
  inputs, image stream out); s_QI = exp(tau) * cos(query, v').
- QC: s_QC = exp(tau) * cos(query, context), the same learned tau (one logit scale, as the original).
At inference S = (alpha * cos_QI + (1 - alpha) * cos_QC) * exp(tau); ``alpha: auto`` picks alpha on a
validation split (``alpha_validation``), never on the held-out one. Loss: symmetric multi-positive
InfoNCE (items with exactly the same query string are positives), negatives gathered across ranks.
Schedule (``stage``): ``qi``, then ``qc`` started from the QI run with ``model.init_weights`` (the QI
head is frozen there), or ``joint``. Metrics: R@k and P@k (k = 1, 5, 10, 50, 100) over the whole
held-out gallery, for QI, QC and fused, reported as computed, beside uniform chance and a
caption-frequency prior.

Named options keep this code's earlier choices, each off by default: ``fusion: separate_scales`` (a
learned logit scale per branch, S = alpha * s_QI + (1 - alpha) * s_QC), ``co_attention: sequential``
(the image stream reads the text stream after the text stream has read the image), ``emotion_add:
normalised`` (the emotion vector added to the l2-normalised image embedding, not the raw one).
"""
from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace
from typing import Annotated, Any, Iterable, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from pydantic import Field, model_validator
from torch import nn

from serving.predictors.meme import meme_fields, meme_scores  # the torch-free twins serve both sides
from training import metrics
from training.config import ConfigError
from training.export.graph import FIXED_TEXTS, Graph, HeadExport
from training.losses import gather_across_ranks, logit_scale, symmetric_infonce
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions


BRANCHES = ("qi", "qc", "fused")


class MemeOptions(TaskOptions):
    stage: Literal["qi", "qc", "joint"] = "joint"  # qi, then qc from the qi run (model.init_weights); or both
    bert: str = "bert-base-uncased"  # transformers BERT name or local folder (frozen emotion encoder)
    emotion_max_length: int = Field(32, ge=2)  # BERT tokens of the joined emotion words
    # fused score = alpha * QI + (1 - alpha) * QC; "auto": the alpha of ALPHA_GRID with the best fused R@1
    # (then R@5, R@10; ties to the alpha nearest 0.5) on the alpha_validation split, never the held-out one
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = 0.7
    alpha_validation: str | None = None  # shards (folder, pattern or list as data.val takes) to choose alpha on
    # shared_scale (original): one learned logit scale for QI and QC, S = (alpha cos_QI + (1-alpha) cos_QC) / T;
    # separate_scales: a learned scale per branch, S = alpha s_QI + (1 - alpha) s_QC
    fusion: Literal["shared_scale", "separate_scales"] = "shared_scale"
    # parallel (original): both cross-attentions read the raw streams; sequential: the image stream reads
    # the text stream after it has read the image
    co_attention: Literal["parallel", "sequential"] = "parallel"
    # raw (original): v = l2norm(image + g * emotion); normalised: v = l2norm(image) + g * emotion
    emotion_add: Literal["raw", "normalised"] = "raw"
    heads: int = Field(8, ge=1)  # co-attention heads (must divide the embedding dim)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    gate_init: float = 0.1  # start value of the emotion gate g
    init_logit_scale: float = math.log(1 / 0.07)
    gather_across_ranks: bool = True  # negatives from every rank's batch
    ks: tuple[int, ...] = (1, 5, 10, 50, 100)  # R@k and P@k cut-offs

    @model_validator(mode="after")
    def _auto_alpha_needs_a_split(self):
        if self.alpha == "auto" and not self.alpha_validation:
            raise ValueError("alpha: auto needs alpha_validation (a validation split other than the held-out one)")
        return self


ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1: the alphas "auto" chooses from


# --------------------------------------------------------------------------- frozen BERT


class FrozenEmotionEncoder:
    """Mean-pooled BERT states of emotion texts, cached per text.

    Deliberately not an ``nn.Module`` attribute of the task: BERT is frozen and reloaded by name, so it
    stays out of checkpoints (110 M parameters for bert-base) and out of DeepSpeed's parameter list.
    transformers is imported here because it takes seconds to import and only this task needs it.
    """

    def __init__(self, name_or_path: str, max_length: int):
        from transformers import BertModel, BertTokenizerFast

        try:
            self.tokenizer = BertTokenizerFast.from_pretrained(name_or_path)
            self.model = BertModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"meme: options.bert {name_or_path!r} is neither a local BERT folder nor a "
                              f"cached Hugging Face model: {err}") from None
        self.max_length = max_length
        self.hidden_size = int(self.model.config.hidden_size)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """[B, hidden] float32 features on ``device``; each distinct text runs through BERT once."""
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            self.model.to(device)
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(device)
            states = self.model(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"][..., None].float()
            pooled = (states * mask).sum(1) / mask.sum(1)
            self.cache.update({t: p.cpu() for t, p in zip(new, pooled)})
        return torch.stack([self.cache[t] for t in texts]).to(device)


# --------------------------------------------------------------------------- text tower token states


def check_text_tower(model: nn.Module) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [n for n in needed if getattr(model, n, None) is None]
    if missing:
        raise ConfigError(f"meme needs an open_clip CLIP with its built-in text transformer (missing {missing})")


def encode_text_with_tokens(model: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """open_clip's ``encode_text``, also returning the token states before pooling and projection.

    Returns (projected text embedding [B, D], token states [B, L, W], padding mask [B, L], True = pad).
    Tokens after the end-of-text token (the argmax id for open_clip's tokenizer) are padding.
    """
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    pooled = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    eot = text.argmax(dim=-1)
    padding = torch.arange(text.shape[1], device=text.device)[None, :] > eot[:, None]
    return pooled, x, padding


# --------------------------------------------------------------------------- QI head


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, dropout: float):
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


class CoAttentionBlock(nn.Module):
    """Bi-directional cross-attention between the image token and the context's text tokens, image stream out.

    ``parallel`` (the original's block): the image reads the raw text tokens while the text reads the raw
    image, so with one block the text stream's output never reaches the image stream's; it is not
    computed (its layers would get no gradient). ``sequential`` (option): the text stream reads the
    image first, then the image stream reads the updated text stream. Each stream: cross-attention,
    residual + LayerNorm, FFN (D -> 4D -> D, GELU), residual + LayerNorm.
    """

    def __init__(self, dim: int, heads: int, dropout: float, mode: str = "parallel"):
        super().__init__()
        self.mode = mode
        self.image_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.image_ffn = FeedForward(dim, dropout)
        self.image_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        if mode == "sequential":
            self.text_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
            self.text_ffn = FeedForward(dim, dropout)
            self.text_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.drop = nn.Dropout(dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """image [B, 1, D], text [B, L, D], padding [B, L] (True = pad) -> image stream [B, 1, D]."""
        if self.mode == "sequential":
            text = self.text_norms[0](text + self.drop(self.text_attn(text, image, image, need_weights=False)[0]))
            text = self.text_norms[1](text + self.drop(self.text_ffn(text)))
        attended = self.image_attn(image, text, text, key_padding_mask=padding, need_weights=False)[0]
        image = self.image_norms[0](image + self.drop(attended))
        return self.image_norms[1](image + self.drop(self.image_ffn(image)))


class QIHead(nn.Module):
    """Image + gated emotion features, refined by co-attention with the context's token states."""

    def __init__(self, dim: int, text_width: int, emotion_width: int, options: MemeOptions):
        super().__init__()
        if dim % options.heads:
            raise ConfigError(f"meme: options.heads={options.heads} does not divide the embedding dim {dim}")
        self.emotion_add = options.emotion_add
        self.emotion_proj = nn.Linear(emotion_width, dim)
        self.gate = nn.Parameter(torch.tensor(float(options.gate_init)))
        self.context_proj = nn.Linear(text_width, dim)
        self.co_attention = CoAttentionBlock(dim, options.heads, options.dropout, options.co_attention)

    def forward(self, image: torch.Tensor, emotion: torch.Tensor, context_states: torch.Tensor,
                padding: torch.Tensor) -> torch.Tensor:
        """Normalised v' [B, D]. ``raw``: the emotion vector is added to the image embedding as the tower
        gives it and the sum normalised (the original); ``normalised``: added to the unit image vector."""
        emotion = F.normalize(self.emotion_proj(emotion.to(self.emotion_proj.weight.dtype)), dim=-1)
        if self.emotion_add == "raw":
            v = F.normalize(image.to(emotion.dtype) + self.gate * emotion, dim=-1)
        else:
            v = F.normalize(image, dim=-1) + self.gate * emotion
        context = self.context_proj(context_states.to(self.context_proj.weight.dtype))
        return F.normalize(self.co_attention(v[:, None], context, padding)[:, 0], dim=-1)


def caption_id(text: str) -> int:
    """A 63-bit id of the exact query string (no case folding, no stripping): the loss's positives are
    the items whose query string is identical, as the original's and as the metrics' are."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


# --------------------------------------------------------------------------- the task


@register_task("meme")
class MemeTask(Task):
    Options = MemeOptions
    zero3_unsupported = "reads the text tower's positional embedding outside its module's forward"
    headline_metrics = ("fused_R@1", "fused_R@10", "qi_R@1", "qc_R@1", "fused_P@5")

    def __init__(self, options: MemeOptions, backbone: Backbone):
        super().__init__(options, backbone)
        check_text_tower(backbone.model)
        self.emotions = FrozenEmotionEncoder(options.bert, options.emotion_max_length)
        text_width = int(backbone.model.token_embedding.weight.shape[1])
        self.qi = QIHead(backbone.embed_dim, text_width, self.emotions.hidden_size, options)
        # transforms + tokenizer (not the model) for reading the alpha_validation split (alpha: auto)
        self.sample_context = backbone.sample_context()
        if options.fusion == "shared_scale":  # one temperature for both branches (the original)
            self.logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        else:
            self.qi_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
            self.qc_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        # a stage trains only its own branch; the other's parameters get no gradient, so freeze them
        if options.stage == "qc":  # started from the QI run: keep its head as trained
            for p in [*self.qi.parameters(), *([self.qi_logit_scale] if options.fusion == "separate_scales" else [])]:
                p.requires_grad_(False)
        if options.stage == "qi" and options.fusion == "separate_scales":
            self.qc_logit_scale.requires_grad_(False)

    def branch_scale(self, branch: str) -> torch.Tensor:
        """exp(tau) of a branch ("qi" or "qc"): the shared one, or the branch's own with separate_scales."""
        if self.options.fusion == "shared_scale":
            return logit_scale(self.logit_scale)
        return logit_scale(getattr(self, f"{branch}_logit_scale"))

    def score_meta(self, alpha: float) -> dict[str, Any]:
        """What :func:`meme_scores` needs (and the export's manifest carries) to score as this head does."""
        meta: dict[str, Any] = {"fusion": self.options.fusion, "alpha": float(alpha)}
        if self.options.fusion == "shared_scale":
            meta["logit_scale"] = float(self.branch_scale("qi").detach().reshape(()))
        else:
            meta.update({f"{b}_logit_scale": float(self.branch_scale(b).detach().reshape(())) for b in ("qi", "qc")})
        return meta

    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        try:
            query, context, emotions = meme_fields(sample["json"])
        except ValueError as err:
            raise ValueError(f"meme sample {sample['__key__']}: {err}") from None
        preprocess = backbone.preprocess_train if train else backbone.preprocess_val
        return {
            "task": "meme",
            "image": preprocess(sample["image"]),
            "query": backbone.tokenizer([query])[0],
            "context": backbone.tokenizer([context])[0],
            "query_id": caption_id(query),
            "caption": query,
            "emotion_text": " ".join(emotions),
            "key": sample["__key__"],
        }

    def encode(self, backbone: nn.Module, batch: dict[str, Any], with_qi: bool = True) -> dict[str, torch.Tensor]:
        """Normalised query, context and (with_qi) v' embeddings of a batch.

        The image embedding goes to the QI head as the tower gives it (not normalised: the emotion vector
        is added to the raw embedding, as in the original), exactly what the exported image encoder outputs.
        """
        query = backbone.encode_text(batch["query"])
        context, states, padding = encode_text_with_tokens(backbone, batch["context"])
        result = {"query": F.normalize(query, dim=-1), "context": F.normalize(context, dim=-1)}
        if with_qi:
            image = backbone.encode_image(batch["image"])
            emotion = self.emotions.encode(list(batch["emotion_text"]), query.device)
            result["qi"] = self.qi(image, emotion, states, padding)
        return result

    def training_forward(self, backbone, batch):
        emb = self.encode(backbone, batch, with_qi=self.options.stage != "qc")
        ids = torch.as_tensor(batch["query_id"], device=emb["query"].device)
        if self.options.gather_across_ranks:
            emb = {k: gather_across_ranks(v, True) for k, v in emb.items()}
            ids = gather_across_ranks(ids, False)
        losses, report = {}, {}
        if self.options.stage != "qc":
            losses["qi_loss"] = symmetric_infonce(emb["query"], emb["qi"], ids, self.branch_scale("qi"))
            report["gate"] = self.qi.gate.detach().reshape(())
        if self.options.stage != "qi":
            losses["qc_loss"] = symmetric_infonce(emb["query"], emb["context"], ids, self.branch_scale("qc"))
        return losses, report

    @torch.no_grad()
    def embed(self, backbone: nn.Module, batches: Iterable[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Normalised query, context and v' embeddings of every item (CPU, float32) and the query strings."""
        parts: dict[str, list[torch.Tensor]] = {"query": [], "context": [], "qi": []}
        captions: list[str] = []
        for batch in batches:
            for k, v in self.encode(backbone, batch).items():
                parts[k].append(v.float().cpu())
            captions += list(batch["caption"])
        return {k: torch.cat(v) for k, v in parts.items()}, captions

    @torch.no_grad()
    def fitted_alpha(self, backbone: nn.Module) -> float:
        """The configured alpha, or with ``alpha: auto`` the grid alpha with the best fused (R@1, R@5, R@10)
        on the alpha_validation split (ties: the alpha nearest 0.5). Deterministic, so every rank, a
        re-evaluation and the export all get the same value."""
        if self.options.alpha != "auto":
            return float(self.options.alpha)
        from training.data import eval_loader, to_device

        device = next(backbone.parameters()).device
        context = self.sample_context
        loader = eval_loader(self.options.alpha_validation, self, SimpleNamespace(sample_context=lambda: context), 200)
        emb, captions = self.embed(backbone, (to_device(b, device) for b in loader))
        return choose_alpha(emb, captions, self.score_meta(0.5))

    @torch.no_grad()
    def evaluate(self, backbone, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        alpha = self.fitted_alpha(backbone)
        emb, captions = self.embed(backbone, batches)
        out = score_meme(branch_scores(emb, self.score_meta(alpha)), captions, self.options.ks)
        out["alpha"] = alpha
        return out

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        """Frozen BERT (emotion features), the QI head (from image features); QC is text_encoder.onnx alone.

        The BERT tokenizer is written by :func:`export_model` (it needs the output folder): see ``files``.
        """
        emotions = self.emotions
        texts = ["happy angry", "sad", "", "surprised happy fearful disgusted"]
        tokens = emotions.tokenizer(texts, padding=True, truncation=True, max_length=emotions.max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"].long(), tokens["attention_mask"].long()
        bert = EmotionEncoder(emotions.model.cpu())
        token_axes = {0: "batch", 1: "tokens"}
        with torch.no_grad():
            emotion_features = bert(ids, mask)
        context_ids = backbone.tokenizer(FIXED_TEXTS)
        graphs = [Graph("meme_emotion_encoder", bert, {"input_ids": ids, "attention_mask": mask}, ["emotion_features"],
                        dynamic={"input_ids": token_axes, "attention_mask": token_axes}),
                  Graph("meme_qi", MemeQI(self, backbone.model),
                        {"image_features": features, "emotion_features": emotion_features, "context_ids": context_ids},
                        ["qi_embedding"])]
        meta = {**self.score_meta(self.fitted_alpha(backbone.model)), "stage": self.options.stage,
                "emotion_max_length": int(emotions.max_length),
                "emotion_tokenizer": f"{MEME_TOKENIZER_DIR}/tokenizer.json",
                "pad_token_id": int(emotions.tokenizer.pad_token_id), "pad_token": str(emotions.tokenizer.pad_token)}
        return HeadExport(graphs, meta=meta, files={MEME_TOKENIZER_DIR: emotions.tokenizer.save_pretrained})


class EmotionEncoder(nn.Module):
    """The frozen BERT: (input_ids, attention_mask) [B, L] -> mean-pooled last states [B, H], as the meme task pools."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = attention_mask[..., None].float()
        return (states * mask).sum(1) / mask.sum(1)


class MemeQI(nn.Module):
    """(image_features [B, D] from image_encoder.onnx, emotion_features [B, H], context_ids [B, L]) -> v' [B, D] (normalised)."""

    def __init__(self, task: nn.Module, clip: nn.Module):
        super().__init__()
        self.task, self.clip = task, clip

    def forward(self, image_features, emotion_features, context_ids):
        _, states, padding = encode_text_with_tokens(self.clip, context_ids)
        return self.task.qi(image_features, emotion_features, states, padding)


MEME_TOKENIZER_DIR = "meme_emotion_tokenizer"  # tokenizer.json of the frozen BERT (the `tokenizers` package reads it)


def branch_scores(emb: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """[Q, G] scores of every query against every meme: QI, QC and fused (``meta`` as
    :meth:`MemeTask.score_meta` gives it), by the function serving ranks with."""
    return meme_scores(emb["query"], emb["qi"], emb["context"], meta)


def choose_alpha(emb: dict[str, torch.Tensor], captions: list[str], meta: dict[str, Any],
                 grid: Iterable[float] = ALPHA_GRID) -> float:
    """The grid alpha whose fused ranking has the best (R@1, R@5, R@10) on these items; ties go to the
    alpha nearest 0.5, then the smaller one. Call it on a validation split only."""
    positives = metrics.positives_from_labels(captions, captions)
    best: tuple | None = None
    for alpha in grid:
        fused = branch_scores(emb, {**meta, "alpha": float(alpha)})["fused"]
        recall = metrics.recall_at_k(fused, positives, (1, 5, 10))
        key = (recall["R@1"], recall["R@5"], recall["R@10"], -abs(alpha - 0.5), -alpha)
        if best is None or key > best[0]:
            best = (key, float(alpha))
    return best[1]


def chance_recall_at_k(positives: torch.Tensor, k: int) -> float:
    """Expected R@k of a uniformly random ranking: mean over queries of 1 - C(G - n, k) / C(G, k)."""
    g = positives.shape[1]
    k = min(int(k), g)
    n = positives.sum(dim=1).double()
    miss = torch.ones_like(n)
    for i in range(k):  # P(none of the first k is positive) = prod_i (G - n - i) / (G - i)
        miss = miss * ((g - n - i).clamp(min=0) / (g - i))
    return float((1 - miss).mean())


def caption_prior_scores(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-independent gallery scores of the caption-frequency prior, [G] each: for P@k every item by how
    often its caption occurs (the best fixed order for P@k); for R@k one item per caption by frequency
    first, then the second copies, and so on (the best fixed order for R@k: no slot repeats a caption)."""
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    frequency, occurrence = [], []
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    for c in captions:
        occurrence.append(seen.get(c, 0))
        seen[c] = occurrence[-1] + 1
        frequency.append(counts[c])
    frequency_t = torch.tensor(frequency, dtype=torch.float64)
    distinct_first = frequency_t - (len(captions) + 1) * torch.tensor(occurrence, dtype=torch.float64)
    return frequency_t, distinct_first


def score_meme(scores: dict[str, torch.Tensor], captions: list[str], ks=(1, 5, 10, 50, 100)) -> dict[str, float]:
    """R@k and P@k of each branch; query i's positives are the memes whose query string equals its own
    exactly (case counts, as in the original's evaluation).

    The gallery is the whole evaluated set and each item's query is one query row. Values are reported
    exactly as computed (no constant offsets, unlike the EFB script). Beside them, shared by the
    branches: ``R@k_chance`` / ``P@k_chance`` (a uniformly random ranking) and ``R@k_baseline`` /
    ``P@k_baseline`` (the caption-frequency prior, the strongest query-independent ranking, its
    frequencies counted on this same held-out gallery, so an upper bound of such rules).
    """
    positives = metrics.positives_from_labels(captions, captions)
    out: dict[str, float] = {}
    for name, sim in scores.items():
        out.update({f"{name}_{k}": v for k, v in metrics.recall_at_k(sim, positives, ks).items()})
        out.update({f"{name}_{k}": v for k, v in metrics.precision_at_k(sim, positives, ks).items()})
    p_chance = metrics.chance_recall_at_1(positives)  # n_pos / G: also P@k's chance for every k
    frequency, distinct_first = caption_prior_scores(captions)
    rows = positives.shape[0]
    recall_prior = metrics.recall_at_k(distinct_first.expand(rows, -1), positives, ks)
    precision_prior = metrics.precision_at_k(frequency.expand(rows, -1), positives, ks)
    for k in ks:
        out[f"R@{k}_chance"] = chance_recall_at_k(positives, k)
        out[f"P@{k}_chance"] = p_chance
        out[f"R@{k}_baseline"] = recall_prior[f"R@{k}"]
        out[f"P@{k}_baseline"] = precision_prior[f"P@{k}"]
        out[f"R@{k}_baseline_rule"] = "caption-frequency prior, one item per caption"
        out[f"P@{k}_baseline_rule"] = "caption-frequency prior"
    out["R@1_chance"] = p_chance  # exact, the k = 1 case of chance_recall_at_k
    out["num_samples"] = len(captions)
    return out
