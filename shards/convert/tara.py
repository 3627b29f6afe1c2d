"""Converter for TARA-style geo_time records (where and when a photo was taken) to a shard set.

    python -m shards.convert tara --records F.json|F.jsonl --images DIR --out DIR [--shard-size 1000]

Records are a JSON list of objects, a JSON object of id -> object, or JSON lines. Each names its image by
``image_path``/``image`` (a local path) or ``image_url``; the file is looked up in the images directory by
that relative path, then by its file name (for a URL: the last path part, query string dropped). A path
that leaves the images directory (absolute, ``../``, a symlink out) is never read: when no lookup inside
finds the file, the record is counted as ``outside_images_root`` (``--allow-outside-images`` reads it).
``source`` is the name found, relative to the images directory. A record that is not a UTF-8 JSON
object is ``bad_row``.

Labels: TARA's experiments train and score on ``gold_location_suggest`` and ``gold_time_suggest``, so those
are the fields a record needs by default (``label_fields="suggest"``; ``"gold"`` needs ``gold_location`` and
``gold_time`` instead). A time label is YYYY, YYYY-M or YYYY-M-D with a real month and day (zero padding
dropped: "2017-05-03" -> "2017-5-3"), a decade ("1990s") or a century ("20 century"), the forms TARA's
scorer reads. Labels are checked before any image is read; a record whose needed label is missing or
unusable is skipped and counted (``bad_location``/``bad_time`` for the gold fields; ``no_location_suggest``/
``bad_location_suggest``, ``no_time_suggest``/``bad_time_suggest`` for the suggest fields), beside
``shards.records``' ``missing_image``/``corrupt_image``/``bad_row``. The other two fields are written as
they are usable, else null (never replaced by another field), and summary.json counts them per field in
``unusable_labels`` ({field: {"null": n, "invalid": m}} over the written samples; an invalid value is kept
in the sample's ``label_problems``). ``labels.json`` lists the labels actually written: under "location"
and "time" those of the needed fields, and under each field's own name.
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

from shards.convert import Converter, register_converter, with_progress
from shards.jsonl import json_lines
from shards.records import (SUMMARY_FILE, SkipRecord, SourceRecord, add_allow_outside_argument, image_record,
                            is_utf8, read_metadata, write_records)
from shards.writer import existing_shards


TASK = "geo_time"
LABELS_FILE = "labels.json"
LOCAL_IMAGE_FIELDS = ("image_path", "image")
URL_FIELD = "image_url"
TIME_PATTERN = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?")
DECADE_PATTERN = re.compile(r"(\d{3})0s")  # "1990s"
CENTURY_PATTERN = re.compile(r"(1st|[1-9]\d?) century")  # "20 century", "1st century": TARA's scorer's names
LABEL_FIELDS = {"gold": {"location": "gold_location", "time": "gold_time"},
                "suggest": {"location": "gold_location_suggest", "time": "gold_time_suggest"}}
SKIP_REASONS = {  # (field, problem) -> summary.json reason, for a field the record needs
    ("gold_location", "null"): "bad_location", ("gold_location", "invalid"): "bad_location",
    ("gold_time", "null"): "bad_time", ("gold_time", "invalid"): "bad_time",
    ("gold_location_suggest", "null"): "no_location_suggest",
    ("gold_location_suggest", "invalid"): "bad_location_suggest",
    ("gold_time_suggest", "null"): "no_time_suggest", ("gold_time_suggest", "invalid"): "bad_time_suggest",
}
CAPTION_TEMPLATE = "a photo taken in {location} in {time}"


# --------------------------------------------------------------------------- labels


def normalise_location(value: Any) -> str | None:
    """'Brooklyn,New York , United States' -> 'Brooklyn, New York, United States'; None if any part is empty."""
    if not isinstance(value, str):
        return None
    parts = [part.strip() for part in value.split(",")]
    return ", ".join(parts) if all(parts) else None


def normalise_time(value: Any) -> str | None:
    """'2017-05-03' -> '2017-5-3' (TARA writes no zero padding); None unless a real year, month or day,
    a decade ('1990s') or a century ('20 century', '1st century').

    A JSON integer year (2017) is accepted as '2017'.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if DECADE_PATTERN.fullmatch(text) or CENTURY_PATTERN.fullmatch(text):
        return text
    match = TIME_PATTERN.fullmatch(text)
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
    text = read_metadata(file)
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


def image_names(row: dict[str, Any]) -> list[str]:
    """The image's names in the images directory, best first: a local path (as given, then its file name),
    then the URL's file name. ``find_image`` confines each to the directory."""
    names: list[str] = []
    for field in LOCAL_IMAGE_FIELDS:
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            names += [value.strip(), Path(value.strip()).name]
    url = row.get(URL_FIELD)
    if isinstance(url, str) and url.strip():
        names += url_file_name(url)
    return [name for name in dict.fromkeys(names) if name]


# --------------------------------------------------------------------------- records


