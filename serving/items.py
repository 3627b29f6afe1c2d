"""What inference reads, without torch: WebDataset shards or image folders -> ``Item``s.

An item is one sample: its key, where it came from, its image bytes (or its frames, for samples with
several images), its json, or the reason it cannot be used (which then goes to ``errors.jsonl``).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from serving.preprocess import Preprocess
from shards import members as shard_members  # torch-free: the member names shared with training
from shards.samples import ShardSizes, decode_json, expand_urls, image_shape_problem, tar_samples


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
            meta = decode_json(members["json"])  # an object, as training's decoding requires
        except ValueError as err:  # not JSON, not UTF-8, or a list / number / string
            return Item(key, url, error=f"bad_json: {err}")
    frames = frame_members(members)
    if image is None and not frames:
        return Item(key, url, meta=meta, error="missing_image")
    return Item(key, url, image, meta, frames=frames or None)


def frame_members(members: dict[str, bytes]) -> list[bytes]:
    """``0.jpg``, ``1.png``, ... in index order (stops at the first missing index)."""
    return shard_members.frames(members)


def folder_items(folder: str | Path) -> Iterator[Item]:
    """Every image file under ``folder`` (recursively, sorted); the key is the relative path.

    A name that looks like an image but cannot be read as a file (a folder named ``x.jpg``, a broken
    symbolic link, a file without read permission) is an error item naming why: the run goes on.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    for path in sorted(p for p in folder.rglob("*") if shard_members.is_image_file(p.name)):
        key = str(path.relative_to(folder))
        problem = not_a_file(path)
        if problem:
            yield Item(key, str(path), error=f"missing_image: {problem}")
            continue
        try:
            data = path.read_bytes()
        except OSError as err:
            yield Item(key, str(path), error=f"missing_image: cannot read: {type(err).__name__}: {err.strerror or err}")
            continue
        yield Item(key, str(path), data)


def not_a_file(path: Path) -> str | None:
    """Why an image-like name is no readable file (a folder, a broken link, a fifo...), or None."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    if path.is_dir():
        return "a folder, not an image file"
    if not path.is_file():
        return "not a regular file"
    return None


def count_items(spec: str, kind: str) -> int | None:
    """Total for the progress bar: shard sizes.json where present, files in a folder."""
    if kind == "images":
        return sum(1 for p in Path(spec).rglob("*") if shard_members.is_image_file(p.name))
    total = 0
    sizes = ShardSizes()  # a torn sizes.json: ValueError naming the file
    for url in expand_urls(spec):
        listed = sizes.listed(url)
        if listed is None:
            return None
        total += listed
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
