"""Batch inference on exported models, without torch: shards, image folders or text queries -> JSONL.

    model = ExportedModel("exports/run1")                 # manifest, sessions, tokenizer, preprocessing
    summary = infer_images(model, shard_items("data/val"), ["time", "geo_time"], "out/")
    infer_queries(model, ["a red circle"], "out/", gallery="out/gallery")

Each task has a predictor (``@register_predictor``) that turns a batch of pixels (and the shared image
encoder's features) into one JSON record per image. A bad image is written to ``errors.jsonl`` with
its shard and key, and the batch goes on without it.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import braceexpand
import numpy as np
from PIL import Image
from tqdm import tqdm

from serving.preprocess import Preprocess
from shards import members as shard_members  # torch-free: the member names shared with training
from serving.runtime import RuntimeOptions, Session
from serving.tokenizer import BPETokenizer, WordPieceTokenizer

LOG = logging.getLogger("multiclip.serving")
TOWER_GRAPHS = ("image_encoder", "text_encoder")  # the large graphs; only these go to TensorRT


# --------------------------------------------------------------------------- exported model


class ExportedModel:
    """An export folder: manifest, preprocessing, tokenizer and lazily opened onnxruntime sessions."""

    def __init__(self, export_dir: str | Path, options: RuntimeOptions = RuntimeOptions()):
        self.dir = Path(export_dir)
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: not an export folder (run launch/export.py first)")
        self.manifest = json.loads(manifest.read_text())
        self.options = options
        self.preprocess = Preprocess.from_dict(self.manifest["preprocess"])
        tok = self.manifest["tokenizer"]
        self.tokenizer = BPETokenizer(self.dir / tok["bpe_file"], tok["context_length"], tok["clean"])
        self._sessions: dict[str, Session] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def session(self, graph: str) -> Session:
        if graph not in self._sessions:
            entry = self.manifest["graphs"][graph]
            wanted = [p for p, on in (("int8", self.options.int8), ("fp16", self.options.fp16)) if on and p in entry]
            self._sessions[graph] = Session(self.dir / (entry[wanted[0]]["file"] if wanted else entry["file"]),
                                            self.options, allow_tensorrt=graph in TOWER_GRAPHS)
        return self._sessions[graph]

    def provider_report(self) -> dict[str, dict[str, Any]]:
        """Per graph opened so far: file, requested providers, providers in use, fallbacks {provider, reason}."""
        return {graph: session.report() for graph, session in self._sessions.items()}

    def array(self, name: str) -> np.ndarray:
        return np.load(self.dir / f"{name}.npy")

    def document(self, name: str) -> Any:
        return json.loads((self.dir / f"{name}.json").read_text())

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """Projected image features [B, D] (not normalised; heads such as time start from them)."""
        return self.session("image_encoder").run(pixels=pixels)["image_features"]

    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings [N, D]."""
        out = [self.session("text_encoder").run(input_ids=self.tokenizer(texts[i:i + batch_size]))["text_features"]
               for i in range(0, len(texts), batch_size)]
        return normalize(np.concatenate(out)) if out else np.zeros((0, self.manifest["embed_dim"]), np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best columns per row, best first; ties to the lower index (as training.metrics)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# --------------------------------------------------------------------------- predictors


@dataclass
class Settings:
    top_k: int = 5
    classes: list[str] | None = None  # retrieval zero-shot classes (default: the export's, if any)
    geo_labels: dict[str, list[str]] | None = None  # geo_time candidates (default: the export's labels.json)


class Predictor:
    """One task's inference; ``predict`` returns one record per image of the batch."""

    uses_features = True  # needs the shared image encoder's output

    def __init__(self, model: ExportedModel, settings: Settings):
        self.model, self.settings, self.meta = model, settings, model.manifest["tasks"].get(self.task, {})

    task: str = ""

    def predict(self, pixels: np.ndarray, features: np.ndarray | None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self, out_dir: Path, keys: list[dict[str, Any]]) -> None:
        """Write what spans the whole run (e.g. the retrieval gallery)."""


PREDICTORS: dict[str, type[Predictor]] = {}


def register_predictor(task: str) -> Callable[[type[Predictor]], type[Predictor]]:
    def decorate(cls: type[Predictor]) -> type[Predictor]:
        if task in PREDICTORS:
            raise ValueError(f"a predictor for {task!r} is already registered")
        cls.task = task
        PREDICTORS[task] = cls
        return cls

    return decorate


@register_predictor("retrieval")
class RetrievalPredictor(Predictor):
    """Keeps every image embedding for the gallery; zero-shot top-k when class names are known."""

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.embeddings: list[np.ndarray] = []
        self.classes = settings.classes or self.meta.get("classnames")
        self.class_emb = class_embeddings(model, self.classes, self.meta["templates"]) if self.classes else None

    def predict(self, pixels, features):
        image = normalize(features)
        self.embeddings.append(image)
        if self.class_emb is None:
            return [{} for _ in range(len(image))]
        scores = image @ self.class_emb.T
        best = top_k(scores, self.settings.top_k)
        return [{"label": self.classes[row[0]], "top_k": [{"label": self.classes[j], "score": float(s[j])} for j in row]}
                for row, s in zip(best, scores)]

    def finish(self, out_dir, keys):
        gallery = out_dir / "gallery"
        gallery.mkdir(parents=True, exist_ok=True)
        dim = self.model.manifest["embed_dim"]
        np.save(gallery / "embeddings.npy", np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32))
        (gallery / "keys.json").write_text(json.dumps(keys))


