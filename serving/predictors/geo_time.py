"""geo_time (QR-CLIP): where and when; base prediction from the [CLS] tokens, fused with knowledge."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from serving.model import top_k
from serving.predictors.base import Predictor, register_predictor

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def rewrite_time_label(label: str) -> str:
    """TARA's natural form of a time label ("2017-5" -> "May, 2017"); decades ("1990s") and centuries
    ("20 century") stay as written, as TARA's ``time_label_2natural`` leaves one-part labels. The
    training task uses this one too."""
    text = str(label).strip()
    if "century" in text or (text.endswith("s") and text[:-1].isdigit()):
        return text
    parts = [int(p) for p in text.split("-")]
    if not 1 <= len(parts) <= 3 or (len(parts) > 1 and not 1 <= parts[1] <= 12) or \
            (len(parts) > 2 and not 1 <= parts[2] <= 31):
        raise ValueError(f"not a YYYY, YYYY-M or YYYY-M-D time label: {label!r}")
    if len(parts) == 3:
        return f"{MONTHS[parts[1] - 1]} {parts[2]}, {parts[0]}"
    if len(parts) == 2:
        return f"{MONTHS[parts[1] - 1]}, {parts[0]}"
    return str(parts[0])


def read_labels(value) -> dict[str, list[str]] | None:
    """Candidate labels: a dict, or the path of a JSON file ``{"location": [...], "time": [...]}``."""
    if value is None or isinstance(value, dict):
        return value
    return json.loads(Path(value).read_text())


@register_predictor("geo_time")
class GeoTimePredictor(Predictor):
    """Base prediction (max over [CLS] tokens) and, with a knowledge corpus, the fused prediction."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument_group("geo_time").add_argument(
            "--geo-labels", help='candidate labels: JSON {"location": [...], "time": [...]} (default: the export\'s)')

    def __init__(self, model, settings):
        super().__init__(model, settings)
        given = read_labels(settings.options.get("geo_labels"))
        exported = model.document("geo_time_labels") if (model.dir / "geo_time_labels.json").is_file() else None
        self.labels = given or exported
        if not self.labels:
            raise ValueError("geo_time: no candidate labels (export one with labels_file or pass --geo-labels)")
        self.candidates = {}
        for q in self.meta["quantities"]:
            if given is None and (model.dir / f"geo_time_candidates_{q}.npy").is_file():
                self.candidates[q] = model.array(f"geo_time_candidates_{q}")
            else:
                prompts = [self.meta["prompt"].format(rewrite_time_label(x) if q == "time" else x) for x in self.labels[q]]
                self.candidates[q] = model.text_embeddings(prompts)
        self.corpus = model.array("geo_time_knowledge") if "geo_time_knowledge.npy" in model.manifest["files"] else None

    def predict(self, batch):
        out = self.model.session("geo_time_encoder").run(pixels=batch.pixels)
        records = [{} for _ in batch.items]
        for q in self.meta["quantities"]:
            tokens, labels = out[f"{q}_tokens"], self.labels[q]
            base = np.einsum("bkd,cd->bkc", tokens, self.candidates[q]).max(axis=1)
            for record, i in zip(records, base.argmax(axis=1)):
                record[f"{q}_base"] = labels[i]
            if self.corpus is not None:
                queries = np.concatenate([tokens, out["image_embedding"][:, None]], axis=1) \
                    if self.meta.get("retrieve_with_image") else tokens
                scores = self.model.session(f"geo_time_relevance_{q}").run(
                    tokens=tokens, image=out["image_embedding"], retrieved=self.retrieve(queries),
                    candidates=self.candidates[q])["scores"]
                for record, i in zip(records, scores.argmax(axis=1)):
                    record[f"{q}_knowledge"] = labels[i]
        return records

    def retrieve(self, queries: np.ndarray) -> np.ndarray:
        """Exact top-k corpus embeddings for every query ([CLS] tokens, and the image where trained so): [B, Q * top_k, D]."""
        b, k, d = queries.shape
        ids = top_k(queries.reshape(b * k, d) @ self.corpus.T, min(self.meta["top_k"], len(self.corpus)))
        return self.corpus[ids.reshape(b, -1)]
