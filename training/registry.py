"""The one place where task names map to task classes.

Each task module in ``training/tasks/`` decorates its class with :func:`register_task`;
``training/tasks/__init__.py`` imports every module of the package, and the plugin modules of
``MULTICLIP_PLUGINS`` (group ``tasks``; see :mod:`shards.plugins`) come next, so a task defined in
another package registers the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from training.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}
T = TypeVar("T")


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`~training.tasks.base.Task` under ``name``.

    Raises:
        ValueError: if the name is taken (silently replacing a task hides bugs).
    """

    def decorate(cls: T) -> T:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__module__}")
        cls.name = name  # type: ignore[attr-defined]
        _TASKS[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def _ensure_loaded() -> None:
    import training.tasks  # noqa: F401  (imports every task module)
    from shards.plugins import load_plugins

    load_plugins("tasks")


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    _ensure_loaded()
    return sorted(_TASKS)


def get_task_class(name: str) -> type[Task]:
    """The task class registered under ``name``.

    Raises:
        KeyError: naming the unknown task and listing the known ones.
    """
    _ensure_loaded()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(_TASKS)}")
    return _TASKS[name]
