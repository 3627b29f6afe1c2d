"""Converter for TARA-style geo_time records (where and when a photo was taken) to a shard set.

    python -m shards.convert tara --records F.json|F.jsonl --images DIR --out DIR [--shard-size 1000]

Records are a JSON list of objects, a JSON object of id -> object, or JSON lines. Each names its image by
``image_path``/``image`` (a local path) or ``image_url``; the file is looked up in the images directory by
that relative path, then by its file name (for a URL: the last path part, query string dropped). Labels are
checked before any image is read: ``bad_location`` (empty or not a string) and ``bad_time`` (not YYYY,
YYYY-M or YYYY-M-D with a real month and day) join ``shards.records``' ``missing_image``/``corrupt_image``/
``bad_row`` counts in summary.json. ``labels.json`` lists the location and time labels actually written.
"""
from __future__ import annotations

import argparse
import calendar
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

from shards.convert import Converter, register_converter
from shards.jsonl import json_lines
from shards.records import SkipRecord, SourceRecord, write_records
from shards.writer import existing_shards


TASK = "geo_time"
LABELS_FILE = "labels.json"
LOCAL_IMAGE_FIELDS = ("image_path", "image")
URL_FIELD = "image_url"
TIME_PATTERN = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?")
CAPTION_TEMPLATE = "a photo taken in {location} in {time}"


# --------------------------------------------------------------------------- labels


def normalise_location(value: Any) -> str | None:
    """'Brooklyn,New York , United States' -> 'Brooklyn, New York, United States'; None if any part is empty."""
    if not isinstance(value, str):
        return None
    parts = [part.strip() for part in value.split(",")]
    return ", ".join(parts) if all(parts) else None


def normalise_time(value: Any) -> str | None:
    """'2017-05-03' -> '2017-5-3' (TARA writes no zero padding); None unless a real year, month or day.

    A JSON integer year (2017) is accepted as '2017'.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    match = TIME_PATTERN.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day = (int(group) if group is not None else None for group in match.groups())
    if year < 1 or (month is not None and not 1 <= month <= 12):
        return None
    if day is not None and not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    return "-".join(str(part) for part in (year, month, day) if part is not None)


# --------------------------------------------------------------------------- reading records


def json_document_rows(document: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    """(reference, row) from a parsed JSON document: a list, a dict of id -> row, or a single row."""
    if isinstance(document, list):
        for number, row in enumerate(document, start=1):
            yield {"row": number}, row
    elif isinstance(document, dict) and "gold_location" in document:
        yield {"row": 1}, document
    elif isinstance(document, dict):
        for key, row in document.items():
            yield {"id": str(key)}, row
    else:
        raise ValueError(f"TARA records must be a JSON list or object, got {type(document).__name__}")


def json_lines_rows(text: str) -> Iterator[tuple[dict[str, Any], Any]]:
    """(reference, row) per non-blank line; an unparseable line comes back as None (counted as bad_row)."""
    for number, row in json_lines(text):
        yield {"row": number}, row


def tara_rows(file: Path) -> Iterator[tuple[dict[str, Any], Any]]:
    """Rows of a .json or .jsonl file; a .json file that is not one JSON document is read as JSON lines."""
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() not in (".jsonl", ".ndjson"):
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            yield from json_document_rows(document)
            return
    yield from json_lines_rows(text)


# --------------------------------------------------------------------------- finding images


def url_file_name(url: str) -> list[str]:
    """Candidate file names for a URL: its last path part, percent-decoded and as written."""
    name = urlsplit(url.strip()).path.rstrip("/").rsplit("/", 1)[-1]
    return list(dict.fromkeys(part for part in (unquote(name), name) if part))


def image_candidates(row: dict[str, Any], images: Path) -> list[Path]:
    """Where the image may be, best first: a local path (as given, then by file name), then the URL's name."""
    candidates: list[Path] = []
    for field in LOCAL_IMAGE_FIELDS:
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            path = Path(value.strip())
            candidates += [path if path.is_absolute() else images / path, images / path.name]
    url = row.get(URL_FIELD)
    if isinstance(url, str) and url.strip():
        candidates += [images / name for name in url_file_name(url)]
    return list(dict.fromkeys(candidates))


