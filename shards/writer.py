"""Writing one split of WebDataset shards plus the sizes.json index the loaders rely on.

A split being written carries an ``INCOMPLETE`` marker from its first byte to the end: it is removed
only after the last shard is closed and sizes.json is written (atomically), so an interrupted or failed
conversion leaves a set that every reader refuses, naming the folder, instead of a valid-looking part.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds
from PIL import Image

from shards.members import WRITTEN_IMAGE_MEMBERS as IMAGE_EXTENSIONS
from shards.members import is_written_image_member
from shards.atomic import write_json, write_text
from shards.samples import INCOMPLETE_FILE, SIZES_FILE

SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
# Fixed member mtime: the same samples always give byte-identical tars.
FIXED_MTIME = 0  # an int: a float mtime makes tarfile write an extra pax header per member

is_image_member = is_written_image_member  # the name the reader and converters use


def validate_key(key: str) -> None:
    """Reject keys WebDataset would split wrongly: a dot starts the extension, a slash makes a folder."""
    if not key or "." in key or "/" in key or key != key.strip():
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.', '/' or surrounding spaces")


def validate_images(images: dict[str, bytes]) -> None:
    """A sample needs at least one image, under a name the reader recognises, as encoded bytes."""
    if not images:
        raise ValueError("a sample needs at least one image")
    for name, data in images.items():
        if not is_image_member(name):
            raise ValueError(f"invalid image member {name!r}: use one of {IMAGE_EXTENSIONS} or 'N.<ext>'")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"image {name!r} must be encoded bytes, got {type(data).__name__}")


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    """Encode a PIL image as PNG (lossless, for synthetic data) or JPEG (compact, for photos)."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unsupported image format {fmt!r}: use 'png' or 'jpg'")
    buffer = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        img.save(buffer, format="PNG")
    return buffer.getvalue()


def existing_shards(out_dir: Path) -> list[Path]:
    """Shards already in a directory, which a new write would mix with stale data."""
    return sorted(out_dir.glob(SHARD_GLOB))


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create the output directory; refuse (or, with overwrite, remove) shards left from an earlier run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = existing_shards(out_dir)
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(stale)} shard(s); pass overwrite=True to replace them")
    for path in stale:
        path.unlink()
    (out_dir / SIZES_FILE).unlink(missing_ok=True)
    write_text(out_dir / INCOMPLETE_FILE, "being written by shards.writer: not a finished shard set\n")


class ShardSetWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples and indexes them in sizes.json."""

    def __init__(self, out_dir: str | Path, shard_size: int = 1000, *, overwrite: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        prepare_out_dir(self.out_dir, overwrite)
        self.sizes: dict[str, int] = {}
        self._keys: set[str] = set()
        self._writer = wds.ShardWriter(
            str(self.out_dir / SHARD_PATTERN), maxcount=shard_size, verbose=0, mtime=FIXED_MTIME
        )
        self._closed = False

    def write(self, key: str, images: dict[str, bytes], meta: dict[str, Any]) -> None:
        """Add one sample: encoded images by member name plus its metadata as the ``json`` member.

        A ``caption`` in ``meta`` is also written as a ``txt`` member, the layout open_clip's own
        trainer and clip-retrieval read, so the same shards work with those tools.
        """
        validate_key(key)
        validate_images(images)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        record: dict[str, Any] = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        record.update({name: bytes(data) for name, data in images.items()})
        if isinstance(meta.get("caption"), str):
            record["txt"] = meta["caption"].encode("utf-8")
        self._writer.write(record)
        shard = Path(self._writer.fname).name
        self.sizes[shard] = self.sizes.get(shard, 0) + 1

    @property
    def total(self) -> int:
        """Samples written so far."""
        return sum(self.sizes.values())

    def close(self) -> dict[str, Any]:
        """Finish the last shard, write sizes.json and clear the INCOMPLETE marker; returns the sizes."""
        if not self._closed:
            self._writer.close()
            self._closed = True
            self._drop_empty_first_shard()
            write_sizes(self.out_dir, self.sizes)
            (self.out_dir / INCOMPLETE_FILE).unlink(missing_ok=True)
        return sizes_document(self.sizes)

    def abandon(self, reason: str) -> None:
        """Close the tar files but leave the set marked unfinished (no sizes.json), saying why."""
        if not self._closed:
            self._writer.close()
            self._closed = True
            write_text(self.out_dir / INCOMPLETE_FILE, f"interrupted: {reason}\n")

    def _drop_empty_first_shard(self) -> None:
        """ShardWriter opens its first tar eagerly; an empty split should hold no shard at all."""
        if not self.sizes:
            (self.out_dir / (SHARD_PATTERN % 0)).unlink(missing_ok=True)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # Ctrl-C or a failure: never a sizes.json for a part of the set
            self.abandon(f"{exc_type.__name__}: {exc}")


def sizes_document(sizes: dict[str, int]) -> dict[str, Any]:
    """The sizes.json content: samples per shard and in total."""
    return {"shards": dict(sorted(sizes.items())), "total": sum(sizes.values())}


def write_sizes(out_dir: Path, sizes: dict[str, int]) -> None:
    """Index a split so sample counts need no pass over the tars."""
    write_json(Path(out_dir) / SIZES_FILE, sizes_document(sizes), indent=2)
