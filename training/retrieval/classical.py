"""The "old-fashioned" retriever of the original work, as a baseline for CLIP (task spec section 1).

Image side: dense local descriptors (HOG blocks + a joint colour histogram of the same window) ->
optional PCA -> k-means visual vocabulary -> a bag-of-features histogram per image (square-rooted,
l2-normalised, so cosine similarity is the Hellinger kernel). Classes are the per-class centroids of
the training histograms ("nearest cluster").

Query side: the original retrieves by *label* (a query names a class), and so does this retriever.
A class query is its class centroid; a free-text query goes through a TF-IDF + logistic-regression
text classifier fitted on the training captions, and is the probability-weighted mix of the class
centroids. It therefore cannot tell apart two captions whose main object is the same class: that is
the baseline's real limit and shows in its caption-level recall.

Everything is fitted on the training split only (the original fits on test data too). The output is
the same embedding dict as CLIP's, so ``score_retrieval`` scores both with the same functions.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from skimage.feature import hog
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from shards.reader import make_eval_loader
from shards.samples import expand_urls
from training import metrics
from training.validation import load_config
from shards.members import single_image
from training.evaluation import load_weights
from training.model import build_model
from training.tasks.retrieval import RetrievalOptions, score_retrieval

THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 1.0, 0.025), 3))  # candidate thresholds tried at fit time


@dataclass(frozen=True)
class ClassicalOptions:
    image_size: int = 64  # images are centre-cropped and resized to this square first
    cell: int = 8  # HOG cell (pixels); descriptor windows move by one cell
    block: int = 2  # HOG block in cells: each local descriptor covers block*cell pixels square
    orientations: int = 9  # HOG orientation bins
    colour_bins: int = 4  # per channel; the window's joint RGB histogram has colour_bins**3 bins
    pca_components: int | None = 32  # None: cluster the raw descriptors
    vocabulary: int = 128  # k-means visual words
    max_fit_descriptors: int = 60_000  # descriptors sampled from the training set to fit PCA + k-means
    seed: int = 0


@dataclass
class Samples:
    """Decoded samples of a split, kept in memory: the images and what queries need."""

    images: list[Image.Image]
    captions: list[str]
    labels: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _raw_sample(sample: dict[str, Any]) -> dict[str, Any]:
    image = single_image(sample)
    if image is None:
        raise KeyError(f"no image member among {sorted(sample)}")
    meta = sample["json"]
    if "caption" not in meta:
        raise KeyError(f"json has no 'caption' field (keys: {sorted(meta)})")
    return {"image": image, "caption": meta["caption"], "label": meta.get("label", meta["caption"]),
            "key": sample["__key__"]}


def load_samples(urls) -> Samples:
    """Every usable sample of ``urls`` in shard order (corrupt ones are skipped and counted)."""
    urls = expand_urls(urls)
    out = Samples([], [], [], [])
    for batch in make_eval_loader(urls, map_fn=_raw_sample, batch_size=256, collate_fn=list):
        for s in batch:
            out.images.append(s["image"])
            out.captions.append(s["caption"])
            out.labels.append(s["label"])
            out.keys.append(s["key"])
    if not len(out):
        raise ValueError(f"no usable samples in {urls[:3]}{'...' if len(urls) > 3 else ''}")
    return out


# --------------------------------------------------------------------------- local descriptors


def _square(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.BILINEAR))


def window_colour_histograms(rgb: np.ndarray, cell: int, block: int, bins: int) -> np.ndarray:
    """Joint RGB histogram of every block*cell window (stride one cell), aligned with HOG's blocks."""
    quantised = (rgb.astype(np.int32) * bins) // 256
    index = (quantised[..., 0] * bins + quantised[..., 1]) * bins + quantised[..., 2]
    n = rgb.shape[0] // cell
    one_hot = np.eye(bins ** 3, dtype=np.float32)[index[: n * cell, : n * cell]]
    cells = one_hot.reshape(n, cell, n, cell, -1).sum(axis=(1, 3))  # [n, n, bins^3]
    windows = sum(cells[i : n - block + 1 + i, j : n - block + 1 + j] for i in range(block) for j in range(block))
    windows = windows.reshape(-1, bins ** 3)
    return np.sqrt(windows / windows.sum(axis=1, keepdims=True))  # Hellinger: comparable scale to HOG


