"""geo_time: where and when a photo was taken (QR-CLIP; task spec section 2).

Quantity module: the ViT carries K extra learnable [CLS] tokens per quantity (location, time),
initialised from its own [CLS]; each token's output is projected (projection initialised from the
ViT's) and trained contrastively against label prompts "a photo taken in {label}"; the base
prediction takes the max over the K tokens. The backbone's weights are untouched, so any open_clip
ViT checkpoint loads as it is.
Knowledge search: each [CLS] embedding retrieves its top-k texts from an embedded corpus.
Relevance module: a small scorer weights the image embedding and each retrieved knowledge embedding;
the weighted sum (plus a residual linear map, ``relevance_adapter``) is matched by cosine against the
training candidates' label prompts (QR-CLIP: the training set's labels, so labels.json's ``unseen`` ones
are left out unless ``train_on_unseen_candidates``), cross-entropy over them; its scores are added to the
quantity module's with a learned gate per quantity. Evaluation scores the evaluated set's labels.
Metrics (TARA): top-1 accuracy and Example-F1 over hierarchical labels: base (quantity module alone),
knowledge (with the relevance module) and no_knowledge (the relevance module given no retrieved texts:
the control that shows what the knowledge itself adds). Labels come from ``gold_location_suggest`` and
``gold_time_suggest`` by default (TARA's experiments), ``location_field``/``time_field`` choose others.
Every metric ``m`` comes with ``m_chance`` (uniform guessing over the candidates), ``m_baseline`` and
``m_baseline_rule`` (the strongest trivial rule on the same held-out labels: the majority label, or the
parent prior, which reads the gold label's parent level, e.g. the country, and answers its most common
label). With ``labels.json`` listing ``unseen`` labels (absent from training, described in the knowledge
corpus), every metric is also reported on the examples of those labels (``*_unseen``) and of the rest
(``*_seen``).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.predictors.geo_time import rewrite_time_label  # the torch-free twin serves both sides
from training import knowledge, metrics
from training.config import ConfigError
from training.export.graph import Graph, HeadExport, fixed_images
from training.losses import gather_across_ranks, logit_scale, symmetric_infonce, text_id
from training.backbone import Backbone
from training.registry import register_task
from training.tasks.base import Task, TaskOptions, require_str


QUANTITIES = ("location", "time")
GOLD_FIELDS = {"location": "gold_location", "time": "gold_time"}
SUGGEST_FIELDS = {"location": "gold_location_suggest", "time": "gold_time_suggest"}  # what TARA's experiments use
UNSEEN_KEY = "unseen"  # labels.json: {"unseen": {"location": [...], "time": [...]}}, labels absent from training


class GeoTimeOptions(TaskOptions):
    num_cls_tokens: int = 4  # K extra [CLS] tokens per quantity
    stage: Literal["quantity", "relevance", "joint"] = "joint"  # what trains (relevance: tokens frozen)
    prompt: str = "a photo taken in {}"
    location_field: str = SUGGEST_FIELDS["location"]  # json field of the location label (gold_location: the raw one)
    time_field: str = SUGGEST_FIELDS["time"]  # json field of the time label (gold_time: the raw one)
    # Example-F1 matches location names across levels, as TARA's scorer does; true: only at the same depth
    location_f1_depth_aware: bool = False
    knowledge_corpus: str | None = None  # one text per line, CSV or JSONL (text column)
    knowledge_top_k: int = 4  # texts retrieved per [CLS] token
    knowledge_refresh_steps: int = 50  # joint stage: re-embed the corpus with the moving text tower this often
    labels_file: str | None = None  # {"location": [...], "time": [...]}: training candidates
    # QR-CLIP's protocol: the relevance module's training candidates are the training set's labels, so
    # labels.json's "unseen" labels (absent from training) are left out of them; evaluation always scores
    # the evaluated set's labels. true: keep them in (every training step then pushes them down)
    train_on_unseen_candidates: bool = False
    relevance_hidden: int = 256
    relevance_adapter: bool = True  # a residual linear map on the fused embedding (zero at start)
    # json field describing what the photo shows (no label names). When set, the image [CLS] is trained
    # CLIP-style against it: the stand-in for the pretraining a from-scratch backbone lacks, so that the
    # image embedding can find the knowledge texts that describe the same cues.
    description_field: str | None = None
    description_loss_weight: float = 1.0
    retrieve_with_image: bool = False  # the image [CLS] retrieves top-k texts too, besides the K tokens
    init_logit_scale: float = math.log(1 / 0.07)


def prompt_text(template: str, quantity: str, label: str) -> str:
    """The TARA prompt: time labels are rewritten ("2017-5" -> "May, 2017") first."""
    return template.format(rewrite_time_label(label) if quantity == "time" else label)


def resolve_labels(document: dict[str, Any], fields: dict[str, str]) -> dict[str, list[str]]:
    """Candidates per quantity from labels.json: the list under the label field's own name when the file
    has one (the TARA converter writes every field), else under the quantity ("location", "time")."""
    return {q: list(document.get(fields[q], document.get(q, []))) for q in QUANTITIES}


def check_vit(visual: nn.Module) -> None:
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    missing = [n for n in needed if getattr(visual, n, None) is None]
    if missing or getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
            or getattr(visual, "final_ln_after_pool", False):
        raise ConfigError("geo_time needs an open_clip ViT with [CLS]-token pooling "
                          f"(missing {missing or 'none'}, pool_type={getattr(visual, 'pool_type', None)})")


def vit_with_extra_tokens(visual: nn.Module, images: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ViT forward with ``extra`` [T, width] tokens after [CLS].

    Returns (image embedding [B, D] from [CLS], extra token outputs after ln_post [B, T, width]).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    pos = visual.positional_embedding.to(x.dtype)
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
    tokens = extra.to(x.dtype).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, tokens, x + pos[1:]], dim=1)
    x = visual.ln_pre(x)
    x = visual.ln_post(visual.transformer(x))
    return x[:, 0] @ visual.proj, x[:, 1:1 + extra.shape[0]]


class RelevanceModule(nn.Module):
    """Weights the image-side embeddings and each knowledge embedding; returns their fused embedding.

    Each item is scored against the query (the quantity module's embedding) from [item, query,
    item * query]; the softmax-weighted sum passes a residual linear map (zero at init, so training
    starts from the plain weighted sum) and is normalised for cosine matching against label prompts.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.scorer = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.adapter = nn.Linear(dim, dim)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def forward(self, query: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, D], items [B, N, D] -> (fused [B, D], weights [B, N])."""
        q = query[:, None].expand_as(items)
        weights = self.scorer(torch.cat([items, q, items * q], dim=-1)).squeeze(-1).softmax(dim=-1)
        fused = (weights[..., None] * items).sum(dim=1)
        return F.normalize(fused + self.adapter(fused), dim=-1), weights


@register_task("geo_time")
class GeoTimeTask(Task):
    zero3_unsupported = "reads the ViT's [CLS] and projection weights outside their module's forward"
    encoder_only_options = {"knowledge_corpus": None, "labels_file": None, "stage": "quantity"}
    headline_metrics = ("location_top1_base", "location_top1_knowledge", "location_top1_no_knowledge",
                        "location_example_f1_base", "time_top1_base", "time_top1_knowledge", "time_top1_no_knowledge",
                        "time_example_f1_base", "location_top1_base_unseen", "location_top1_knowledge_unseen",
                        "location_top1_no_knowledge_unseen")  # *_unseen: labels absent from training, when marked
    Options = GeoTimeOptions

    def __init__(self, options: GeoTimeOptions, backbone: Backbone):
        super().__init__(options, backbone)
        if options.stage != "quantity" and not (options.knowledge_corpus and options.labels_file):
            raise ConfigError(f"geo_time: stage={options.stage!r} needs knowledge_corpus and labels_file")
        visual = backbone.model.visual
        check_vit(visual)
        k = options.num_cls_tokens
        start = (visual.class_embedding + visual.positional_embedding[0]).detach()
        self.extra_tokens = nn.Parameter(start.repeat(len(QUANTITIES) * k, 1).clone())
        self.token_proj = nn.Parameter(visual.proj.detach().repeat(len(QUANTITIES) * k, 1, 1).clone())
        self.logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        self.relevance = nn.ModuleDict({q: RelevanceModule(backbone.embed_dim, options.relevance_hidden)
                                        for q in QUANTITIES})
        if not options.relevance_adapter:  # the spec's module: the weighted sum alone is matched
            for module in self.relevance.values():
                module.adapter.requires_grad_(False)
        self.relevance_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        self.description_logit_scale = nn.Parameter(torch.tensor(options.init_logit_scale))
        # knowledge evidence is added to the quantity module's scores with a learned gate per quantity:
        # retrieved texts can help one quantity (location: texts name the place) and not the other
        self.knowledge_gate = nn.ParameterDict({q: nn.Parameter(torch.tensor(0.5)) for q in QUANTITIES})
        if options.stage == "relevance":  # the quantity module was trained before
            for p in (self.extra_tokens, self.token_proj, self.logit_scale):
                p.requires_grad_(False)
        self.description_logit_scale.requires_grad_(options.stage != "relevance" and bool(options.description_field))
        self.tokenizer = backbone.tokenizer
        self.fields = {"location": options.location_field, "time": options.time_field}
        document = json.loads(Path(options.labels_file).read_text()) if options.labels_file else None
        self.labels = resolve_labels(document, self.fields) if document else None
        unseen = (document or {}).get(UNSEEN_KEY) or {}
        self.unseen = {q: set(unseen.get(q, ())) for q in QUANTITIES}
        # the relevance module's training candidates (QR-CLIP: the training set's labels, see the option)
        self.train_labels = None if self.labels is None else {
            q: [x for x in self.labels[q] if options.train_on_unseen_candidates or x not in self.unseen[q]]
            for q in QUANTITIES}
        self.train_label_sets = {q: set(labels) for q, labels in (self.train_labels or {}).items()}
        self.corpus_emb: torch.Tensor | None = None  # filled by prepare()
        self.candidate_emb: dict[str, torch.Tensor] = {}

    # --- data -------------------------------------------------------------------------------------
    def map_sample(self, sample: dict[str, Any], backbone: Backbone, train: bool) -> dict[str, Any]:
        meta = sample["json"]
        out = {"task": "geo_time", "key": sample["__key__"],
               "image": (backbone.preprocess_train if train else backbone.preprocess_val)(sample["image"])}
        for q in QUANTITIES:
            field = self.fields[q]
            try:
                label = require_str(meta, field).strip()
            except ValueError as err:
                raise ValueError(f"geo_time: sample {sample['__key__']!r} has no usable label: {err} "
                                 f"(tasks.options.{q}_field; the TARA converter skips such records by default "
                                 "and counts them in summary.json)") from None
            if train and self.options.stage != "quantity" and self.train_labels is not None \
                    and label not in self.train_label_sets[q]:  # the relevance loss needs it as a candidate
                raise ValueError(f"geo_time: json.{field} {label!r} is not a training candidate of "
                                 f"{self.options.labels_file} (tasks.options.labels_file)")
            out[f"{q}_label"] = label
            out[f"{q}_prompt"] = backbone.tokenizer([prompt_text(self.options.prompt, q, label)])[0]
        field = self.options.description_field
        if field and train:
            try:
                out["description"] = require_str(meta, field)
            except ValueError as err:
                raise ValueError(f"geo_time: sample {sample['__key__']!r}: {err} (tasks.options.description_field)") \
                    from None
            out["description_tokens"] = backbone.tokenizer([out["description"]])[0]
        return out

    # --- embeddings -------------------------------------------------------------------------------
    @torch.no_grad()
    def extraction_outputs(self, backbone, images):
        """The export's extraction columns: the head's image embedding and each quantity's [CLS] tokens."""
        image, tokens = self.encode(backbone, images)
        return {f"{self.name}_image": image, **{f"{self.name}_{q}_cls": t for q, t in tokens.items()}}

    def encode(self, backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(image embedding [B, D], {quantity: token embeddings [B, K, D]}), all normalised."""
        image, outputs = vit_with_extra_tokens(backbone.visual, images, self.extra_tokens)
        projected = torch.einsum("btw,twd->btd", outputs, self.token_proj.to(outputs.dtype))
        k = self.options.num_cls_tokens
        tokens = {q: F.normalize(projected[:, i * k:(i + 1) * k], dim=-1) for i, q in enumerate(QUANTITIES)}
        return F.normalize(image, dim=-1), tokens

    @torch.no_grad()
    def prepare(self, backbone: nn.Module, cache: bool = True) -> None:
        """Embed the knowledge corpus and the training candidates with the current text tower.

        Called before training and again at each evaluation: in joint training the text tower moves,
        so the corpus is re-embedded then (without writing a cache file for every evaluation).
        """
        if self.options.knowledge_corpus:
            _, self.corpus_emb = knowledge.embed_corpus(backbone, self.tokenizer, self.options.knowledge_corpus,
                                                        cache=cache)
        if self.labels:
            self.candidate_emb = {q: self.label_embeddings(backbone, q, self.train_labels[q]) for q in QUANTITIES}

    @torch.no_grad()
    def label_embeddings(self, backbone: nn.Module, quantity: str, labels: list[str]) -> torch.Tensor:
        texts = [prompt_text(self.options.prompt, quantity, label) for label in labels]
        return knowledge.embed_texts(backbone, self.tokenizer, texts)

    def fuse_knowledge(self, quantity: str, image: torch.Tensor, tokens: torch.Tensor,
                       retrieve: bool = True) -> torch.Tensor:
        """Retrieve top-k texts for every [CLS] token and fuse them with the image-side embeddings.

        The query is the quantity module's embedding (mean of its K tokens); the items are that
        query, the image's [CLS] embedding and every retrieved knowledge embedding. ``retrieve=False``
        leaves the knowledge out: the control that shows what the retrieved texts add.
        """
        query = F.normalize(tokens.mean(dim=1), dim=-1)
        items = [query[:, None], image[:, None]]
        if retrieve:
            queries = torch.cat([tokens, image[:, None]], dim=1) if self.options.retrieve_with_image else tokens
            b, k, d = queries.shape
            _, ids = knowledge.search(queries.reshape(b * k, d).float(), self.corpus_emb,
                                      self.options.knowledge_top_k)
            items.append(self.corpus_emb[ids.reshape(b, -1)].to(image.dtype))  # [B, queries * top_k, D]
        fused, _ = self.relevance[quantity](query, torch.cat(items, dim=1))
        return fused

    # --- training ---------------------------------------------------------------------------------
    def training_forward(self, backbone, batch):
        if self.options.stage == "joint":
            self._refresh_for_moving_text_tower(backbone)
        image, tokens = self.encode(backbone, batch["image"])
        losses, report = {}, {}
        if self.options.description_field and self.options.stage != "relevance":
            losses["description_loss"] = self.options.description_loss_weight * self._description_loss(
                backbone, image, batch)
        for q in QUANTITIES:
            if self.options.stage != "relevance":
                losses[f"{q}_quantity_loss"] = self._quantity_loss(backbone, tokens[q], batch, q)
            if self.options.stage != "quantity":
                fused = self.fuse_knowledge(q, image, tokens[q].detach())
                target = self._candidate_index(q, batch[f"{q}_label"], image.device)
                logits = logit_scale(self.relevance_logit_scale) * self.knowledge_scores(
                    q, tokens[q].detach(), fused, self.candidate_emb[q])
                losses[f"{q}_relevance_loss"] = F.cross_entropy(logits, target)
                report[f"{q}_relevance_acc"] = (logits.argmax(1) == target).float().mean()
        return losses, report

    @torch.no_grad()
    def _refresh_for_moving_text_tower(self, backbone) -> None:
        """Joint training moves the text tower: candidates every step, the corpus every N steps."""
        self._steps = getattr(self, "_steps", 0) + 1
        was_training = backbone.training
        backbone.eval()
        self.candidate_emb = {q: self.label_embeddings(backbone, q, self.train_labels[q]) for q in QUANTITIES}
        if self._steps % self.options.knowledge_refresh_steps == 0:
            _, self.corpus_emb = knowledge.embed_corpus(backbone, self.tokenizer, self.options.knowledge_corpus,
                                                        cache=False)
        backbone.train(was_training)

    def knowledge_scores(self, quantity: str, tokens: torch.Tensor, fused: torch.Tensor,
                         candidates: torch.Tensor) -> torch.Tensor:
        """The quantity module's scores (max over tokens) plus the gated knowledge-fused scores."""
        base = (tokens.float() @ candidates.T.float()).amax(dim=1)
        return base + self.knowledge_gate[quantity] * (fused.float() @ candidates.T.float())

    def _quantity_loss(self, backbone, tokens: torch.Tensor, batch, quantity: str) -> torch.Tensor:
        """Each [CLS] token against the batch's label prompts (same label = positive), across ranks."""
        prompts = F.normalize(backbone(text=batch[f"{quantity}_prompt"])["text_features"], dim=-1)
        ids = torch.tensor([text_id(x) for x in batch[f"{quantity}_label"]], device=prompts.device)
        prompts, ids = gather_across_ranks(prompts, True), gather_across_ranks(ids, False)
        scale = logit_scale(self.logit_scale)
        per_token = [symmetric_infonce(gather_across_ranks(tokens[:, i], True), prompts, ids, scale)
                     for i in range(tokens.shape[1])]
        return torch.stack(per_token).mean()

    def _description_loss(self, backbone, image: torch.Tensor, batch) -> torch.Tensor:
        """The image [CLS] against its description, CLIP-style across ranks (equal descriptions are positives)."""
        texts = F.normalize(backbone(text=batch["description_tokens"])["text_features"], dim=-1)
        ids = torch.tensor([text_id(x) for x in batch["description"]], device=texts.device)
        return symmetric_infonce(gather_across_ranks(image, True), gather_across_ranks(texts, True),
                                 gather_across_ranks(ids, False), logit_scale(self.description_logit_scale))

    def _candidate_index(self, quantity: str, labels: list[str], device) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.train_labels[quantity])}
        missing = [x for x in labels if x not in index]
        if missing:
            where = "marked unseen in" if any(x in self.unseen[quantity] for x in missing) else "not in"
            raise ValueError(f"{quantity} labels {missing[:3]} are {where} {self.options.labels_file}")
        return torch.tensor([index[x] for x in labels], device=device)

    # --- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, backbone, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        self.prepare(backbone, cache=self.options.stage == "relevance")
        tokens, fused, control, golds = ({q: [] for q in QUANTITIES} for _ in range(4))
        for batch in batches:
            image, toks = self.encode(backbone, batch["image"])
            for q in QUANTITIES:
                tokens[q].append(toks[q].float())
                golds[q] += list(batch[f"{q}_label"])
                if self.options.stage != "quantity":
                    fused[q].append(self.fuse_knowledge(q, image, toks[q]).float())
                    control[q].append(self.fuse_knowledge(q, image, toks[q], retrieve=False).float())
        result = {}
        for q in QUANTITIES:
            candidates = sorted(set(golds[q]))  # TARA: the unique labels of the test set
            cand_emb = self.label_embeddings(backbone, q, candidates)
            base = (torch.cat(tokens[q]) @ cand_emb.T).amax(dim=1)  # max over the K tokens
            predictions = {"base": [candidates[i] for i in base.argmax(1).tolist()]}
            for name, parts in (("knowledge", fused[q]), ("no_knowledge", control[q])):
                if parts:  # the relevance module with the retrieved texts, and without them (the control)
                    scores = self.knowledge_scores(q, torch.cat(tokens[q]), torch.cat(parts), cand_emb)
                    predictions[name] = [candidates[i] for i in scores.argmax(1).tolist()]
            result.update(score_with_baselines(q, predictions, golds[q], candidates, self.unseen[q],
                                               self.options.location_f1_depth_aware))
        return result

    def export_onnx(self, backbone: Backbone, features: torch.Tensor) -> HeadExport:
        """The [CLS] encoder from pixels; per quantity, the relevance module over retrieved knowledge."""
        opts = self.options
        clip = backbone.model
        images = fixed_images(backbone)
        graphs = [Graph("geo_time_encoder", GeoTimeEncoder(self, clip), {"pixels": images},
                        ["image_embedding", "location_tokens", "time_tokens"])]
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"quantities": list(QUANTITIES), "prompt": opts.prompt, "num_cls_tokens": opts.num_cls_tokens,
                                "top_k": opts.knowledge_top_k, "stage": opts.stage}
        documents: dict[str, Any] = {"geo_time_labels": self.labels} if self.labels else {}
        if opts.stage != "quantity" and opts.knowledge_corpus:
            texts, corpus = knowledge.embed_corpus(clip, backbone.tokenizer, opts.knowledge_corpus, cache=False)
            arrays["geo_time_knowledge"] = corpus.float().numpy()
            documents["geo_time_knowledge"] = texts
            with torch.no_grad():
                image, tokens = self.encode(clip, images)
            with_image = bool(getattr(opts, "retrieve_with_image", False))  # the image [CLS] queries the corpus too
            for q in QUANTITIES:
                queries = torch.cat([tokens[q], image[:, None]], dim=1) if with_image else tokens[q]
                _, ids = knowledge.search(queries.reshape(-1, queries.shape[-1]), corpus, opts.knowledge_top_k)
                retrieved = corpus[ids.reshape(images.shape[0], -1)]
                labels = self.labels[q] if self.labels else ["a", "b", "c"]
                candidates = knowledge.embed_texts(clip, backbone.tokenizer, [prompt_text(opts.prompt, q, x) for x in labels])
                graphs.append(Graph(f"geo_time_relevance_{q}", GeoTimeRelevance(self, q),
                                    {"tokens": tokens[q], "image": image, "retrieved": retrieved, "candidates": candidates},
                                    ["scores"], dynamic={"candidates": {0: "candidates"}}))
                if self.labels:
                    arrays[f"geo_time_candidates_{q}"] = candidates.float().numpy()
            meta["retrieve_with_image"] = with_image
        # what Ray feature extraction (serving/extract.py) writes from this export: graph outputs -> columns
        meta["extraction"] = {"graph": "geo_time_encoder", "columns": {
            "image_embedding": "geo_time_image", "location_tokens": "geo_time_location_cls",
            "time_tokens": "geo_time_time_cls"}}
        return HeadExport(graphs, arrays=arrays, documents=documents, meta=meta)


