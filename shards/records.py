"""Source records to shard sets: the machinery every converter shares.

A converter yields ``SourceRecord`` (an image path with its caption, label and task fields) or
``SkipRecord`` (why a row cannot become a sample); ``write_records`` verifies every image by decoding
it, writes the shards and counts the rest by reason in ``summary.json``.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from shards.members import IMAGE_MEMBERS, WRITTEN_IMAGE_MEMBERS
from shards.atomic import write_json
from shards.writer import ShardSetWriter

LOGGER = logging.getLogger("multiclip.shards")
SUMMARY_FILE = "summary.json"
# the member a source image's format is stored under (jpeg as jpg)
EXTENSION_ALIASES = {ext: ext if ext in WRITTEN_IMAGE_MEMBERS else "jpg" for ext in IMAGE_MEMBERS}


class SkipRecord(Exception):
    """A source record that cannot become a sample, with the reason summary.json counts it under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceRecord:
    """One would-be sample: where its image is, what it says, and how to name it in ``source``."""

    image_path: Path
    source: str
    caption: str
    label: str
    extra: dict[str, Any] = field(default_factory=dict)
    task: str = ""  # the converter's own task; required (a record of no task is a converter bug)

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError(f"{self.source}: SourceRecord without a task (the converter must name its task)")


@dataclass
class Summary:
    """Counts for summary.json: every record read is either written or skipped for one reason."""

    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "skipped": dict(sorted(self.skipped.items()))}


# --------------------------------------------------------------------------- shared: images and writing


def image_extension(path: Path) -> str:
    """Normalised extension, or a SkipRecord for formats the sample layout does not allow."""
    extension = path.suffix.lower().lstrip(".")
    if extension not in EXTENSION_ALIASES:
        raise SkipRecord("unsupported_image", f"{path}: extension {path.suffix!r} is not jpg, jpeg, png or webp")
    return EXTENSION_ALIASES[extension]


def read_verified_image(path: Path) -> bytes:
    """The file's bytes, after a full decode proves they are a usable image."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SkipRecord("missing_image", f"{path}: {exc}") from exc
    except OSError as exc:  # a directory named x.jpg, a broken symlink loop, no permission
        raise SkipRecord("unreadable_image", f"{path}: {exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SkipRecord("corrupt_image", f"{path}: {exc}") from exc
    return data


def confined_path(root: Path, name: str, allow_outside: bool = False) -> Path:
    """``root / name``, refused (SkipRecord ``outside_images_root``) when ``name`` is absolute or climbs out
    of ``root`` through ``..`` or a symlink: metadata must not make a converter read any file it names."""
    path = root / name
    if allow_outside:
        return path
    resolved_root = root.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(resolved_root):
        raise SkipRecord("outside_images_root", f"{name!r} is outside {root} (pass --allow-outside-images to permit)")
    return path


def load_record(record: SourceRecord | SkipRecord) -> tuple[str, bytes]:
    """(extension, verified bytes) of a record's image; raises SkipRecord for anything unusable."""
    if isinstance(record, SkipRecord):
        raise record
    return image_extension(record.image_path), read_verified_image(record.image_path)


def sample_meta(record: SourceRecord) -> dict[str, Any]:
    return {"task": record.task, "caption": record.caption, "label": record.label, "source": record.source,
            **record.extra}


def write_records(
    records: Iterator[SourceRecord | SkipRecord], out: Path, shard_size: int, overwrite: bool
) -> dict[str, Any]:
    """Verify and write every record, count the rest by reason; writes summary.json and returns it."""
    summary = Summary()
    with ShardSetWriter(out, shard_size, overwrite=overwrite) as writer:
        for record in records:
            summary.read += 1
            try:
                extension, data = load_record(record)
            except SkipRecord as skip:
                LOGGER.warning("skipped record: reason=%s %s", skip.reason, skip)
                summary.skip(skip.reason)
                continue
            writer.write(f"{summary.written:09d}", {extension: data}, sample_meta(record))
            summary.written += 1
    result = summary.as_dict()
    write_json(out / SUMMARY_FILE, result, indent=2)  # only for a finished set (the writer's exit succeeded)
    return result
