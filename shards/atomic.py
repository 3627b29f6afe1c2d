"""Writes that are whole or absent: a file replaced in one rename, a folder swapped in whole.

A kill at any moment leaves either the old file or the new one, never a torn mix: data goes to a
hidden temporary sibling first, is flushed to disk, then ``os.replace``d over the target (atomic on
POSIX within one file system). Folders (an export) are built in a temporary sibling and swapped in,
and an existing folder is only replaced when it carries the writer's own marker file, so a tool never
deletes what it did not write. Torch-free: serving, the data side and training all use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (exports, weights, shards: large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` through (a writer that wants a file name, e.g. safetensors'
    streaming ``save_file``); flushed to disk and renamed over ``path`` when the block succeeds."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, document: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(document, indent=indent) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON document, or ValueError naming the file when it is torn or not JSON (how to recover is the
    caller's message)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON (torn by an interrupted write?): {err}") from None


@contextlib.contextmanager
def replacing_dir(target: str | Path, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in for ``target`` when the block succeeds.

    ``marker``: the file (relative to the folder) that says the folder is this writer's; an existing
    non-empty ``target`` without it is refused (never deleted), one with it needs ``overwrite``. On an
    exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        if not (target / marker).is_file():
            raise FileExistsError(f"{target}: exists, is not empty and has no {marker} (not written by this tool); "
                                  "choose another folder")
        if not overwrite:
            raise FileExistsError(f"{target}: holds an earlier output ({marker}); pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = _temporary_sibling(target) if target.exists() else None
        if old is not None:
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
