"""Source records to shard sets: the machinery every converter shares.

A converter yields ``SourceRecord`` (an image path with its caption, label and task fields) or
``SkipRecord`` (why a row cannot become a sample); ``write_records`` verifies every image by decoding
it, writes the shards and counts the rest by reason in ``summary.json``.

Image paths come from metadata, so every one goes through ``confined_path`` (``find_image``,
``image_record``): an absolute path, a ``..`` or a symlink that leaves the images root is refused as
``outside_images_root`` unless the converter's ``--allow-outside-images`` is given, and ``json.source``
names the image relative to that root. Metadata text is read with ``read_metadata`` and checked with
``is_utf8``, so a record that is not UTF-8 is a counted ``bad_row``, never a decode error for the file.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

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
    where: str = ""  # the record's place in its metadata ("line 7"), named when its image is skipped

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
    except (OSError, ValueError) as exc:  # a directory named x.jpg, a symlink loop, no permission, a NUL byte
        raise SkipRecord("unreadable_image", f"{path}: {exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SkipRecord("corrupt_image", f"{path}: {exc}") from exc
    return data


def confined_path(root: Path, name: str, allow_outside: bool = False) -> Path:
    """``root / name``, refused (SkipRecord ``outside_images_root``) when ``name`` is absolute or climbs out
    of ``root`` through ``..`` or a symlink: metadata must not make a converter read any file it names.
    A symlink loop, or a NUL byte in ``name``, is ``unreadable_image``."""
    path = root / name
    if allow_outside:
        return path
    try:
        inside = not Path(name).is_absolute() and path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise SkipRecord("unreadable_image", f"{path!r}: {exc}") from exc
    if not inside:
        raise SkipRecord("outside_images_root", f"{name!r} is outside {root} (pass --allow-outside-images to permit)")
    return path


def find_image(root: Path, names: Iterable[str], allow_outside: bool = False,
               keep_first_name: bool = False) -> tuple[Path, str]:
    """(path, source) of a record's image: the first of ``names`` (best first: the metadata's path, then
    lookups such as its file name) that is a file in ``root``. Each name goes through ``confined_path``:
    one outside the root is never looked at. When none is a file, the first name decides: refused
    (``outside_images_root``), or its path (so reading it names the problem: missing, a directory...).

    ``source`` is the name found, or with ``keep_first_name`` the first name whenever it is inside the root
    (a converter that names a sample by the metadata's path even when the file was found by its file name).
    """
    first: tuple[str, Path | SkipRecord] | None = None
    for name in dict.fromkeys(names):
        try:
            path: Path | SkipRecord = confined_path(root, name, allow_outside)
        except SkipRecord as refused:
            path = refused
        first = first or (name, path)
        if isinstance(path, Path) and path.is_file():
            return path, first[0] if keep_first_name and isinstance(first[1], Path) else name
    if first is None:
        raise SkipRecord("missing_image", "no image path")
    if isinstance(first[1], SkipRecord):
        raise first[1]
    return first[1], first[0]


def image_record(where: str, root: Path, names: Iterable[str], allow_outside: bool, *, caption: str, label: str,
                 extra: dict[str, Any] | None = None, task: str, keep_first_name: bool = False
                 ) -> SourceRecord | SkipRecord:
    """A record whose image is found by ``find_image``, or the SkipRecord (naming ``where``) it was refused with."""
    try:
        path, source = find_image(root, names, allow_outside, keep_first_name)
    except SkipRecord as skip:
        return SkipRecord(skip.reason, f"{where}: {skip}")
    return SourceRecord(path, source, caption, label, extra or {}, task=task, where=where)


def add_allow_outside_argument(parser: argparse.ArgumentParser, root_option: str = "--images") -> None:
    """The ``--allow-outside-images`` flag (``allow_outside_images`` of a converter's function)."""
    parser.add_argument("--allow-outside-images", action="store_true",
                        help=f"read image paths outside {root_option} (absolute, ../ or a symlink out); "
                             "refused and counted as outside_images_root by default")


# --------------------------------------------------------------------------- shared: metadata text


def read_metadata(path: Path) -> str:
    """A metadata file's text. Bytes that are not UTF-8 survive as lone surrogates (``surrogateescape``), so
    they make one record a counted ``bad_row`` (see ``is_utf8``) instead of a decode error for the whole file."""
    return Path(path).read_text(encoding="utf-8", errors="surrogateescape")


def is_utf8(value: Any) -> bool:
    """False for a parsed value (text, or JSON lists and objects) holding bytes ``read_metadata`` could not
    decode: their lone surrogates are the one thing no UTF-8 encoder accepts."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
                where = f"{record.where or record.source}: " if isinstance(record, SourceRecord) else ""
                LOGGER.warning("skipped record: reason=%s %s%s", skip.reason, where, skip)
                summary.skip(skip.reason)
                continue
            writer.write(f"{summary.written:09d}", {extension: data}, sample_meta(record))
            summary.written += 1
    result = summary.as_dict()
    write_json(out / SUMMARY_FILE, result, indent=2)  # only for a finished set (the writer's exit succeeded)
    return result