def class_embeddings(model: ExportedModel, classes: list[str], templates: list[str]) -> np.ndarray:
    """One embedding per class: the renormalised mean over templates (as the retrieval task)."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = model.text_embeddings(texts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return normalize(emb)


@register_predictor("time")
class TimePredictor(Predictor):
    def predict(self, pixels, features):
        out = self.model.session("time_head").run(image_features=features)
        centres = self.meta["hour_bin_centre_minutes"]
        k = self.settings.top_k
        records = []
        for i, hour_row in enumerate(top_k(out["hour_logits"], k)):
            minutes = centres[hour_row[0]]
            record = {"hour_bin": int(hour_row[0]), "time": f"{int(minutes // 60):02d}:{int(minutes % 60):02d}",
                      "hour_top_k": hour_row.tolist()}
            if "month_logits" in out:
                month_row = top_k(out["month_logits"][i:i + 1], min(k, 12))[0]
                record.update(month=int(month_row[0]) + 1, month_top_k=(month_row + 1).tolist())
            records.append(record)
        return records


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def rewrite_time_label(label: str) -> str:
    """TARA's prompt form ("2017-5" -> "May, 2017"); the torch-free twin of training.metrics'."""
    parts = [int(p) for p in str(label).strip().split("-")]
    if not 1 <= len(parts) <= 3 or (len(parts) > 1 and not 1 <= parts[1] <= 12) or \
            (len(parts) > 2 and not 1 <= parts[2] <= 31):
        raise ValueError(f"not a YYYY, YYYY-M or YYYY-M-D time label: {label!r}")
    if len(parts) == 3:
        return f"{MONTHS[parts[1] - 1]} {parts[2]}, {parts[0]}"
    if len(parts) == 2:
        return f"{MONTHS[parts[1] - 1]}, {parts[0]}"
    return str(parts[0])


@register_predictor("geo_time")
class GeoTimePredictor(Predictor):
    """Base prediction (max over [CLS] tokens) and, with a knowledge corpus, the fused prediction."""

    uses_features = False

    def __init__(self, model, settings):
        super().__init__(model, settings)
        exported = model.document("geo_time_labels") if (model.dir / "geo_time_labels.json").is_file() else None
        self.labels = settings.geo_labels or exported
        if not self.labels:
            raise ValueError("geo_time: no candidate labels (export one with labels_file or pass --geo-labels)")
        self.candidates = {}
        for q in self.meta["quantities"]:
            if settings.geo_labels is None and (model.dir / f"geo_time_candidates_{q}.npy").is_file():
                self.candidates[q] = model.array(f"geo_time_candidates_{q}")
            else:
                prompts = [self.meta["prompt"].format(rewrite_time_label(x) if q == "time" else x) for x in self.labels[q]]
                self.candidates[q] = model.text_embeddings(prompts)
        self.corpus = model.array("geo_time_knowledge") if "geo_time_knowledge.npy" in model.manifest["files"] else None

    def predict(self, pixels, features):
        out = self.model.session("geo_time_encoder").run(pixels=pixels)
        records = [{} for _ in range(len(pixels))]
        for q in self.meta["quantities"]:
            tokens, labels = out[f"{q}_tokens"], self.labels[q]
            base = np.einsum("bkd,cd->bkc", tokens, self.candidates[q]).max(axis=1)
            for record, i in zip(records, base.argmax(axis=1)):
                record[f"{q}_base"] = labels[i]
            if self.corpus is not None:
                queries = np.concatenate([tokens, out["image_embedding"][:, None]], axis=1) \
                    if self.meta.get("retrieve_with_image") else tokens
                retrieved = self.retrieve(queries)
                scores = self.model.session(f"geo_time_relevance_{q}").run(
                    tokens=tokens, image=out["image_embedding"], retrieved=retrieved, candidates=self.candidates[q])["scores"]
                for record, i in zip(records, scores.argmax(axis=1)):
                    record[f"{q}_knowledge"] = labels[i]
        return records

    def retrieve(self, queries: np.ndarray) -> np.ndarray:
        """Exact top-k corpus embeddings for every query ([CLS] tokens, and the image where trained so): [B, Q * top_k, D]."""
        b, k, d = queries.shape
        ids = top_k(queries.reshape(b * k, d) @ self.corpus.T, min(self.meta["top_k"], len(self.corpus)))
        return self.corpus[ids.reshape(b, -1)]


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    key: str
    source: str  # shard path or image path
    data: bytes | None = None
    meta: dict[str, Any] | None = None
    error: str | None = None
    frames: list[bytes] | None = None  # multi-image samples (0.jpg ... 9.jpg), in frame order


def expand_shards(spec: str) -> list[str]:
    """Brace patterns, globs, a directory of ``*.tar`` or one file -> shard paths."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = sorted({u for part in braceexpand.braceexpand(spec) for u in (glob.glob(part) or [part])})
        urls = [u for u in urls if os.path.isfile(u)]
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


