"""Converters from common on-disk datasets to shard sets, verifying every image on the way.

    python -m shards.convert folder --root DIR --out DIR [--shard-size 1000] [--caption-template T]
    python -m shards.convert captions --file F.csv|F.jsonl --out DIR [--images-root DIR]
                                      [--image-column image] [--caption-column caption] [--label-column label]
    python -m shards.convert toc --metadata FILE --images DIR --out DIR
    python -m shards.convert tara --records FILE --images DIR --out DIR
    python -m shards.convert imagecode --descriptions FILE --images DIR --out DIR
    python -m shards.convert meme --annotations FILE --emotions FILE --images DIR --out DIR

Every subcommand also takes ``--progress`` / ``--no-progress`` (default: a bar only when stderr is a
terminal, see ``shards.progress``).

Images keep their original bytes and extension (``jpeg`` becomes ``jpg``); unusable records are counted
by reason in ``summary.json`` next to the shards. Each format is one module of this package that
registers a :class:`Converter` under its subcommand name:

    register_converter("my_format", Converter(help="...", add_arguments=add_args, convert=convert))

``add_arguments(parser)`` adds the format's own options; ``convert(**options)`` receives them together
with the common ``out``, ``shard_size`` and ``overwrite`` and returns the summary. An out-of-tree format
registers the same way from a module named in ``MULTICLIP_PLUGINS`` (group ``convert``, see
``shards.plugins``): the registry imports every module of this package, then the plugins, the first
time it is asked for a converter.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from shards.plugins import load_plugins
from shards.progress import add_progress_argument, apply_progress_argument, logs_above_bars, progress_bar

T = TypeVar("T")


@dataclass(frozen=True)
class Converter:
    """A format's CLI: its arguments and the function they are passed to (as keyword arguments)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    convert: Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------- registry

_CONVERTERS: dict[str, Converter] = {}
_discovered = False


def register_converter(name: str, converter: Converter) -> Converter:
    """Register a format's converter under its subcommand ``name``; returns ``converter``.

    Args:
        name: the subcommand of ``python -m shards.convert``.
        converter: its :class:`Converter`.

    Raises:
        ValueError: when ``name`` is already registered.
    """
    if name in _CONVERTERS:
        raise ValueError(f"converter {name!r} is already registered")
    if not isinstance(converter, Converter):
        raise TypeError(f"register_converter({name!r}, ...) needs a Converter, got {type(converter).__name__}")
    _CONVERTERS[name] = converter
    return converter


def _discover() -> None:
    """Import every converter module of this package, then the plugins; once, on first lookup.

    Not at package import: the converter modules import this package, and importing one of them
    directly (``shards.convert.tara``) must not pull in all the others.
    """
    global _discovered
    if _discovered:
        return
    _discovered = True  # first, so a plugin that looks a name up while it registers does not recurse
    try:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        load_plugins("convert")
    except BaseException:
        _discovered = False
        raise


def list_converters() -> list[str]:
    """Names of the registered converters, sorted."""
    _discover()
    return sorted(_CONVERTERS)


def get_converter(name: str) -> Converter:
    """The registered converter of a format; raises KeyError listing the known formats for an unknown name."""
    _discover()
    if name not in _CONVERTERS:
        raise KeyError(f"unknown converter {name!r}; known: {sorted(_CONVERTERS)}")
    return _CONVERTERS[name]


# --------------------------------------------------------------------------- CLI


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the shards, sizes.json and summary.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def with_progress(records: Iterable[T], total: int | None = None, unit: str = "record") -> Iterator[T]:
    """A converter's records, counted on a progress bar (shards.progress: only on a terminal)."""
    return iter(progress_bar(records, total=total, desc="convert", unit=unit))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards.convert", description="Convert datasets to shards.")
    formats = parser.add_subparsers(dest="format", required=True)
    for name in list_converters():
        converter = get_converter(name)
        sub = formats.add_parser(name, help=converter.help)
        converter.add_arguments(sub)
        add_common_arguments(sub)
        add_progress_argument(sub)  # the CLI's own: main() takes it out before calling the converter
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = vars(build_parser().parse_args(argv))
    apply_progress_argument(args)
    converter = get_converter(args.pop("format"))
    summary = converter.convert(**args)
    print(json.dumps(summary))
    return summary


def cli() -> None:
    """``python -m shards.convert``: warnings of skipped records on stderr, the summary on stdout."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with logs_above_bars():
        main()


__all__ = [
    "Converter",
    "add_common_arguments",
    "build_parser",
    "cli",
    "get_converter",
    "list_converters",
    "main",
    "register_converter",
    "with_progress",
]