class GeoTimeEncoder(nn.Module):
    """pixels -> (image embedding, location [CLS] tokens [B, K, D], time [CLS] tokens), all normalised."""

    def __init__(self, task: nn.Module, clip: nn.Module):
        super().__init__()
        self.task, self.clip = task, clip

    def forward(self, pixels: torch.Tensor):
        image, tokens = self.task.encode(self.clip, pixels)
        return image, tokens["location"], tokens["time"]


class GeoTimeRelevance(nn.Module):
    """Knowledge fusion and scores for one quantity, given the retrieved corpus embeddings.

    Inputs: tokens [B, K, D], image [B, D], retrieved [B, K * top_k, D] (found by exact search over
    the exported corpus, in NumPy), candidates [C, D] (label prompt embeddings). Output: the fused
    score of every candidate [B, C] (the quantity module's max over tokens + gate * fused cosine).
    """

    def __init__(self, task: nn.Module, quantity: str):
        super().__init__()
        self.task, self.quantity = task, quantity

    def forward(self, tokens, image, retrieved, candidates):
        query = F.normalize(tokens.mean(dim=1), dim=-1)
        items = torch.cat([query[:, None], image[:, None], retrieved], dim=1)
        fused, _ = self.task.relevance[self.quantity](query, items)
        return self.task.knowledge_scores(self.quantity, tokens, fused, candidates)