def shard_items(spec: str) -> Iterator[Item]:
    """Samples of WebDataset shards (members grouped by key); a broken tar is one error item."""
    for url in expand_shards(spec):
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(url) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, name = os.path.split(info.name)
                    stem, _, ext = name.partition(".")
                    groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            yield Item(key="", source=url, error=f"corrupt_tar: {err}")
        for key, members in groups.items():
            yield _shard_item(url, key, members)


def _shard_item(url: str, key: str, members: dict[str, bytes]) -> Item:
    image = shard_members.single_image(members)
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as err:
            return Item(key, url, error=f"bad_json: {err}")
    frames = frame_members(members)
    if image is None and not frames:
        return Item(key, url, meta=meta, error="missing_image")
    return Item(key, url, image, meta, frames=frames or None)


def frame_members(members: dict[str, bytes]) -> list[bytes]:
    """``0.jpg``, ``1.png``, ... in index order (stops at the first missing index)."""
    return shard_members.frames(members)


def folder_items(folder: str | Path) -> Iterator[Item]:
    """Every image file under ``folder`` (recursively, sorted); the key is the relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    for path in sorted(p for p in folder.rglob("*") if shard_members.is_image_file(p.name)):
        yield Item(str(path.relative_to(folder)), str(path), path.read_bytes())


def count_items(spec: str, kind: str) -> int | None:
    """Total for the progress bar: shard sizes.json where present, files in a folder."""
    if kind == "images":
        return sum(1 for p in Path(spec).rglob("*") if shard_members.is_image_file(p.name))
    total = 0
    for url in expand_shards(spec):
        sizes = Path(url).parent / "sizes.json"
        listed = json.loads(sizes.read_text()).get("shards", {}) if sizes.is_file() else {}
        if Path(url).name not in listed:
            return None
        total += listed[Path(url).name]
    return total


# --------------------------------------------------------------------------- running


def load_pixels(item: Item, preprocess: Preprocess) -> np.ndarray | str:
    """Pixels of one item, or the reason it cannot be used."""
    if item.error:
        return item.error
    try:
        with Image.open(io.BytesIO(item.data)) as image:
            image.load()
            return preprocess(image)
    except Exception as err:  # noqa: BLE001  (any decoding failure is this item's problem only)
        return f"bad_image: {type(err).__name__}: {err}"


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_batch(pool: ThreadPoolExecutor, batch: list[Item], load: Callable[[Item], Any], errors,
               counts: dict[str, int], bar) -> list[tuple[Item, Any]]:
    """Load a batch in the thread pool; a failed item (its loader returns the reason) goes to errors.jsonl."""
    loaded = list(pool.map(load, batch))
    good = [(it, x) for it, x in zip(batch, loaded) if not isinstance(x, str)]
    for it, x in zip(batch, loaded):
        if isinstance(x, str):
            LOG.warning("skipped %s %s: %s", it.source, it.key, x)
            errors.write(json.dumps({"key": it.key, "source": it.source, "error": x}) + "\n")
    counts["items"] += len(batch)
    counts["errors"] += len(batch) - len(good)
    bar.update(len(batch))
    return good


def infer_images(model: ExportedModel, items: Iterable[Item], tasks: list[str] | None, out_dir: str | Path,
                 settings: Settings = Settings(), batch_size: int = 64, workers: int = 4,
                 total: int | None = None) -> dict[str, Any]:
    """Run each task's predictor over the items; ``<task>.jsonl`` per task, ``errors.jsonl``, ``summary.json``.

    Returns:
        ``{"items": n, "predicted": n, "errors": n, "tasks": [...]}`` (also written to summary.json).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks or [t for t in model.tasks if t in PREDICTORS]
    unknown = [t for t in tasks if t not in model.tasks or t not in PREDICTORS]
    if unknown:
        raise ValueError(f"task(s) {unknown} not in this export ({model.tasks}) or without a predictor "
                         f"({sorted(PREDICTORS)})")
    predictors = [PREDICTORS[t](model, settings) for t in tasks]
    files = {t: (out_dir / f"{t}.jsonl").open("w") for t in tasks}
    errors_file = (out_dir / "errors.jsonl").open("w")
    keys: list[dict[str, Any]] = []
    counts = {"items": 0, "predicted": 0, "errors": 0}
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=total, unit="img", desc="infer") as bar:
        for batch in batched(items, batch_size):
            good = load_batch(pool, batch, lambda it: load_pixels(it, model.preprocess), errors_file, counts, bar)
            if not good:
                continue
            pixels = np.stack([px for _, px in good])
            features = model.image_features(pixels) if any(p.uses_features for p in predictors) else None
            ids = [{"key": it.key, "source": it.source} for it, _ in good]
            keys += ids
            for predictor in predictors:
                for ident, record in zip(ids, predictor.predict(pixels, features)):
                    files[predictor.task].write(json.dumps({**ident, **record}) + "\n")
            counts["predicted"] += len(good)
    for f in [*files.values(), errors_file]:
        f.close()
    for predictor in predictors:
        predictor.finish(out_dir, keys)
    summary = {**counts, "tasks": tasks}
    record_providers(model, out_dir, summary, replace=True)
    return summary


