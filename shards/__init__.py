"""WebDataset shard sets for multiclip: writing, synthetic data, dataset converters and fault-tolerant loaders.

Independent of the model code (no torchvision/open_clip): samples reach the trainer as PIL images plus a
json dict, and a task's ``map_fn`` turns them into tensors. The layout is described in docs/data-format.md.
"""
from __future__ import annotations

from shards.reader import (
    SKIP_REASONS,
    SkipLog,
    count_samples,
    expand_urls,
    make_eval_loader,
    make_loader,
    read_skip_logs,
    summarize_skips,
)
from shards.writer import IMAGE_EXTENSIONS, ShardSetWriter, encode_image

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