def find_image(row: dict[str, Any], images: Path) -> Path | None:
    """The first candidate that exists; else the first candidate (so the skip names it); None if there is none."""
    candidates = image_candidates(row, images)
    return next((path for path in candidates if path.is_file()), candidates[0] if candidates else None)


def source_name(path: Path, images: Path) -> str:
    """The image path relative to the images directory, as other converters name ``source``."""
    try:
        return path.relative_to(images).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------- records


def suggestion(row: dict[str, Any], field: str, normalise: Callable[[Any], str | None], gold: str) -> str:
    """A ``*_suggest`` label, normalised; the gold label when absent or invalid (it is not worth a skip)."""
    return normalise(row.get(field)) or gold


def tara_record(reference: dict[str, Any], row: Any, images: Path) -> SourceRecord | SkipRecord:
    """One TARA row to a record; problems become SkipRecords so they are counted, not raised."""

    where = ", ".join(f"{key} {value}" for key, value in reference.items())
    if not isinstance(row, dict):
        return SkipRecord("bad_row", f"{where}: not a JSON object")
    location = normalise_location(row.get("gold_location"))
    if location is None:
        return SkipRecord("bad_location", f"{where}: gold_location {row.get('gold_location')!r} is empty or not text")
    time = normalise_time(row.get("gold_time"))
    if time is None:
        return SkipRecord("bad_time", f"{where}: gold_time {row.get('gold_time')!r} is not YYYY, YYYY-M or YYYY-M-D")
    image = find_image(row, images)
    if image is None:
        return SkipRecord("missing_image", f"{where}: no {URL_FIELD}, image_path or image field")
    abstract = row.get("abstract")
    extra = {
        "gold_location": location,
        "gold_location_suggest": suggestion(row, "gold_location_suggest", normalise_location, location),
        "gold_time": time,
        "gold_time_suggest": suggestion(row, "gold_time_suggest", normalise_time, time),
        "location_parts": location.split(", "),
        "abstract": abstract if isinstance(abstract, str) else "",
        **reference,
    }
    caption = CAPTION_TEMPLATE.format(location=location, time=time)
    return SourceRecord(image, source_name(image, images), caption, location, extra, task=TASK)


def tara_records(file: Path, images: Path) -> Iterator[SourceRecord | SkipRecord]:
    for reference, row in tara_rows(file):
        yield tara_record(reference, row, images)


# --------------------------------------------------------------------------- labels.json


def written_labels(out: Path) -> dict[str, list[str]]:
    """Sorted unique location and time labels of the samples in out's shards.

    Read back from the tars (headers plus json members only, image bytes are seeked over), so the list
    matches exactly what write_records kept.
    """
    locations: set[str] = set()
    times: set[str] = set()
    for shard in existing_shards(out):
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    locations.add(meta["gold_location"])
                    times.add(meta["gold_time"])
    return {"location": sorted(locations), "time": sorted(times)}


# --------------------------------------------------------------------------- entry points


def convert_tara(
    records: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """TARA-style records to geo_time shards; writes summary.json and labels.json, returns the summary."""

    records, images, out = Path(records), Path(images), Path(out)
    if not records.is_file():
        raise FileNotFoundError(f"records file {records} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} is not a directory")
    summary = write_records(tara_records(records, images), out, shard_size, overwrite)
    (out / LABELS_FILE).write_text(json.dumps(written_labels(out), indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return summary


def add_tara_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", required=True, help="TARA .json (list or id -> record) or .jsonl file")
    parser.add_argument("--images", required=True, help="directory holding the images, found by file name")


register_converter("tara", Converter(
    "TARA geo_time records: photos with where and when", add_tara_arguments, convert_tara))