def record_providers(model: ExportedModel, out_dir: Path, summary: dict[str, Any], replace: bool = False) -> None:
    """summary.json with ``providers`` (:meth:`ExportedModel.provider_report`) next to the counts.

    ``replace``: write ``summary`` (image runs); else a summary.json already there (an image run into
    the same folder) only gets its ``providers`` brought up to date, and ``summary`` is written where
    there is none.
    """
    path = out_dir / "summary.json"
    data = summary if replace or not path.is_file() else json.loads(path.read_text())
    path.write_text(json.dumps({**data, "providers": model.provider_report()}, indent=1))


def load_set(item: Item, preprocess: Preprocess, size: int) -> tuple[np.ndarray, str, bool] | str:
    """(pixels [C, 3, S, S], description, static) of a multi-image sample, or why it cannot be used."""
    if item.error:
        return item.error
    if not item.frames or len(item.frames) != size:
        return f"missing_image: {len(item.frames or [])} frames, {size} expected"
    description = (item.meta or {}).get("description") or (item.meta or {}).get("caption")
    if not description:
        return "bad_json: no description"
    pixels = [load_pixels(Item(item.key, item.source, data), preprocess) for data in item.frames]
    bad = next((p for p in pixels if isinstance(p, str)), None)
    return bad or (np.stack(pixels), description, bool(item.meta.get("static", False)))


