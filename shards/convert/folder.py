"""The ``folder`` converter: one subfolder per class (CIFAR-10/VOC layout), label = subfolder name.

    python -m shards.convert folder --root DIR --out DIR [--shard-size 1000] [--caption-template T]

``source`` is the image's path relative to the root. A symlink that leads out of the root is not read: it
is counted as ``outside_images_root`` (``--allow-outside-images`` reads it).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

from shards.convert import Converter, register_converter, with_progress
from shards.records import (EXTENSION_ALIASES, SkipRecord, SourceRecord, add_allow_outside_argument, image_record,
                            write_records)

TASK = "retrieval"  # class folders: zero-shot classification / text-image retrieval data

DEFAULT_CAPTION_TEMPLATE = "a photo of a {label}"


def class_folder_records(root: Path, caption_template: str,
                         allow_outside: bool = False) -> Iterator[SourceRecord | SkipRecord]:
    """Images under root/<label>/ (any depth), in sorted order so output is reproducible."""
    for class_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        label = class_dir.name
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower().lstrip(".") in EXTENSION_ALIASES and not path.is_dir():
                name = path.relative_to(root).as_posix()
                yield image_record(name, root, [name], allow_outside, caption=caption_template.format(label=label),
                                   label=label, task=TASK)


def convert_folder(
    root: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """CIFAR-10/VOC-style class folders: label = subfolder name, caption from the template; a symlink out of
    the root is counted as outside_images_root unless ``allow_outside_images``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    sources = with_progress(class_folder_records(root, caption_template, allow_outside_images))
    return write_records(sources, Path(out), shard_size, overwrite)


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="directory with one subfolder per class")
    parser.add_argument("--caption-template", default=DEFAULT_CAPTION_TEMPLATE, help="uses {label}")
    add_allow_outside_argument(parser, "--root")


register_converter("folder", Converter("one subfolder per class (CIFAR-10/VOC layout)", add_folder_arguments,
                                       convert_folder))
