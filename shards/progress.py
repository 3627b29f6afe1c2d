"""Progress bars for the long-running tools, one rule everywhere: a tqdm bar (count, rate, ETA) on stderr
when stderr is a terminal, nothing at all otherwise, so CI logs and piped output stay clean.

    from shards.progress import add_progress_argument, apply_progress_argument, progress_bar

    add_progress_argument(parser)                 # --progress / --no-progress
    apply_progress_argument(args)                 # the flag wins over MULTICLIP_PROGRESS, which wins over the terminal test
    for item in progress_bar(items, total=n, desc="convert", unit="record"):
        ...

``MULTICLIP_PROGRESS``: ``on`` (``1``, ``true``) always draws the bar, ``off`` (``0``, ``false``) never,
``auto`` or unset: only on a terminal. Torch-free (tqdm only): serving/, shards/ and training/ share it.
Ray jobs draw the bar in the driver from completed batches; workers never print one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import IO, Any, Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ENV = "MULTICLIP_PROGRESS"
_ON, _OFF, _AUTO = ("1", "on", "true", "yes"), ("0", "off", "false", "no"), ("", "auto")
_override: bool | None = None  # set by a CLI's --progress / --no-progress


def set_progress(enabled: bool | None) -> None:
    """Force bars on (True) or off (False) in this process; None goes back to the environment / terminal rule."""
    global _override
    _override = enabled


def progress_enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn: the CLI flag, else ``MULTICLIP_PROGRESS``, else whether ``stream`` (stderr) is a
    terminal. A bad ``MULTICLIP_PROGRESS`` value is an error naming the variable."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value not in _AUTO:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected on, off or auto")
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", allowed: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, or a silent one (the same object, disabled: ``update`` and iteration still work)
    when :func:`progress_enabled` says no or the caller is not the process that reports (``allowed=False``,
    e.g. a rank other than 0)."""
    show = allowed and progress_enabled()
    width = {} if _terminal_columns() else {"ncols": 80, "nrows": 24}  # unknown size (0x0): tqdm draws nothing
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr,
                dynamic_ncols=not width, **width, **kwargs)


def _terminal_columns() -> int:
    """stderr's terminal width; 0 when unknown (a pseudo-terminal nobody sized, not a terminal)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
    """Log lines of the root logger's console handlers printed above a live bar instead of through it."""
    with logging_redirect_tqdm():
        yield


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: ``MULTICLIP_PROGRESS``, else only on a terminal)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"progress bar on stderr (default: {ENV}, else only when stderr is a terminal)")


def apply_progress_argument(args: argparse.Namespace | dict[str, Any]) -> None:
    """Apply (and remove from ``args``) the ``--progress`` flag :func:`add_progress_argument` added."""
    value = args.pop("progress", None) if isinstance(args, dict) else vars(args).pop("progress", None)
    if value is not None:
        set_progress(bool(value))


__all__ = ["ENV", "add_progress_argument", "apply_progress_argument", "logs_above_bars", "progress_bar",
           "progress_enabled", "set_progress"]