def infer_contextual(model: ExportedModel, items: Iterable[Item], out_dir: str | Path, batch_size: int = 16,
                     workers: int = 4, total: int | None = None) -> dict[str, Any]:
    """Sets of near-identical images + a description -> ``contextual.jsonl`` (index of the described image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.manifest["tasks"]["contextual"]["num_candidates"]
    counts = {"items": 0, "predicted": 0, "errors": 0}
    with (out_dir / "contextual.jsonl").open("w") as out, (out_dir / "errors.jsonl").open("a") as errors, \
            ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=total, unit="set", desc="contextual") as bar:
        for batch in batched(items, batch_size):
            good = load_batch(pool, batch, lambda it: load_set(it, model.preprocess, size), errors, counts, bar)
            if not good:
                continue
            pixels = np.concatenate([x[0] for _, x in good])
            frames = normalize(model.image_features(pixels)).reshape(len(good), size, -1)
            text = model.text_embeddings([x[1] for _, x in good])
            scores = model.session("contextual_scorer").run(frames=frames, text=text,
                                                            static=np.array([x[2] for _, x in good]))["scores"]
            for (it, _), row in zip(good, scores):
                out.write(json.dumps({"key": it.key, "source": it.source, "index": int(row.argmax()),
                                      "scores": [float(v) for v in row]}) + "\n")
            counts["predicted"] += len(good)
    summary = {**counts, "tasks": ["contextual"]}
    record_providers(model, out_dir, summary)
    return summary


def infer_queries(model: ExportedModel, queries: list[str], out_dir: str | Path, gallery: str | Path,
                  top: int = 5, batch_size: int = 256) -> dict[str, Any]:
    """Text queries against a gallery written by :func:`infer_images` (``<out>/gallery``): ``retrieval.jsonl``."""
    gallery = Path(gallery)
    if not (gallery / "embeddings.npy").is_file():
        raise FileNotFoundError(f"{gallery}: no embeddings.npy (run inference with the retrieval task on images first)")
    emb, keys = np.load(gallery / "embeddings.npy"), json.loads((gallery / "keys.json").read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "retrieval.jsonl").open("w") as f:
        for start in tqdm(range(0, len(queries), batch_size), unit="batch", desc="queries"):
            chunk = queries[start:start + batch_size]
            scores = model.text_embeddings(chunk) @ emb.T
            for query, row, s in zip(chunk, top_k(scores, top), scores):
                f.write(json.dumps({"query": query, "results": [{**keys[j], "score": float(s[j])} for j in row]}) + "\n")
    summary = {"queries": len(queries), "gallery": len(keys)}
    record_providers(model, out_dir, summary)
    return summary


def read_queries(path: str | Path) -> list[str]:
    """One query per non-blank line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# --------------------------------------------------------------------------- meme retrieval


