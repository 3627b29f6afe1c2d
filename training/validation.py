"""A raw config in, a validated one out: every error at once, before any work.

The typed sections (``training/config.py``) check shapes and ranges; here come the checks that need
the rest of the library: each task's own options (replaced by its typed ``Options`` object), the
model name or checkpoint, ZeRO-3 support declared by the tasks, and the ds_config overrides. Sits above
the registry in the import order (config -> backbone -> tasks -> registry -> model -> validation ->
trainer), so nothing here is imported inside a function.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from training.backbone import check_model_config
from training.config import Config, ConfigError, format_validation_error, apply_overrides, load_deepspeed_overrides
from training.feature_cache import config_problems as feature_cache_problems
from training.registry import get_task_class, list_tasks
from training.shipped import resolve_config_path


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a raw dict into a :class:`Config`, including each task's own options."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    problems, tasks = [], []
    for i, task in enumerate(cfg.tasks):
        if task.name not in list_tasks():
            problems.append(f"  - tasks.{i}.name: unknown task {task.name!r}; known: {list_tasks()}")
            continue
        try:
            tasks.append(task.model_copy(update={"options": get_task_class(task.name).Options.model_validate(task.options)}))
        except ValidationError as err:
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"])
                problems.append(f"  - tasks.{i}.options.{where}: {e['msg']}")
    try:
        check_model_config(cfg.model)
    except ConfigError as err:
        problems.append(f"  - {err}")
    if cfg.model.init_weights and not Path(cfg.model.init_weights).exists():
        problems.append(f"  - model.init_weights: not found: {cfg.model.init_weights}")
    if cfg.deepspeed.zero_stage == 3:
        for task in cfg.tasks:
            reason = get_task_class(task.name).zero3_unsupported if task.name in list_tasks() else None
            if reason:
                problems.append(f"  - deepspeed.zero_stage: {task.name} {reason}, which ZeRO-3 does not gather; "
                                "use stage 0-2")
    problems += [f"  - optim.accum_mode: {problem}" for problem in feature_cache_problems(cfg)]
    if cfg.deepspeed.config_file and not Path(cfg.deepspeed.config_file).is_file():
        problems.append(f"  - deepspeed.config_file: no such file {cfg.deepspeed.config_file!r}")
    elif cfg.deepspeed.config_file:
        try:
            load_deepspeed_overrides(cfg)
        except (ConfigError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            problems.append(f"  - deepspeed.config_file: {err}")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)\n" + "\n".join(problems))
    return cfg.model_copy(update={"tasks": tasks})  # every task's options now its typed Options object


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate everything.

    ``path``: a file, or the name of a shipped config (``retrieval_tiny``, ``configs/retrieval_tiny.yaml``
    outside a checkout): see :func:`training.shipped.resolve_config_path`.

    Raises:
        ConfigError: naming the file and every bad key at once (or every path tried for a missing file).
    """
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))
