"""Converter for TOC (Time-Oriented Collection, TICL) metadata: photos with the local time they were taken.

    python -m shards.convert toc --metadata train_metadata.json --images DIR --out DIR [--shard-size 1000]

The metadata is a JSON list of records (JSON lines are accepted too), each like
``{"ground_path": "4603553409_5b5f2b63b3.jpg", "latitude": 60.1, "longitude": 24.9,
"time": "2010-05-13 17:49:28.0", "timezone": "Europe/Helsinki"}``. The image is ``images/ground_path``,
or else ``images/<basename of ground_path>`` (the published images are one flat folder). A ground_path
that leaves the images directory (absolute, ``../``, a symlink out) is never read: unless its basename is
found inside, the record is counted as ``outside_images_root`` (``--allow-outside-images`` reads it).
``source`` is ground_path as written (``/`` for ``\\``), or the basename found for one that leaves.

``time`` is the photo's local time: hour, minute and month are read from it as written, with no timezone
conversion, because local time is what the light in the picture follows. A record whose time does not
parse as a real date and time (month 13, hour 25, empty, missing, not a string) is skipped as
``bad_time`` rather than put in a wrong bin; a record that is not a UTF-8 object or has no ``ground_path``
is ``bad_row``. Images are verified and counted (``missing_image``, ``corrupt_image``,
``unsupported_image``) by ``shards.records.write_records``.

Per-sample json fields (besides ``caption``, ``label`` and the common ones): ``hour``, ``minute``,
``month`` (read from ``time``), ``time`` (as written), ``latitude``, ``longitude``, ``timezone``, ``row``
(the record's number in its metadata file) and, with ``--queries``, ``retrieval_role``.

TICL's time-based retrieval is 48 query images (``query_toc.json``) against a disjoint database of
13,043 (``test_database.json``). Convert both into one shard set, each sample marked with its side
(``retrieval_role``: ``"query"`` for the records of ``--queries``, ``"database"`` for those of
``--metadata``); the time head's evaluation then ranks the database for each query::

    python -m shards.convert toc --metadata test_database.json --queries query_toc.json --images DIR --out data/toc/retrieval

A database record whose image is also a query's (the same resolved file) is skipped as
``query_in_database``, so no query can retrieve itself. Without ``--queries`` no sample has a role and
the evaluation falls back to leave-one-out retrieval (reported as ``retrieval_loo_*``).
"""
from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from shards.convert import Converter, register_converter, with_progress
from shards.jsonl import json_lines
from shards.records import (SkipRecord, SourceRecord, add_allow_outside_argument, image_record, is_utf8,
                            read_metadata, write_records)
from shards.synth.time_of_day import hour_label, time_caption


TASK = "time"
# "2010-05-13 17:49:28.0": date, then hour:minute, optional seconds and fraction; fields may be unpadded
# ("2010-5-3 7:05:9"), as strptime reads them in TICL. Ranges are checked by datetime() afterwards, so
# "2010-13-01" or "25:00" fail instead of landing in a bin.
TIME_PATTERN = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.\d+)?)?", re.ASCII)
KEPT_FIELDS = ("latitude", "longitude", "timezone")
QUERY, DATABASE = "query", "database"  # values of json retrieval_role


# --------------------------------------------------------------------------- metadata


def parse_local_time(value: Any) -> datetime | None:
    """The time as written (no timezone conversion), or None when it is not a real date and time."""
    if not isinstance(value, str):
        return None
    match = TIME_PATTERN.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) if part else 0 for part in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError:  # month 13, day 31 in April, hour 25, minute 60...
        return None