def load_meme(item: Item, preprocess: Preprocess) -> tuple[np.ndarray, str, str, str] | str:
    """(pixels, query, context, emotion text) of a meme sample, or why it cannot be used."""
    if item.error:
        return item.error
    meta = item.meta or {}
    query, context, emotions = meta.get("caption"), meta.get("context"), meta.get("emotions", [])
    for name, value in (("caption", query), ("context", context)):
        if not isinstance(value, str) or not value.strip():
            return f"bad_json: json.{name} must be a non-empty string"
    if not isinstance(emotions, list) or not all(isinstance(e, str) for e in emotions):
        return "bad_json: json.emotions must be a list of strings"
    pixels = load_pixels(item, preprocess)
    return pixels if isinstance(pixels, str) else (pixels, query, context, " ".join(emotions))


def meme_tokenizer(model: ExportedModel) -> WordPieceTokenizer:
    meta = model.manifest["tasks"]["meme"]
    return WordPieceTokenizer(model.dir / meta["emotion_tokenizer"], meta["emotion_max_length"],
                              meta["pad_token_id"], meta["pad_token"])


def meme_scores(query: np.ndarray, qi: np.ndarray, context: np.ndarray, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """[Q, G] QI, QC and fused S = alpha * QI + (1 - alpha) * QC (as training.tasks.meme.branch_scores)."""
    s_qi = meta["qi_logit_scale"] * query @ qi.T
    s_qc = meta["qc_logit_scale"] * query @ context.T
    return {"qi": s_qi, "qc": s_qc, "fused": meta["alpha"] * s_qi + (1 - meta["alpha"]) * s_qc}


def infer_meme(model: ExportedModel, items: Iterable[Item], out_dir: str | Path, top: int = 5, batch_size: int = 64,
               workers: int = 4, total: int | None = None) -> dict[str, Any]:
    """Every meme's caption queries the gallery of all the memes read: ``meme.jsonl`` (top-k by fused score).

    The memes are embedded batch by batch (image, frozen-BERT emotion features, context), then each
    query is scored against the whole gallery, as the task's evaluation does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = model.manifest["tasks"]["meme"]
    emotion_tokenizer = meme_tokenizer(model)
    parts: dict[str, list[np.ndarray]] = {"query": [], "qi": [], "context": []}
    keys, queries = [], []
    counts = {"items": 0, "predicted": 0, "errors": 0}
    with (out_dir / "errors.jsonl").open("a") as errors, ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=total, unit="meme", desc="meme") as bar:
        for batch in batched(items, batch_size):
            good = load_batch(pool, batch, lambda it: load_meme(it, model.preprocess), errors, counts, bar)
            if not good:
                continue
            pixels, query, context, emotion = (list(column) for column in zip(*(x for _, x in good)))
            emotion_features = model.session("meme_emotion_encoder").run(**emotion_tokenizer(emotion))["emotion_features"]
            parts["qi"].append(model.session("meme_qi").run(
                image_features=model.image_features(np.stack(pixels)), emotion_features=emotion_features,
                context_ids=model.tokenizer(context))["qi_embedding"])
            parts["query"].append(model.text_embeddings(query))
            parts["context"].append(model.text_embeddings(context))
            keys += [{"key": it.key, "source": it.source} for it, _ in good]
            queries += query
    if keys:
        emb = {k: np.concatenate(v) for k, v in parts.items()}
        scores = meme_scores(emb["query"], emb["qi"], emb["context"], meta)
        with (out_dir / "meme.jsonl").open("w") as out:
            for i, row in enumerate(top_k(scores["fused"], top)):
                results = [{**keys[j], **{b: float(scores[b][i, j]) for b in ("fused", "qi", "qc")}} for j in row]
                out.write(json.dumps({**keys[i], "query": queries[i], "results": results}) + "\n")
    else:
        (out_dir / "meme.jsonl").write_text("")
    counts["predicted"] = len(keys)
    summary = {**counts, "tasks": ["meme"]}
    record_providers(model, out_dir, summary)
    return summary
