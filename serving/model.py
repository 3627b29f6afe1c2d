"""An export folder opened for inference, without torch: manifest, preprocessing, tokenizer, sessions.

    model = ExportedModel("exports/run1")
    features = model.image_features(pixels)          # the shared image tower
    text = model.text_embeddings(["a red circle"])   # the shared text tower, normalised

Task predictors (``serving/predictors/``) build on this; nothing here knows a task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from serving.preprocess import Preprocess
from serving.runtime import RuntimeOptions, Session
from serving.tokenizer import BPETokenizer

TOWER_GRAPHS = ("image_encoder", "text_encoder")  # the large graphs; only these go to TensorRT


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
