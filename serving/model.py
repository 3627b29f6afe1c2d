"""An export folder opened for inference, without torch: manifest, preprocessing, tokenizer, sessions.

    model = ExportedModel("exports/run1")
    features = model.image_features(pixels)          # the shared image tower
    text = model.text_embeddings(["a red circle"])   # the shared text tower, normalised

Task predictors (``serving/predictors/``) build on this; nothing here knows a task.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from serving.preprocess import Preprocess
from serving.runtime import RuntimeOptions, Session
from serving.tokenizer import BPETokenizer
from shards.atomic import file_sha256, read_json

LOG = logging.getLogger("multiclip.serving")

TOWER_GRAPHS = ("image_encoder", "text_encoder")  # the large graphs; only these go to TensorRT


class ExportedModel:
    """An export folder: manifest, preprocessing, tokenizer and lazily opened onnxruntime sessions."""

    def __init__(self, export_dir: str | Path, options: RuntimeOptions = RuntimeOptions(), verify: bool = True):
        """``verify``: check every file against the manifest's sha256 when it is first used (a swapped or
        torn graph is refused, naming it); ``False`` skips the hashing for speed (``--no-verify``)."""
        self.dir = Path(export_dir)
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: not an export folder (run launch/export.py first)")
        self.manifest = read_json(manifest, "the export manifest")
        self.options, self.verify = options, verify
        self._verified: set[str] = set()
        if not verify:
            LOG.warning("%s: file hashes are not verified against the manifest (--no-verify)", self.dir)
        self.preprocess = Preprocess.from_dict(self.manifest["preprocess"])
        tok = self.manifest["tokenizer"]
        self.tokenizer = BPETokenizer(self.file(tok["bpe_file"], tok["bpe_sha256"]), tok["context_length"], tok["clean"])
        self._sessions: dict[str, Session] = {}

    def file(self, relative: str, sha256: str | None = None) -> Path:
        """Path of an export file, checked once against its sha256 (given, or from ``manifest["files"]``)."""
        path = self.dir / relative
        expected = sha256 or self.manifest["files"].get(relative)
        if self.verify and relative not in self._verified:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in the export's manifest but missing (a broken export; "
                                        "export again)")
            if expected is None:
                raise ValueError(f"{path}: not listed in {self.dir / 'manifest.json'} with a sha256")
            if file_sha256(path) != expected:
                raise ValueError(f"{path}: sha256 differs from the export's manifest (a file from another export, "
                                 "or torn); export again, or pass --no-verify to run it anyway")
            self._verified.add(relative)
        return path

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def session(self, graph: str) -> Session:
        if graph not in self._sessions:
            entry = self.manifest["graphs"][graph]
            wanted = [p for p, on in (("int8", self.options.int8), ("fp16", self.options.fp16)) if on and p in entry]
            chosen = entry[wanted[0]] if wanted else entry
            self._sessions[graph] = Session(self.file(chosen["file"], chosen["sha256"]), self.options,
                                            allow_tensorrt=graph in TOWER_GRAPHS)
        return self._sessions[graph]

    def provider_report(self) -> dict[str, dict[str, Any]]:
        """Per graph opened so far: file, requested providers, providers in use, fallbacks {provider, reason}."""
        return {graph: session.report() for graph, session in self._sessions.items()}

    def array(self, name: str) -> np.ndarray:
        return np.load(self.file(f"{name}.npy"))

    def document(self, name: str) -> Any:
        return json.loads(self.file(f"{name}.json").read_text())

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
