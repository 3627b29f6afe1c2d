"""Out-of-tree tasks: modules named in ``MULTICLIP_PLUGINS`` register themselves like built-in ones.

A task that lives in your own package (its training head, predictor, synthetic generator, converter)
registers through the same decorators as the five built-in tasks. List its modules, comma-separated,
in the environment variable ``MULTICLIP_PLUGINS``, each prefixed with the registry it feeds::

    MULTICLIP_PLUGINS=tasks:mypkg.head,predictors:mypkg.serve,synth:mypkg.data,convert:mypkg.convert

Each registry imports only its own group when it first lists its entries (an entry without a prefix
goes to every registry), so torch-free serving never imports a training head. Training ranks launched
by ``deepspeed``, data-loader workers and Ray workers inherit the environment, so they all see them.
"""
from __future__ import annotations

import importlib
import os

ENV_VAR = "MULTICLIP_PLUGINS"
GROUPS = ("tasks", "predictors", "synth", "convert")
_loaded: set[str] = set()


def plugin_modules(group: str) -> list[str]:
    """Modules of ``MULTICLIP_PLUGINS`` for the registry ``group`` (and those without a prefix)."""
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; known: {GROUPS}")
    modules = []
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV_VAR, "").split(","))):
        prefix, _, name = entry.rpartition(":")
        if prefix and prefix not in GROUPS:
            raise ValueError(f"{ENV_VAR}: unknown group {prefix!r} in {entry!r}; known: {GROUPS}")
        if prefix in ("", group):
            modules.append(name)
    return modules


def load_plugins(group: str) -> list[str]:
    """Import the group's plugin modules once; a module that fails to import fails loudly with its name."""
    names = plugin_modules(group)
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"{ENV_VAR}: cannot import plugin module {name!r}: {err}") from err
        _loaded.add(name)
    return names