def local_descriptors(image: Image.Image, opts: ClassicalOptions) -> np.ndarray:
    """[windows, d]: each window's HOG block next to its colour histogram."""
    rgb = _square(image, opts.image_size)
    blocks = hog(rgb, orientations=opts.orientations, pixels_per_cell=(opts.cell, opts.cell),
                 cells_per_block=(opts.block, opts.block), block_norm="L2-Hys", feature_vector=False,
                 channel_axis=-1)
    shape_part = blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)
    colour_part = window_colour_histograms(rgb, opts.cell, opts.block, opts.colour_bins)
    return np.concatenate([shape_part, colour_part], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- the retriever


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class ClassicalRetriever:
    """Bag-of-features image index + label-based queries; :meth:`fit` sees the training split only."""

    options: ClassicalOptions = field(default_factory=ClassicalOptions)
    fit_keys: list[str] = field(default_factory=list)  # the samples fit() used (checked for leakage)
    classes: list[str] = field(default_factory=list)
    candidate_threshold: float = 0.5  # calibrated on the training split by fit()

    def fit(self, train: Samples) -> "ClassicalRetriever":
        opts = self.options
        rng = np.random.default_rng(opts.seed)
        per_image = [local_descriptors(img, opts) for img in train.images]
        pool = np.concatenate(per_image)
        if len(pool) > opts.max_fit_descriptors:
            pool = pool[rng.choice(len(pool), opts.max_fit_descriptors, replace=False)]
        self.pca = PCA(opts.pca_components, random_state=opts.seed).fit(pool) if opts.pca_components else None
        self.kmeans = MiniBatchKMeans(opts.vocabulary, random_state=opts.seed, n_init=3,
                                      batch_size=4096).fit(self._project(pool))
        train_bof = np.stack([self._histogram(d) for d in per_image])
        self.classes = sorted(set(train.labels))
        label_index = np.array([self.classes.index(lab) for lab in train.labels])
        self.centroids = _l2(np.stack([train_bof[label_index == c].mean(0) for c in range(len(self.classes))]))
        self.text_model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(max_iter=2000))
        self.text_model.fit(train.captions, train.labels)
        self.candidate_threshold = self._calibrate_threshold(train_bof, label_index)
        self.fit_keys = list(train.keys)
        return self

    def _project(self, descriptors: np.ndarray) -> np.ndarray:
        return self.pca.transform(descriptors) if self.pca is not None else descriptors

    def _histogram(self, descriptors: np.ndarray) -> np.ndarray:
        words = self.kmeans.predict(self._project(descriptors))
        counts = np.bincount(words, minlength=self.options.vocabulary).astype(np.float32)
        return _l2(np.sqrt(counts / counts.sum()))

    def _calibrate_threshold(self, train_bof: np.ndarray, label_index: np.ndarray) -> float:
        """The candidate-batch threshold with the best F1 on the training split (BoF cosines are all
        positive, so CLIP's threshold would retrieve everything)."""
        def f1(threshold: float) -> float:
            return metrics.candidate_batch_prf(self.centroids, train_bof, label_index, threshold=float(threshold),
                                               num_batches=100, seed=self.options.seed)["f1"]
        return float(max(THRESHOLD_GRID, key=f1))

    def index_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """l2-normalised bag-of-features vectors, [N, vocabulary]."""
        return torch.from_numpy(np.stack([self._histogram(local_descriptors(img, self.options)) for img in images]))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Free-text queries: the text classifier's class probabilities mixing the class centroids."""
        proba = self.text_model.predict_proba(list(texts))  # columns follow text_model.classes_
        order = [self.classes.index(c) for c in self.text_model.classes_]
        return torch.from_numpy(_l2(proba @ self.centroids[order]).astype(np.float32))

    def class_embeddings(self, classnames: Sequence[str]) -> torch.Tensor:
        """Class queries: the class centroid (zero for a class never seen in training)."""
        rows = [self.centroids[self.classes.index(c)] if c in self.classes else np.zeros_like(self.centroids[0])
                for c in classnames]
        return torch.from_numpy(np.stack(rows).astype(np.float32))


