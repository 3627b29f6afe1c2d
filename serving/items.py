"""What inference reads, without torch: WebDataset shards or image folders -> ``Item``s.

An item is one sample: its key, where it came from, its image bytes (or its frames, for samples with
several images), its json, or the reason it cannot be used (which then goes to ``errors.jsonl``).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from serving.preprocess import Preprocess
from shards import members as shard_members  # torch-free: the member names shared with training
from shards.samples import expand_urls, image_shape_problem, tar_samples


@dataclass
class Item:
    key: str
    source: str  # shard path or image path
    data: bytes | None = None
    meta: dict[str, Any] | None = None
    error: str | None = None
    frames: list[bytes] | None = None  # multi-image samples (0.jpg ... 9.jpg), in frame order


def shard_items(spec: str) -> Iterator[Item]:
    """Samples of WebDataset shards, read by the torch-free tar layer training uses too (``shards.samples``).

    A tar that breaks mid-way yields its samples up to the break, then one error item for the sample
    being read (or for the shard, when none was).
    """
    for url in expand_urls(spec):
        failures: list[BaseException] = []
        reported = False
        for sample in tar_samples(url, failures):
            key, _ = sample.pop("__key__"), sample.pop("__url__", None)
            reported = bool(failures)
            yield Item(key, url, error=f"corrupt_tar: {failures[0]}") if failures else _shard_item(url, key, sample)
        if failures and not reported:
            yield Item(key="", source=url, error=f"corrupt_tar: {failures[0]}")


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
    for url in expand_urls(spec):
        sizes = Path(url).parent / "sizes.json"
        listed = json.loads(sizes.read_text()).get("shards", {}) if sizes.is_file() else {}
        if Path(url).name not in listed:
            return None
        total += listed[Path(url).name]
    return total


def load_pixels(item: Item, preprocess: Preprocess) -> np.ndarray | str:
    """Pixels of one item, or the reason it cannot be used."""
    if item.error:
        return item.error
    try:
        with Image.open(io.BytesIO(item.data)) as image:
            problem = image_shape_problem(image.width, image.height)  # the header is read: no pixels decoded yet
            if problem:
                return f"bad_image: {problem}"
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


def read_lines(path: str | Path) -> list[str]:
    """One entry per non-blank line (text queries, class names)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]
