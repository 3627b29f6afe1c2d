"""Torch DataLoaders over shard sets: per-rank/worker streams for training, one ordered pass for evaluation.

The torch-free layer (URL expansion, counts, tar reading, decoding, skip records) is ``shards.samples``;
this module adds only what needs torch and webdataset's pipeline stages: worker identity, shuffling,
batching and the DataLoader itself.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate

from shards.samples import (
    MapFn,
    SkipLog,
    check_enough_shards,
    decode_samples,
    epoch_shard_order,
    expand_urls,
    map_samples,
    read_shards,
    resampled_shards,
    stable_seed,
)

CollateFn = Callable[[list[Any]], Any]


def shard_source(urls: list[str]) -> Iterator[dict[str, str]]:
    """The first pipeline stage: shard records in the order this worker reads them."""
    return iter([{"url": url} for url in urls])


def worker_identity() -> tuple[int, int]:
    """(worker id, number of workers) as webdataset's split_by_worker sees them."""
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    return worker, num_workers


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader process needs to rebuild its share of the stream."""

    urls: tuple[str, ...]
    map_fn: MapFn
    batch_size: int
    collate_fn: CollateFn
    rank: int = 0
    world_size: int = 1
    split_by_rank: bool = True
    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = 1000
    resample: bool = False
    start_epoch: int = 0
    infinite: bool = True
    partial_batches: bool = False
    error_log_dir: str | None = None
    decode_size: int | None = None  # JPEG draft decoding: shorter side at least this many pixels (None: full)


class ShardStream(IterableDataset):
    """Batches of one rank/worker: per epoch its shards, read, shuffled, decoded and mapped, then batched."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = worker_identity()
        skip_log = SkipLog(self.spec.error_log_dir, self.spec.rank, worker)
        samples = self._all_epochs(worker, num_workers, skip_log)
        batches = wds.batched(
            self.spec.batch_size, collation_fn=self.spec.collate_fn, partial=self.spec.partial_batches
        )
        return iter(batches(samples))

    def _epochs(self) -> Iterator[int]:
        start = self.spec.start_epoch
        return itertools.count(start) if self.spec.infinite else iter([start])

    def _all_epochs(self, worker: int, num_workers: int, skip_log: SkipLog) -> Iterator[Any]:
        for epoch in self._epochs():
            produced = 0
            for sample in self.epoch_samples(epoch, worker, num_workers, skip_log):
                produced += 1
                yield sample
            if self.spec.infinite and produced == 0:
                raise RuntimeError(
                    f"rank {self.spec.rank} worker {worker}: epoch {epoch} produced no usable sample from "
                    f"{self.worker_shards(epoch, worker, num_workers)}; see the skip log"
                )

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """This rank/worker's shards for an epoch: disjoint across ranks and workers unless resampling."""
        spec = self.spec
        urls = list(spec.urls)
        if spec.resample:
            per_reader = math.ceil(len(urls) / (spec.world_size * num_workers))
            return resampled_shards(urls, max(1, per_reader), spec.seed, epoch, spec.rank, worker)
        ordered = epoch_shard_order(urls, spec.seed, epoch) if spec.shuffle else urls
        mine = ordered[spec.rank :: spec.world_size] if spec.split_by_rank else ordered
        return list(wds.split_by_worker(mine))

    def epoch_samples(self, epoch: int, worker: int, num_workers: int, skip_log: SkipLog) -> Iterator[Any]:
        """One epoch of mapped samples for this rank/worker."""
        spec = self.spec
        shuffle = None
        if spec.shuffle and spec.shuffle_buffer > 1:
            seed = stable_seed("samples", spec.seed, epoch, spec.rank, worker)
            shuffle = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, seed=seed)
        pipeline = wds.DataPipeline(
            partial(shard_source, self.worker_shards(epoch, worker, num_workers)),
            partial(read_shards, skip_log=skip_log),
            shuffle,
            partial(decode_samples, skip_log=skip_log, decode_size=spec.decode_size),
            partial(map_samples, map_fn=spec.map_fn, skip_log=skip_log),
        )
        return iter(pipeline)