# --------------------------------------------------------------------------- scoring shared with CLIP


def query_by_example(image_emb: torch.Tensor, labels: Sequence[str], ks=(1, 5, 10)) -> dict[str, float]:
    """Image->image recall@k, positives = other gallery images of the same label (the query excluded)."""
    positives = metrics.positives_from_labels(labels, labels)
    positives.fill_diagonal_(False)
    keep = positives.any(dim=1)
    sim = (image_emb @ image_emb.T).double()
    sim.fill_diagonal_(float("-inf"))
    out = {f"i2i_{k}": v for k, v in metrics.recall_at_k(sim[keep], positives[keep], ks).items()}
    out["i2i_R@1_chance"] = (positives[keep].double().sum(1) / (len(labels) - 1)).mean().item()
    return out


@contextmanager
def timed(seconds: dict[str, float], phase: str):
    """Add the wall seconds of the ``with`` body to ``seconds[phase]``."""
    start = time.perf_counter()
    yield
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def evaluate_classical(train: Samples, val: Samples, options: ClassicalOptions | None = None,
                       retrieval_options=None, classnames: Iterable[str] | None = None
                       ) -> tuple[dict[str, float], ClassicalRetriever]:
    """Fit on ``train``, score on ``val`` with CLIP's metric functions; metrics include wall times.

    Raises ValueError if a validation sample's key was also a training sample (leakage).
    """
    leaked = set(train.keys) & set(val.keys)
    if leaked:
        raise ValueError(f"{len(leaked)} validation keys are also training keys (e.g. {sorted(leaked)[:3]}): "
                         "the train and val shard sets overlap")
    retrieval_options = retrieval_options or RetrievalOptions()
    seconds: dict[str, float] = {}
    with timed(seconds, "fit_s"):
        retriever = ClassicalRetriever(options or ClassicalOptions()).fit(train)
    with timed(seconds, "index_s"):
        image_emb = retriever.index_images(val.images)
    names = list(classnames) if classnames else sorted(set(val.labels))
    with timed(seconds, "query_s"):
        emb = {"image": image_emb, "text": retriever.embed_texts(val.captions), "caption": val.captions,
               "label": val.labels}
        calibrated = retrieval_options.model_copy(update={"candidate_threshold": retriever.candidate_threshold})
        out = score_retrieval(emb, retriever.class_embeddings(names), names, calibrated)
    out.update(query_by_example(image_emb, val.labels))
    out["candidate_threshold"] = retriever.candidate_threshold
    out.update(seconds)
    return out, retriever


# --------------------------------------------------------------------------- side by side with CLIP


