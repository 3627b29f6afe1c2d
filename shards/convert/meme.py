"""Converter for CLIP4Meme / EFB-style meme annotations (query -> meme retrieval) to a "meme" shard set.

    python -m shards.convert meme --annotations FILE --emotions FILE --images DIR --out DIR [--shard-size 1000]

Two annotation layouts, told apart by the file's content:

- training: ``{"sentences": [{"video_id": "123", "caption": "query text"}, ...], "titles": {"123": ["VLM caption"]}}``,
  one sample per meme id, as the original's loader keeps it: a meme named by several sentences keeps
  the last one's caption (the earlier ones are counted as ``duplicate_meme_id``);
- test: ``{"123": {"gt": "query text", "titles": ["VLM caption"]}, ...}``, one sample per meme.

The query becomes the sample's ``caption`` (and ``label``: items with exactly the same query string
are positives), ``titles[0]`` its ``context``; no titles or an empty first title give an empty context
(kept, as the original keeps it). The emotions file is a JSON list ``[{"video_id": "123", "emotion":
[{"person_1": "happy"}, {"person_2": "sad"}]}, ...]``; a meme's ``emotions`` are the string values of
its entries in order (an entry may also be a bare string); when an id has several entries the last
one wins. Nothing is lower-cased or stripped: captions, titles and emotion words are kept as written.
The image is ``images/{id}.jpg`` (or ``.jpeg``, ``.png``, ``.webp``); ``source`` is that name. An id
that leads out of the images directory (absolute, ``../``, a symlink out) is never read: it is counted as
``outside_images_root`` (``--allow-outside-images`` reads it).

Skipped and counted in summary.json, by reason: ``bad_row`` (not a UTF-8 object, no usable video_id),
``duplicate_meme_id`` (a training sentence superseded by a later one for the same meme),
``missing_query`` (empty caption/gt), ``missing_emotions`` (no entry in the emotions file: the
original's loader drops such memes), ``outside_images_root``, and from ``write_records``
``missing_image``, ``unreadable_image`` (a directory named like the image), ``corrupt_image``,
``unsupported_image``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

from shards.convert import Converter, register_converter, with_progress
from shards.members import IMAGE_MEMBERS
from shards.records import (SkipRecord, SourceRecord, add_allow_outside_argument, image_record, is_utf8,
                            read_metadata, write_records)

TASK = "meme"
IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in IMAGE_MEMBERS)  # images/{id}.<ext>: the member formats


# --------------------------------------------------------------------------- reading the files


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_metadata(path))
    except ValueError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from None


def annotation_layout(document: Any, path: Path) -> str:
    """'train' (sentences + titles) or 'test' (id -> {gt, titles}); anything else is an error naming the file."""
    if isinstance(document, dict) and "sentences" in document:
        if not isinstance(document["sentences"], list) or not isinstance(document.get("titles", {}), dict):
            raise ValueError(f"{path}: 'sentences' must be a list and 'titles' an object of id -> [caption]")
        return "train"
    if isinstance(document, dict) and any(isinstance(v, dict) and "gt" in v for v in document.values()):
        return "test"  # an item that is not an object is a bad_row of this layout
    raise ValueError(f"{path}: neither the training layout ({{'sentences', 'titles'}}) nor the test layout "
                     "({id: {'gt', 'titles'}})")


def emotion_words(entries: Any) -> list[str]:
    """[{"person_1": "Happy"}, "sad"] -> ["Happy", "sad"] (as written); values that are not text, or blank, are ignored."""
    words: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        values = entry.values() if isinstance(entry, dict) else [entry]
        words += [v for v in values if isinstance(v, str) and v.strip()]
    return words


def read_emotions(path: Path) -> dict[str, list[str]]:
    """video_id -> emotion words (the last entry for an id wins, as in the original's loader)."""
    document = read_json(path, "emotions")
    if not isinstance(document, list):
        raise ValueError(f"{path}: the emotions file must be a JSON list of {{'video_id', 'emotion'}} objects")
    emotions: dict[str, list[str]] = {}
    for entry in document:
        if isinstance(entry, dict) and entry.get("video_id") is not None and is_utf8(entry):
            emotions[str(entry["video_id"]).strip()] = emotion_words(entry.get("emotion"))
    return emotions


def first_title(titles: Any) -> str:
    """titles[0] as written; "" when there is none (the meme is kept with an empty context)."""
    if isinstance(titles, list) and titles and isinstance(titles[0], str):
        return titles[0]
    return titles if isinstance(titles, str) else ""


def meme_key(video_id: Any) -> str | None:
    """The id a meme is known by (None for a row without one, or whose id is not a string or a number)."""
    if not isinstance(video_id, (str, int, float)) or isinstance(video_id, bool) or not str(video_id).strip():
        return None
    return str(video_id).strip()


def annotation_rows(document: Any, layout: str) -> Iterator[tuple[str, Any, Any, str]]:
    """(reference, video_id, query, context) per would-be sample; video_id None for an unusable row and
    False for a training sentence superseded by a later one for the same meme (the last caption wins)."""
    if layout == "train":
        titles = document.get("titles", {})
        sentences = document["sentences"]
        ids = [meme_key(s.get("video_id")) if isinstance(s, dict) else None for s in sentences]
        last = {video_id: i for i, video_id in enumerate(ids) if video_id is not None}
        for number, (sentence, video_id) in enumerate(zip(sentences, ids), start=1):
            if video_id is not None and last[video_id] != number - 1:
                yield f"sentence {number}", False, None, ""
                continue
            query = sentence.get("caption") if isinstance(sentence, dict) else None
            context = first_title(titles.get(video_id)) if video_id is not None else ""
            yield f"sentence {number}", video_id, query, context
    else:
        for video_id, item in document.items():
            if not isinstance(item, dict):
                yield f"id {video_id}", None, None, ""
                continue
            yield f"id {video_id}", video_id, item.get("gt"), first_title(item.get("titles"))


# --------------------------------------------------------------------------- records


def image_names(video_id: str) -> list[str]:
    """images/{id} when the id has an image extension, then {id}.jpg and the other extensions."""
    names = [video_id] if Path(video_id).suffix.lower() in IMAGE_EXTENSIONS else []
    return names + [f"{video_id}{ext}" for ext in IMAGE_EXTENSIONS]


def meme_record(reference: str, video_id: Any, query: Any, context: str, images: Path,
                emotions: dict[str, list[str]], allow_outside: bool = False) -> SourceRecord | SkipRecord:
    """One annotation to a record; problems become SkipRecords so they are counted, not raised."""
    if video_id is False:
        return SkipRecord("duplicate_meme_id", f"{reference}: a later sentence names the same meme (its caption is kept)")
    video_id = meme_key(video_id)
    if video_id is None or not is_utf8([video_id, query, context]):
        return SkipRecord("bad_row", f"{reference}: not a UTF-8 object or no video_id")
    if not isinstance(query, str) or not query.strip():
        return SkipRecord("missing_query", f"{reference} ({video_id}): no query caption")
    if video_id not in emotions:
        return SkipRecord("missing_emotions", f"{reference} ({video_id}): no entry in the emotions file")
    extra = {"video_id": video_id, "context": context, "emotions": emotions[video_id], "reference": reference}
    return image_record(reference, images, image_names(video_id), allow_outside, caption=query, label=query,
                        extra=extra, task=TASK)


def meme_records(annotations: Path, emotions: Path, images: Path,
                 allow_outside: bool = False) -> Iterator[SourceRecord | SkipRecord]:
    document = read_json(annotations, "annotations")
    layout = annotation_layout(document, annotations)
    emotion_map = read_emotions(emotions)
    for reference, video_id, query, context in annotation_rows(document, layout):
        yield meme_record(reference, video_id, query, context, images, emotion_map, allow_outside)


# --------------------------------------------------------------------------- entry points


def convert_meme(
    annotations: str | Path,
    emotions: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """Meme annotations (training or test layout) + emotions + images to meme shards; returns summary.json.

    ``allow_outside_images``: read ids that lead outside ``images`` (else counted as outside_images_root)."""
    annotations, emotions, images = Path(annotations), Path(emotions), Path(images)
    for path, what in ((annotations, "annotations"), (emotions, "emotions")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} is not a directory")
    sources = with_progress(meme_records(annotations, emotions, images, allow_outside_images))
    return write_records(sources, Path(out), shard_size, overwrite)


def add_meme_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True,
                        help="training ({sentences, titles}) or test ({id: {gt, titles}}) JSON")
    parser.add_argument("--emotions", required=True, help="JSON list of {video_id, emotion: [{person_1: word}]}")
    parser.add_argument("--images", required=True, help="directory holding {video_id}.jpg")
    add_allow_outside_argument(parser)


register_converter("meme", Converter(
    "CLIP4Meme annotations (training or test layout) + emotions", add_meme_arguments, convert_meme))
