"""What a shard sample's members are called: the one place that names image extensions and json fields.

Torch-free and dependency-free, so the training loaders, the converters and the torch-free serving
runtime (``serving/items.py``) all read members by the same rules.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar

# image members a sample may carry, in the order a reader looks for them ("jpeg" is read, never written)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
WRITTEN_IMAGE_MEMBERS = ("jpg", "png", "webp")  # what ShardSetWriter accepts (jpeg is stored as jpg)
# image files a folder of images (converters, ``launch/infer.py --images``) may hold
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JSON_MEMBER = "json"  # the sample's metadata (task fields: docs/data-format.md)
CAPTION_MEMBER = "txt"  # the caption again, for open_clip_train and clip-retrieval
CAPTION_FIELD, LABEL_FIELD = "caption", "label"  # json fields shared by the image-text tasks

_WRITTEN_IMAGE = re.compile(r"^(?:\d+\.)?(?:" + "|".join(WRITTEN_IMAGE_MEMBERS) + r")$")
V = TypeVar("V")


def is_written_image_member(name: str) -> bool:
    """True for the member names a writer may store an image under: ``jpg`` or, per frame, ``3.jpg``."""
    return bool(_WRITTEN_IMAGE.match(name))


def single_image(members: Mapping[str, V]) -> V | None:
    """The sample's one image member (``jpg`` / ``jpeg`` / ``png`` / ``webp``), or None."""
    return next((members[k] for k in IMAGE_MEMBERS if k in members), None)


def frame(members: Mapping[str, V], index: int) -> V | None:
    """Image member ``<index>.<ext>`` of a multi-image sample (contextual sets), or None."""
    return next((members[f"{index}.{ext}"] for ext in IMAGE_MEMBERS if f"{index}.{ext}" in members), None)


def frames(members: Mapping[str, V]) -> list[V]:
    """``0.<ext>``, ``1.<ext>``, ... in index order, up to the first missing index."""
    out: list[V] = []
    while (found := frame(members, len(out))) is not None:
        out.append(found)
    return out


def txt_caption(members: Mapping[str, Any]) -> str | None:
    """The ``txt`` member as a caption (img2dataset and open_clip shards keep the caption there), without
    surrounding blanks; None when there is none or it is blank. UnicodeDecodeError when it is not UTF-8."""
    data = members.get(CAPTION_MEMBER)
    if data is None:
        return None
    text = (data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)).strip()
    return text or None


def with_txt_caption(meta: dict[str, Any], members: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` with ``caption`` taken from the ``txt`` member when the json has none (a json caption wins)."""
    if CAPTION_FIELD in meta:
        return meta
    caption = txt_caption(members)
    return meta if caption is None else {**meta, CAPTION_FIELD: caption}


def is_image_file(name: str) -> bool:
    return any(name.lower().endswith(suffix) for suffix in IMAGE_FILE_SUFFIXES)


def describe(sample: Mapping[str, Any]) -> str:
    """The member names of a sample, for error messages."""
    return ", ".join(sorted(k for k in sample if not k.startswith("__")))
