"""retrieval: every image embedding into a gallery (text queries search it); zero-shot top-k classes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from shards.progress import progress_bar

from serving.items import read_lines
from serving.model import ExportedModel, normalize, top_k
from serving.predictors.base import Predictor, Settings, register_predictor

GALLERY = "gallery"


def class_embeddings(model: ExportedModel, classes: list[str], templates: list[str]) -> np.ndarray:
    """One embedding per class: the renormalised mean over templates (as the retrieval task)."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = model.text_embeddings(texts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return normalize(emb)


@register_predictor("retrieval")
class RetrievalPredictor(Predictor):
    """Keeps every image embedding for the gallery; zero-shot top-k when class names are known."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("retrieval")
        group.add_argument("--classes", help="zero-shot class names, one per line (default: the export's)")
        group.add_argument("--gallery", help="with --queries: the gallery folder an image run wrote (<out>/gallery)")

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.embeddings: list[np.ndarray] = []
        self.keys: list[dict] = []
        classes = settings.options.get("classes")
        self.classes = (read_lines(classes) if isinstance(classes, (str, Path)) else classes) or self.meta.get("classnames")
        self.class_emb = class_embeddings(model, self.classes, self.meta["templates"]) if self.classes else None

    def predict(self, batch):
        image = normalize(batch.features)
        self.embeddings.append(image)
        self.keys += batch.ids
        if self.class_emb is None:
            return [{} for _ in range(len(image))]
        scores = image @ self.class_emb.T
        best = top_k(scores, self.settings.top_k)
        return [{"label": self.classes[row[0]], "top_k": [{"label": self.classes[j], "score": float(s[j])} for j in row]}
                for row, s in zip(best, scores)]

    def finish(self, out_dir):
        gallery = out_dir / GALLERY
        gallery.mkdir(parents=True, exist_ok=True)
        dim = self.model.manifest["embed_dim"]
        np.save(gallery / "embeddings.npy", np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32))
        (gallery / "keys.json").write_text(json.dumps(self.keys))
        return ()

    @classmethod
    def answer_queries(cls, model, queries, out_dir, settings: Settings, batch_size: int = 256):
        """Text queries against a gallery an image run wrote: ``retrieval.jsonl`` (top-k images per query)."""
        gallery = Path(settings.options.get("gallery") or "")
        if not (gallery / "embeddings.npy").is_file():
            raise FileNotFoundError(f"{gallery}: no embeddings.npy (pass --gallery: the <out>/{GALLERY} folder of an "
                                    f"image run with the {cls.task} task)")
        emb, keys = np.load(gallery / "embeddings.npy"), json.loads((gallery / "keys.json").read_text())
        with (out_dir / f"{cls.task}.jsonl").open("w") as f:
            for start in progress_bar(range(0, len(queries), batch_size), unit="batch", desc="queries"):
                chunk = queries[start:start + batch_size]
                scores = model.text_embeddings(chunk) @ emb.T
                for query, row, s in zip(chunk, top_k(scores, settings.top_k), scores):
                    f.write(json.dumps({"query": query, "results": [{**keys[j], "score": float(s[j])} for j in row]}) + "\n")
        return {"queries": len(queries), "gallery": len(keys)}
