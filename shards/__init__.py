"""WebDataset shard sets for multiclip: writing, synthetic data, dataset converters and fault-tolerant loaders.

Independent of the model code (no torchvision/open_clip): samples reach the trainer as PIL images plus a
json dict, and a task's ``map_fn`` turns them into tensors. The layout is described in docs/data-format.md.
"""
from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562), so ``import shards.members`` or ``shards.samples`` (torch-free serving)
# does not import the reader or the writer, which import webdataset and with it torch.
_EXPORTS = {
    "SKIP_REASONS": "shards.samples", "SkipLog": "shards.samples", "count_samples": "shards.samples",
    "expand_urls": "shards.samples", "read_skip_logs": "shards.samples", "summarize_skips": "shards.samples",
    "make_eval_loader": "shards.reader", "make_loader": "shards.reader",
    "IMAGE_EXTENSIONS": "shards.writer", "ShardSetWriter": "shards.writer", "encode_image": "shards.writer",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "ShardSetWriter",
    "SkipLog",
    "count_samples",
    "encode_image",
    "expand_urls",
    "make_eval_loader",
    "make_loader",
    "read_skip_logs",
    "summarize_skips",
]
