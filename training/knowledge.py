"""Open-world knowledge: read a text corpus, embed it once with the text tower, search it exactly.

The corpus is one text per line (``.txt``), or a CSV / JSON-lines file with a text column. Embeddings
are cached next to the corpus, keyed by a hash of the corpus bytes and of the text tower's weights,
so a changed corpus or a retrained tower never reuses stale vectors. Search is exact cosine top-k by a
blocked matrix product (the Ray job scales the same function out).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shards.atomic import save_npy
from shards.corpus import read_corpus


def tower_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the text tower's weights (everything outside ``visual``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if not name.startswith("visual."):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def embed_texts(backbone: nn.Module, tokenizer: Callable, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """Normalised text embeddings [N, D] (float32, on the backbone's device)."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        out.append(F.normalize(backbone(text=tokens)["text_features"].float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


def embed_corpus(backbone: nn.Module, tokenizer: Callable, path: str | Path, cache: bool = True,
                 text_column: str = "text") -> tuple[list[str], torch.Tensor]:
    """Texts and their embeddings, from ``<corpus>.<hash>.npy`` when it matches corpus and tower."""
    path = Path(path)
    texts = read_corpus(path, text_column)
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:16] + "-" + tower_fingerprint(backbone)
    cache_file = path.with_name(f"{path.name}.{key}.npy")
    device = next(backbone.parameters()).device
    if cache and cache_file.is_file():
        return texts, torch.from_numpy(np.load(cache_file)).to(device)
    emb = embed_texts(backbone, tokenizer, texts)
    if cache:
        save_npy(cache_file, emb.cpu().numpy())  # atomic, one temporary per writer: ranks write it at once
    return texts, emb


def search(queries: torch.Tensor, corpus: torch.Tensor, k: int, block_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by cosine (inputs normalised): (scores [Q, k], ids [Q, k]), best first.

    The corpus is scanned in blocks, keeping a running top-k, so memory stays O(Q x (k + block)).
    Ties go to the lower corpus id.
    """
    if corpus.shape[0] == 0:
        raise ValueError("cannot search an empty corpus")
    k = min(k, corpus.shape[0])
    best_scores = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_ids = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, corpus.shape[0], block_size):
        block = corpus[start:start + block_size].to(queries.dtype)
        scores = torch.cat([best_scores, queries @ block.T], dim=1)
        ids = torch.cat([best_ids, torch.arange(start, start + block.shape[0], device=queries.device)
                         .expand(queries.shape[0], -1)], dim=1)
        # stable sort on (-score, id) keeps ties in id order
        order = torch.sort(ids, dim=1, stable=True).indices
        scores, ids = scores.gather(1, order), ids.gather(1, order)
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_ids = scores.gather(1, top), ids.gather(1, top)
    return best_scores, best_ids
