"""The ``captions`` converter: a csv or jsonl table of image paths and captions (and optional labels).

    python -m shards.convert captions --file F.csv|F.jsonl --out DIR [--images-root DIR]
                                      [--image-column image] [--caption-column caption] [--label-column label]
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from shards.convert import Converter, register_converter, with_progress
from shards.jsonl import json_lines
from shards.records import (SkipRecord, SourceRecord, add_allow_outside_argument, confined_path, is_utf8,
                            read_metadata, write_records)

TASK = "retrieval"  # image + caption pairs


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, row); a row with the wrong number of fields, or not UTF-8, comes back as None."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            malformed = None in row or None in row.values() or not is_utf8(row)
            yield reader.line_num, None if malformed else row


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, row); a line that is not a UTF-8 JSON object comes back as None. Blank lines are not rows."""
    for number, row in json_lines(read_metadata(path)):
        yield number, row if isinstance(row, dict) and is_utf8(row) else None


ROW_READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict[str, Any] | None]]]] = {
    ".csv": csv_rows,
    ".jsonl": jsonl_rows,
}


@dataclass(frozen=True)
class CaptionColumns:
    image: str = "image"
    caption: str = "caption"
    label: str = "label"


def text_field(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def caption_record(
    number: int, row: dict[str, Any] | None, images_root: Path, columns: CaptionColumns, allow_outside: bool = False
) -> SourceRecord | SkipRecord:
    """One table row to a record; problems become SkipRecords so they are counted, not raised."""
    image = text_field(row, columns.image) if row is not None else ""
    if not image:
        return SkipRecord("bad_row", f"line {number}: unparseable row (wrong field count, not UTF-8, not an object) "
                                     f"or no {columns.image!r} value")
    caption = text_field(row, columns.caption)
    if not caption:
        return SkipRecord("missing_caption", f"line {number}: no {columns.caption!r} value")
    label = text_field(row, columns.label) or caption
    try:
        path = confined_path(images_root, image, allow_outside)
    except SkipRecord as skip:
        return SkipRecord(skip.reason, f"line {number}: {skip}")
    return SourceRecord(path, image, caption, label, {"row": number}, task=TASK)


def caption_file_records(file: Path, images_root: Path, columns: CaptionColumns,
                         allow_outside: bool = False) -> Iterator[SourceRecord | SkipRecord]:
    read_rows = ROW_READERS.get(file.suffix.lower())
    if read_rows is None:
        raise ValueError(f"{file}: caption files must be one of {sorted(ROW_READERS)}")
    for number, row in read_rows(file):
        yield caption_record(number, row, images_root, columns, allow_outside)


def convert_captions(
    file: str | Path,
    out: str | Path,
    images_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str = "label",
    shard_size: int = 1000,
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """Image path + caption tables (csv or jsonl); paths are relative to images_root (default: the file's dir)
    and must stay inside it unless ``allow_outside_images`` (refusals are counted as outside_images_root)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"caption file {file} does not exist")
    root = Path(images_root) if images_root is not None else file.parent
    columns = CaptionColumns(image_column, caption_column, label_column)
    sources = with_progress(caption_file_records(file, root, columns, allow_outside_images))
    return write_records(sources, Path(out), shard_size, overwrite)


def add_captions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", required=True, help=".csv or .jsonl table of images and captions")
    parser.add_argument("--images-root", default=None, help="image paths are relative to this (default: file's dir)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--label-column", default="label", help="optional; the caption when absent")
    add_allow_outside_argument(parser, "--images-root")


register_converter("captions", Converter("csv/jsonl table of image paths and captions", add_captions_arguments,
                                         convert_captions))
