"""What every task's torch-free predictor provides, and the registry that finds them.

A predictor says what one of its items is (``load``: an image by default; a set of frames, a meme with
its texts...), how a batch of them is scored (``predict``), and what spans the whole run (``finish``:
a gallery, or records that need every item first). The engine (``serving.infer``) decodes each item
once per kind of item and shares the image tower's features between predictors of plain images.

Register with ``@register_predictor("task")`` in ``serving/predictors/<task>.py`` (discovered
automatically) or in a plugin module (``shards.plugins``).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from serving.items import Item, load_pixels
from serving.model import ExportedModel
from shards.plugins import load_plugins

Record = dict[str, Any]


@dataclass
class Settings:
    """What a run asks of the predictors: ``top_k`` and each predictor's own CLI options by name."""

    top_k: int = 5
    options: dict[str, Any] = field(default_factory=dict)


class Batch:
    """Loaded items of one batch; the image features are computed once, on first use, for all predictors."""

    def __init__(self, model: ExportedModel, items: list[Item], loaded: list[Any]):
        self.model, self.items, self.loaded = model, items, loaded

    @property
    def ids(self) -> list[Record]:
        return [{"key": it.key, "source": it.source} for it in self.items]

    @cached_property
    def pixels(self) -> np.ndarray:
        return np.stack(self.loaded)

    @cached_property
    def features(self) -> np.ndarray:
        return self.model.image_features(self.pixels)


class Predictor:
    """One task's inference on an export. Subclasses set what they need and override ``predict``."""

    task: str = ""
    item: str = "an image"  # what one item is, for messages
    shards_only = False  # items need more than an image file (json fields, several images)

    def __init__(self, model: ExportedModel, settings: Settings):
        self.model, self.settings = model, settings
        self.meta: dict[str, Any] = model.manifest["tasks"].get(self.task, {})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """CLI options of this predictor (``launch/infer.py`` adds every registered predictor's)."""

    def load(self, item: Item) -> Any:
        """The decoded item (pixels by default), or a string saying why it cannot be used."""
        return load_pixels(item, self.model.preprocess)

    def predict(self, batch: Batch) -> list[Record] | None:
        """One record per item of ``batch``; None when records come at the end (``finish``)."""
        raise NotImplementedError

    def finish(self, out_dir: Path) -> Iterable[tuple[Record, Record]]:
        """(item ids, record) pairs that need the whole run; may also write files into ``out_dir``."""
        return ()

    @classmethod
    def answer_queries(cls, model: ExportedModel, queries: list[str], out_dir: Path,
                       settings: Settings) -> dict[str, Any] | None:
        """Text queries (``launch/infer.py --queries``) -> a summary; None if the task has no text queries."""
        return None


_PREDICTORS: dict[str, type[Predictor]] = {}
_discovered = False


def register_predictor(task: str) -> Callable[[type[Predictor]], type[Predictor]]:
    """Class decorator: the predictor of ``task``. Raises ValueError if one is registered already."""

    def decorate(cls: type[Predictor]) -> type[Predictor]:
        if task in _PREDICTORS:
            raise ValueError(f"a predictor for {task!r} is already registered by {_PREDICTORS[task].__module__}")
        cls.task = task
        _PREDICTORS[task] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every module of this package once, then the plugin modules."""
    global _discovered
    if not _discovered:
        _discovered = True
        import serving.predictors as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "base":
                importlib.import_module(f"{package.__name__}.{module.name}")
    load_plugins("predictors")


def list_predictors() -> list[str]:
    _discover()
    return sorted(_PREDICTORS)


def get_predictor(task: str) -> type[Predictor]:
    """The predictor class of ``task``; KeyError naming the known ones."""
    _discover()
    if task not in _PREDICTORS:
        raise KeyError(f"no predictor for task {task!r}; known: {sorted(_PREDICTORS)}")
    return _PREDICTORS[task]
