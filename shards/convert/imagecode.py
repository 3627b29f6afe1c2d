"""Converter for ImageCoDe (contextual task): descriptions of 1 image out of a set of 10 near-identical ones.

    python -m shards.convert imagecode --descriptions train_data.json --images image-sets --out DIR

The descriptions file is ImageCoDe's published ``{set_name: {"img_idx": description}}`` (e.g.
``{"open-images-2057_2fe...": {"3": "the man's hand is on his hip", ...}, ...}``), read as it is. Each set
is a folder ``images/<set_name>/`` holding ``img{frame}.jpg`` files; they are ordered by the frame number
as a number (``img2`` before ``img10``), and ``img_idx`` indexes that order. A set is static when its
name contains "open-images", otherwise it is video.

One description becomes one sample: members ``0.jpg`` ... ``9.jpg`` (the set's images in frame order,
original bytes) and ``json`` = ``{"task": "contextual", "caption", "label", "description", "target",
"static", "set", "frames", "source": "<set>/<img_idx>"}``.

``summary.json`` counts descriptions (``read``, ``written``, ``skipped`` by reason) and sets (``sets``:
``read``, ``written``, ``skipped`` by reason). Set reasons (all its descriptions are skipped with the same
reason): ``missing_folder``, ``not_10_images`` (more or fewer than 10 ``img{frame}`` images),
``corrupt_image`` (an image does not decode), ``bad_set`` (the set's value is not an object, or its name
is not UTF-8), ``outside_images_root`` (the set name, or a symlinked image, leads out of the images
directory: absolute, ``../``; ``--allow-outside-images`` reads it). Description reasons: those, plus
``index_out_of_range`` (``img_idx`` not an integer 0-9), ``missing_description`` (empty or not a string)
and ``bad_row`` (not UTF-8); a set whose every description is skipped for these counts as that reason
among the sets. Every skip is logged with the set's number in the file and its name.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from shards.convert import Converter, register_converter, with_progress
from shards.records import (SUMMARY_FILE, SkipRecord, Summary, add_allow_outside_argument, confined_path,
                            image_extension, is_utf8, read_metadata, read_verified_image)
from shards.writer import ShardSetWriter

LOGGER = logging.getLogger("multiclip.shards")
TASK = "contextual"
NUM_IMAGES = 10
STATIC_MARKER = "open-images"
FRAME_FILE = re.compile(r"img(\d+)\.(jpe?g|png|webp)", re.IGNORECASE)


def is_static(set_name: str) -> bool:
    """ImageCoDe's rule: sets from Open Images are static (unordered), all others are video frames."""
    return STATIC_MARKER in set_name


def set_frames(folder: Path) -> list[Path]:
    """The set's ``img{frame}`` images ordered by frame number; SkipRecord when unusable."""
    if not folder.is_dir():
        raise SkipRecord("missing_folder", f"{folder}: no such set folder")
    frames = [(int(m.group(1)), p) for p in folder.iterdir() if (m := FRAME_FILE.fullmatch(p.name)) and p.is_file()]
    if len(frames) != NUM_IMAGES:
        raise SkipRecord("not_10_images", f"{folder}: {len(frames)} img<frame> images, expected {NUM_IMAGES}")
    return [path for _, path in sorted(frames)]


def load_set(images_dir: Path, set_name: str, allow_outside: bool = False) -> tuple[dict[str, bytes], list[str]]:
    """Members ``0.jpg`` ... ``9.jpg`` (verified bytes, original extension) and the file names in order; the
    set folder and every image in it must stay inside ``images_dir`` unless ``allow_outside``."""
    frames = set_frames(confined_path(images_dir, set_name, allow_outside))
    for path in frames:
        confined_path(images_dir, f"{set_name}/{path.name}", allow_outside)  # a symlinked frame leading out
    images = {f"{i}.{image_extension(path)}": read_verified_image(path) for i, path in enumerate(frames)}
    return images, [path.name for path in frames]


def parse_index(value: str) -> int:
    try:
        index = int(str(value).strip())
    except ValueError:
        raise SkipRecord("index_out_of_range", f"img_idx {value!r} is not an integer") from None
    if not 0 <= index < NUM_IMAGES:
        raise SkipRecord("index_out_of_range", f"img_idx {value!r} is not in 0..{NUM_IMAGES - 1}")
    return index