def hierarchy_of(quantity: str, depth_aware: bool = False):
    """The label hierarchy Example-F1 compares: TARA's plain names by default (see metrics)."""
    if quantity == "time":
        return metrics.time_hierarchy
    return partial(metrics.location_hierarchy, depth_aware=depth_aware)


def score_predictions(quantity: str, predictions: list[str], golds: list[str], name: str,
                      depth_aware: bool = False) -> dict[str, float]:
    """TARA top-1 accuracy and Example-F1 of predicted labels."""
    accuracy = sum(p == g for p, g in zip(predictions, golds)) / len(golds)
    return {f"{quantity}_top1_{name}": accuracy,
            f"{quantity}_example_f1_{name}": metrics.example_f1(predictions, golds, hierarchy_of(quantity, depth_aware))}


def most_common(labels: Iterable[str]) -> str:
    """The most frequent label; ties go to the first in sorted order."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def parent_level(quantity: str, label: str) -> str:
    """What the parent-prior rule reads: the label less its finest level (a city's "Country, Region";
    a date's year-month, a month's year, a year's decade), as TARA's hierarchies define the levels."""
    if quantity == "time":
        levels = metrics.time_levels(label)
        return levels[-2] if len(levels) > 1 else ""
    parts = metrics.location_levels(label)
    return ", ".join(parts[1:])


def prior_rules(quantity: str, golds: list[str]) -> dict[str, list[str]]:
    """The trivial rules' predictions for the held-out gold labels, both fitted on those same labels.

    ``majority``: always the most common label. ``parent prior``: read the gold label's parent level
    (information the photo shows, e.g. the country's flag) and answer that parent's most common label.
    Fitted on all the held-out labels, so on a subset of labels absent from training they score what a
    prior can: (almost) nothing.
    """
    by_parent: dict[str, list[str]] = {}
    for label in golds:
        by_parent.setdefault(parent_level(quantity, label), []).append(label)
    answer = {parent: most_common(labels) for parent, labels in by_parent.items()}
    return {"majority": [most_common(golds)] * len(golds),
            "parent prior": [answer[parent_level(quantity, label)] for label in golds]}


def chance_scores(quantity: str, golds: list[str], candidates: list[str], depth_aware: bool = False) -> dict[str, float]:
    """Uniform guessing over the candidates: expected top-1 and Example-F1."""
    hierarchy = hierarchy_of(quantity, depth_aware)
    sets = {c: set(hierarchy(c)) for c in candidates}
    f1 = 0.0
    for gold in golds:
        g = sets.get(gold) or set(hierarchy(gold))
        f1 += sum(2 * len(p & g) / (len(p) + len(g)) for p in sets.values()) / len(candidates)
    return {"top1": 1 / len(candidates), "example_f1": f1 / len(golds)}


def score_with_baselines(quantity: str, predictions: dict[str, list[str]], golds: list[str], candidates: list[str],
                         unseen: set[str] = frozenset(), depth_aware: bool = False) -> dict[str, Any]:
    """Top-1 and Example-F1 of each prediction (base, knowledge, no_knowledge), each with ``_chance``,
    ``_baseline`` (the best trivial rule of ``prior_rules``) and ``_baseline_rule``; when some gold
    labels are ``unseen`` (absent from training), all of it again on those examples (``_unseen``) and on
    the rest (``_seen``)."""
    rules = prior_rules(quantity, golds)
    subsets = {"": list(range(len(golds)))}
    if unseen and any(g in unseen for g in golds):
        subsets["_unseen"] = [i for i, g in enumerate(golds) if g in unseen]
        subsets["_seen"] = [i for i, g in enumerate(golds) if g not in unseen]
    result: dict[str, Any] = {}
    for suffix, index in subsets.items():
        if not index:
            continue
        sub_golds = [golds[i] for i in index]
        chance = chance_scores(quantity, sub_golds, candidates, depth_aware)
        rule_scores = {rule: score_predictions(quantity, [pred[i] for i in index], sub_golds, "x", depth_aware)
                       for rule, pred in rules.items()}
        for name, pred in predictions.items():
            scores = score_predictions(quantity, [pred[i] for i in index], sub_golds, name, depth_aware)
            for metric in ("top1", "example_f1"):
                key = f"{quantity}_{metric}_{name}{suffix}"
                value = scores[f"{quantity}_{metric}_{name}"]
                best = max(rule_scores, key=lambda rule: rule_scores[rule][f"{quantity}_{metric}_x"])
                result[key] = value
                result[f"{key}_chance"] = chance[metric]
                result[f"{key}_baseline"] = rule_scores[best][f"{quantity}_{metric}_x"]
                result[f"{key}_baseline_rule"] = best
        if suffix:
            result[f"{quantity}_examples{suffix}"] = float(len(index))
    return result