def _check_common(urls: list[str], map_fn: MapFn, batch_size: int, num_workers: int) -> None:
    if not urls:
        raise ValueError("no shard urls given")
    if not callable(map_fn):
        raise TypeError("map_fn must be callable")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _as_dir(path: str | Path | None) -> str | None:
    return None if path is None else os.fspath(path)


def _data_loader(stream: ShardStream, num_workers: int, pin_memory: bool, prefetch_factor: int | None,
                 persistent_workers: bool) -> DataLoader:
    """The torch DataLoader over a stream; ``prefetch_factor``/``persistent_workers`` only apply with workers.

    Its own generator, seeded by (seed, epoch, shards): each new iterator draws the workers' base seed
    (their ``random``/``torch`` seeds, hence their augmentations) from it, not from torch's global RNG. So
    opening a loader (every evaluation opens one) leaves the training's dropout and main-process
    augmentations where they were. Ranks share the seed, as they shared the global RNG's draw before:
    rank-distinct seeds were measured to lower one head in the all-heads demo (docs/benchmarks.md).
    """
    if prefetch_factor is not None and prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    workers = num_workers > 0
    spec = stream.spec
    generator = torch.Generator().manual_seed(stable_seed("workers", spec.seed, spec.start_epoch, spec.urls))
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers, generator=generator)


def make_loader(
    urls: str | list[str],
    *,
    map_fn: MapFn,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    start_epoch: int = 0,
    error_log_dir: str | Path | None = None,
    collate_fn: CollateFn | None = None,
    infinite: bool = True,
    decode_size: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = True,
) -> DataLoader:
    """Training batches for one rank: shuffled shards split over ranks and workers, full batches only.

    ``infinite`` streams epoch after epoch (the trainer decides what an epoch is); otherwise one pass.
    ``decode_size``: JPEGs are draft-decoded to a shorter side of at least this many pixels (see
    :func:`decode_image`). ``pin_memory`` puts batches in page-locked memory (for asynchronous copies
    to a GPU); ``prefetch_factor`` batches are kept in flight per worker (torch's default 2 when None).
    Workers persist across re-iterations of the loader (they rebuild their stream on each new iterator).
    """
    urls = expand_urls(urls)
    _check_common(urls, map_fn, batch_size, num_workers)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    check_enough_shards(len(urls), world_size, num_workers, resample)
    spec = StreamSpec(
        urls=tuple(urls), map_fn=map_fn, batch_size=batch_size, collate_fn=collate_fn or default_collate,
        rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, resample=resample,
        start_epoch=start_epoch, infinite=infinite, error_log_dir=_as_dir(error_log_dir), decode_size=decode_size,
    )
    return _data_loader(ShardStream(spec), num_workers, pin_memory, prefetch_factor, persistent_workers)


def make_eval_loader(
    urls: str | list[str],
    *,
    map_fn: MapFn,
    batch_size: int,
    num_workers: int = 0,
    error_log_dir: str | Path | None = None,
    collate_fn: CollateFn | None = None,
    rank: int = 0,
    decode_size: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """One deterministic pass over every shard (the same on every rank), keeping the partial last batch.

    ``rank`` only names the skip-log file, so ranks sharing a log directory do not share a file.
    ``decode_size``, ``pin_memory`` and ``prefetch_factor`` as in :func:`make_loader`; the workers of a
    one-pass loader do not persist.
    """
    urls = expand_urls(urls)
    _check_common(urls, map_fn, batch_size, num_workers)
    spec = StreamSpec(
        urls=tuple(urls), map_fn=map_fn, batch_size=batch_size, collate_fn=collate_fn or default_collate,
        rank=rank, world_size=1, split_by_rank=False, shuffle=False, infinite=False, partial_batches=True,
        error_log_dir=_as_dir(error_log_dir), decode_size=decode_size,
    )
    return _data_loader(ShardStream(spec), num_workers, pin_memory, prefetch_factor, persistent_workers=False)


__all__ = [
    "ShardStream",
    "StreamSpec",
    "make_eval_loader",
    "make_loader",
    "worker_identity",
]