def metadata_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) from a JSON list (numbered from 1) or JSON lines (line numbers; None if unparseable)."""
    text = read_metadata(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:  # one broken list loses every record: say so rather than count them
            raise ValueError(f"{path}: metadata starts a JSON list but does not parse: {exc}") from exc
        yield from enumerate(rows, start=1)
        return
    yield from json_lines(text)


def image_names(ground_path: str) -> list[str]:
    """ground_path (``\\`` read as ``/``), then its basename: where ``find_image`` looks, in the images directory."""
    given = ground_path.replace("\\", "/")
    return [given, PurePosixPath(given).name]


def toc_record(number: int, row: Any, images: Path, role: str | None = None,
               allow_outside: bool = False) -> SourceRecord | SkipRecord:
    """One metadata record to a sample record; problems become SkipRecords so they are counted, not raised.

    ``role`` ("query" or "database") becomes the sample's ``retrieval_role``; None: no such field."""

    ground_path = row.get("ground_path") if isinstance(row, dict) and is_utf8(row) else None
    if not isinstance(ground_path, str) or not ground_path.strip():
        return SkipRecord("bad_row", f"record {number}: not a UTF-8 object or no 'ground_path'")
    if "time" not in row:
        return SkipRecord("bad_time", f"record {number} ({ground_path}): no 'time'")
    taken = parse_local_time(row["time"])
    if taken is None:
        return SkipRecord("bad_time", f"record {number} ({ground_path}): unparseable time {row['time']!r}")
    extra = {"hour": taken.hour, "minute": taken.minute, "month": taken.month, "time": row["time"],
             **{key: row.get(key) for key in KEPT_FIELDS}, "row": number}
    if role is not None:
        extra["retrieval_role"] = role
    return image_record(f"record {number}", images, image_names(ground_path), allow_outside,
                        caption=time_caption(taken.hour, taken.minute, taken.month), label=hour_label(taken.hour),
                        extra=extra, task=TASK, keep_first_name=True)


def toc_records(metadata: Path, images: Path, queries: Path | None = None,
                allow_outside: bool = False) -> Iterator[SourceRecord | SkipRecord]:
    """The records of ``metadata``; with ``queries``, first the query file's (role "query"), then the
    metadata's (role "database"), less those whose image is a query's."""
    if queries is None:
        for number, row in metadata_rows(metadata):
            yield toc_record(number, row, images, allow_outside=allow_outside)
        return
    query_images: set[Path] = set()
    for number, row in metadata_rows(queries):
        record = toc_record(number, row, images, QUERY, allow_outside)
        if isinstance(record, SourceRecord):
            query_images.add(record.image_path)
        yield record
    for number, row in metadata_rows(metadata):
        record = toc_record(number, row, images, DATABASE, allow_outside)
        if isinstance(record, SourceRecord) and record.image_path in query_images:
            record = SkipRecord("query_in_database", f"database record {number} ({record.source}) is a query's image")
        yield record


# --------------------------------------------------------------------------- conversion and CLI


def convert_toc(
    metadata: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    queries: str | Path | None = None,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """TOC metadata (JSON list or lines) + image folder to a "time" shard set; returns summary.json.

    ``queries``: TICL's retrieval query file; its records are written too, marked as queries, and the
    metadata's records as the database (json ``retrieval_role``). ``allow_outside_images``: read image
    paths outside ``images`` (else counted as outside_images_root)."""

    metadata, images = Path(metadata), Path(images)
    queries = None if queries is None else Path(queries)
    for path, what in ((metadata, "metadata"), (queries, "queries")):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} is not a directory")
    sources = with_progress(toc_records(metadata, images, queries, allow_outside_images))
    return write_records(sources, Path(out), shard_size, overwrite)


def add_toc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metadata", required=True, help="TOC metadata: JSON list of records, or JSON lines")
    parser.add_argument("--images", required=True, help="directory holding the images named by ground_path")
    parser.add_argument("--queries", default=None,
                        help="retrieval queries (TICL: query_toc.json), written into the same shards with "
                             "retrieval_role 'query'; --metadata's records become the 'database'")
    add_allow_outside_argument(parser)


register_converter("toc", Converter(
    "TOC (TICL) metadata: photos with their local time", add_toc_arguments, convert_toc))