def description_meta(set_name: str, img_idx: str, description: Any, frames: list[str]) -> dict[str, Any]:
    """One sample's json; SkipRecord for a bad index or an empty description."""
    target = parse_index(img_idx)
    if not isinstance(description, str) or not description.strip():
        raise SkipRecord("missing_description", f"{set_name}/{img_idx}: empty or non-text description")
    if not is_utf8(description):
        raise SkipRecord("bad_row", f"{set_name}/{img_idx}: description is not UTF-8")
    text = description.strip()
    return {"task": TASK, "caption": text, "label": text, "description": text, "target": target,
            "static": is_static(set_name), "set": set_name, "frames": frames, "source": f"{set_name}/{img_idx}"}


class ImageCoDeSummary(Summary):
    """Description counts (the usual summary.json keys) plus the same counts for sets."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = Summary()

    def skip_set(self, reason: str, descriptions: int) -> None:
        self.sets.skip(reason)
        for _ in range(descriptions):
            self.skip(reason)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "sets": self.sets.as_dict()}


def convert_set(writer: ShardSetWriter, summary: ImageCoDeSummary, images_dir: Path, set_name: str, entries: Any,
                allow_outside: bool = False) -> None:
    """Write every usable description of one set; count the rest."""
    summary.sets.read += 1
    where = f"set {summary.sets.read} ({set_name!r})"
    if not isinstance(entries, dict) or not is_utf8(set_name):
        descriptions = len(entries) if isinstance(entries, dict) else 1
        summary.read += descriptions
        summary.skip_set("bad_set", descriptions)
        LOGGER.warning("skipped %s: bad_set (value is a %s; an object with a UTF-8 name is needed)", where,
                       type(entries).__name__)
        return
    summary.read += len(entries)
    try:
        images, frames = load_set(images_dir, set_name, allow_outside)
    except SkipRecord as skip:
        LOGGER.warning("skipped %s: %s (%s)", where, skip.reason, skip)
        summary.skip_set(skip.reason, len(entries))
        return
    reasons = []
    for img_idx, description in entries.items():
        try:
            meta = description_meta(set_name, img_idx, description, frames)
        except SkipRecord as skip:
            LOGGER.warning("skipped description %r of %s: %s (%s)", img_idx, where, skip.reason, skip)
            summary.skip(skip.reason)
            reasons.append(skip.reason)
            continue
        writer.write(f"{summary.written:09d}", images, meta)
        summary.written += 1
    if entries and len(reasons) == len(entries):
        summary.sets.skip(reasons[0])
    elif entries:
        summary.sets.written += 1


def convert_imagecode(
    descriptions: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """ImageCoDe descriptions + set folders to a "contextual" shard set; returns summary.json's content.

    ``allow_outside_images``: read set folders and images outside ``images`` (else outside_images_root)."""
    descriptions, images, out = Path(descriptions), Path(images), Path(out)
    if not descriptions.is_file():
        raise FileNotFoundError(f"descriptions file {descriptions} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} is not a directory")
    try:
        sets = json.loads(read_metadata(descriptions))
    except ValueError as exc:
        raise ValueError(f"{descriptions}: not valid JSON: {exc}") from exc
    if not isinstance(sets, dict):
        raise ValueError(f"{descriptions}: expected an object {{set_name: {{img_idx: description}}}}, "
                         f"got a {type(sets).__name__}")
    summary = ImageCoDeSummary()
    with ShardSetWriter(out, shard_size, overwrite=overwrite) as writer:
        for set_name, entries in with_progress(sets.items(), total=len(sets), unit="set"):
            convert_set(writer, summary, images, set_name, entries, allow_outside_images)
    result = summary.as_dict()
    (out / SUMMARY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_imagecode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--descriptions", required=True, help="ImageCoDe {set_name: {img_idx: description}} JSON")
    parser.add_argument("--images", required=True, help="directory with one folder of img<frame>.jpg per set")
    add_allow_outside_argument(parser)


register_converter("imagecode", Converter(
    "ImageCoDe: descriptions of 1 of 10 near-identical images", add_imagecode_arguments, convert_imagecode))