@torch.no_grad()
def evaluate_clip(cfg, checkpoint, val: Samples, classnames: Sequence[str], fit_seconds: float,
                  batch_size: int = 250) -> dict[str, float]:
    """CLIP's retrieval metrics on in-memory ``val``: trained weights (``checkpoint``) or, with None,
    the configured backbone as built (zero-shot); timed like the classical retriever."""
    model, backbone = build_model(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if "retrieval" not in model.heads:
        raise ValueError(f"the run's config has no retrieval task (tasks: {sorted(model.heads)})")
    task, net = model.heads["retrieval"], model.backbone.eval()
    seconds: dict[str, float] = {}
    chunks = [slice(i, i + batch_size) for i in range(0, len(val), batch_size)]
    with timed(seconds, "index_s"):
        image_emb = torch.cat([F.normalize(net(image=torch.stack([backbone.preprocess_val(im) for im in val.images[c]])
                                               )["image_features"].float(), dim=-1) for c in chunks])
    with timed(seconds, "query_s"):
        text_emb = torch.cat([F.normalize(net(text=backbone.tokenizer(val.captions[c]))["text_features"].float(), dim=-1)
                              for c in chunks])
        emb = {"image": image_emb, "text": text_emb, "caption": val.captions, "label": val.labels}
        out = score_retrieval(emb, task.class_embeddings(net, list(classnames)), list(classnames), task.options)
    out.update(query_by_example(image_emb, val.labels))
    out["candidate_threshold"] = task.options.candidate_threshold
    return {**out, "fit_s": fit_seconds, **seconds}


def training_seconds(run_dir) -> float:
    """Wall time of a run's training, from its run folder: config.yaml is written first, the final weights last."""
    run_dir = Path(run_dir)
    start, end = run_dir / "config.yaml", run_dir / "final" / "model.safetensors"
    if not (start.is_file() and end.is_file()):
        raise FileNotFoundError(f"{run_dir} is not a finished run (needs config.yaml and final/model.safetensors)")
    return end.stat().st_mtime - start.stat().st_mtime


TABLE_ROWS = (  # (metric, chance key or None)
    ("t2i_R@1", "t2i_R@1_chance"), ("t2i_R@5", None), ("t2i_R@10", None),
    ("i2t_R@1", "t2i_R@1_chance"), ("i2t_R@5", None), ("i2t_R@10", None),
    ("zeroshot_top1", "zeroshot_top1_chance"), ("zeroshot_top5", None),
    ("candidate_precision", None), ("candidate_recall", None), ("candidate_f1", None),
    ("i2i_R@1", "i2i_R@1_chance"), ("i2i_R@5", None), ("i2i_R@10", None),
    ("candidate_threshold", None), ("fit_s", None), ("index_s", None), ("query_s", None),
)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per method, chance where the metric has one."""
    methods = list(results)
    lines = ["| metric | chance | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    first = results[methods[0]]
    for key, chance_key in TABLE_ROWS:
        chance = f"{first[chance_key]:.3f}" if chance_key and chance_key in first else ""
        cells = [_cell(results[m].get(key), key) for m in methods]
        lines.append(f"| {key} | {chance} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if key.endswith("_s") else f"{value:.3f}"


def compare_retrievers(run_dir, train_urls=None, val_urls=None, zero_shot: bool | None = None,
                       options: ClassicalOptions | None = None) -> dict[str, Any]:
    """CLIP (the run's final weights), zero-shot CLIP (when the backbone has pretrained weights, or
    forced) and the classical retriever, on the same held-out samples with the same metric functions.

    Args:
        run_dir: a finished run folder (config.yaml + final/model.safetensors).
        train_urls, val_urls: shard patterns; default the run config's data.train / data.val.
        zero_shot: add the untrained configured backbone; None: only when ``model.pretrained`` is set.
        options: the classical retriever's settings.
    Returns:
        ``{"results": {method: metrics}, "markdown": table, "samples": {...}}``.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    train_urls, val_urls = train_urls or cfg.data.train, val_urls or cfg.data.val
    if set(expand_urls(train_urls)) & set(expand_urls(val_urls)):
        raise ValueError(f"train shards {train_urls} and val shards {val_urls} overlap")
    train, val = load_samples(train_urls), load_samples(val_urls)
    task_options = next((t.options for t in cfg.tasks if t.name == "retrieval"), RetrievalOptions())
    classnames = list(task_options.classnames or ()) or sorted(set(val.labels))
    results = {"CLIP (trained)": evaluate_clip(cfg, run_dir, val, classnames, training_seconds(run_dir))}
    if zero_shot or (zero_shot is None and cfg.model.pretrained):
        results["CLIP (zero-shot)"] = evaluate_clip(cfg, None, val, classnames, 0.0)
    results["classical BoF"], _ = evaluate_classical(train, val, options, task_options, classnames)
    return {"results": results, "markdown": markdown_table(results),
            "samples": {"train": len(train), "val": len(val), "train_urls": train_urls, "val_urls": val_urls}}