def read_label(row: dict[str, Any], field: str) -> tuple[str | None, str | None]:
    """(normalised label, problem): problem is "null" (absent, null or blank), "invalid" or None."""
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "null"
    normalise: Callable[[Any], str | None] = normalise_time if field.startswith("gold_time") else normalise_location
    label = normalise(value)
    return label, (None if label is not None else "invalid")


def tara_record(reference: dict[str, Any], row: Any, images: Path, label_fields: str = "suggest",
                allow_outside: bool = False) -> SourceRecord | SkipRecord:
    """One TARA row to a record; problems become SkipRecords so they are counted, not raised."""

    where = ", ".join(f"{key} {value}" for key, value in reference.items())
    if not isinstance(row, dict) or not is_utf8(row):
        return SkipRecord("bad_row", f"{where}: not a UTF-8 JSON object")
    needed = LABEL_FIELDS[label_fields]
    labels: dict[str, str | None] = {}
    problems: dict[str, str] = {}
    for field in ("gold_location", "gold_location_suggest", "gold_time", "gold_time_suggest"):
        labels[field], problem = read_label(row, field)
        if problem and field in needed.values():
            kind = "a location" if "location" in field else "YYYY, YYYY-M, YYYY-M-D, decade or century"
            return SkipRecord(SKIP_REASONS[field, problem], f"{where}: {field} {row.get(field)!r} is not {kind}")
        if problem == "invalid":
            problems[field] = repr(row.get(field))
    names = image_names(row)
    if not names:
        return SkipRecord("missing_image", f"{where}: no {URL_FIELD}, image_path or image field")
    location, time = labels[needed["location"]], labels[needed["time"]]
    abstract = row.get("abstract")
    extra = {
        **labels,
        "location_parts": location.split(", "),
        "abstract": abstract if isinstance(abstract, str) else "",
        **({"label_problems": problems} if problems else {}),
        **reference,
    }
    caption = CAPTION_TEMPLATE.format(location=location, time=time)
    return image_record(where, images, names, allow_outside, caption=caption, label=location, extra=extra,
                        task=TASK)


def tara_records(file: Path, images: Path, label_fields: str = "suggest",
                 allow_outside: bool = False) -> Iterator[SourceRecord | SkipRecord]:
    for reference, row in tara_rows(file):
        yield tara_record(reference, row, images, label_fields, allow_outside)


# --------------------------------------------------------------------------- labels.json


def written_labels(out: Path, label_fields: str = "suggest") -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """(labels.json, unusable label counts) of the samples in out's shards.

    labels.json: the sorted unique labels per field, and under "location"/"time" those of the needed
    fields. Counts: per field, the written samples whose label is null ("null": absent or blank in the
    record; "invalid": present but unusable). Read back from the tars (headers plus json members only,
    image bytes are seeked over), so both match exactly what write_records kept.
    """
    fields = ("gold_location", "gold_location_suggest", "gold_time", "gold_time_suggest")
    labels: dict[str, set[str]] = {field: set() for field in fields}
    unusable: dict[str, dict[str, int]] = {}
    for shard in existing_shards(out):
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    for field in fields:
                        if meta.get(field) is not None:
                            labels[field].add(meta[field])
                        else:
                            problem = "invalid" if field in meta.get("label_problems", {}) else "null"
                            counts = unusable.setdefault(field, {"null": 0, "invalid": 0})
                            counts[problem] += 1
    needed = LABEL_FIELDS[label_fields]
    document = {q: sorted(labels[needed[q]]) for q in ("location", "time")}
    document.update({field: sorted(values) for field, values in labels.items()})
    return document, dict(sorted(unusable.items()))


# --------------------------------------------------------------------------- entry points


def convert_tara(
    records: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    label_fields: str = "suggest",
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """TARA-style records to geo_time shards; writes summary.json and labels.json, returns the summary.

    ``label_fields``: the label fields a record needs ("suggest": TARA's experiments' fields, "gold").
    ``allow_outside_images``: read image paths outside ``images`` (else counted as outside_images_root).
    """

    records, images, out = Path(records), Path(images), Path(out)
    if not records.is_file():
        raise FileNotFoundError(f"records file {records} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} is not a directory")
    if label_fields not in LABEL_FIELDS:
        raise ValueError(f"label_fields must be one of {sorted(LABEL_FIELDS)}, got {label_fields!r}")
    sources = with_progress(tara_records(records, images, label_fields, allow_outside_images))
    summary = write_records(sources, out, shard_size, overwrite)
    labels, unusable = written_labels(out, label_fields)
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = {**summary, "label_fields": label_fields, "unusable_labels": unusable}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_tara_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", required=True, help="TARA .json (list or id -> record) or .jsonl file")
    parser.add_argument("--images", required=True, help="directory holding the images, found by file name")
    parser.add_argument("--label-fields", dest="label_fields", choices=sorted(LABEL_FIELDS), default="suggest",
                        help="label fields a record needs: suggest (gold_*_suggest, TARA's experiments) or gold")
    add_allow_outside_argument(parser)


register_converter("tara", Converter(
    "TARA geo_time records: photos with where and when", add_tara_arguments, convert_tara))
