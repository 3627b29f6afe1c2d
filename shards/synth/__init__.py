"""Synthetic shard sets for smoke tests and compositional-generalisation checks, byte-identical per seed.

    python -m shards.synth --out DIR --task TASK [--train 4000] [--val 500] [--seed 0]
                           [--shard-size 500] [--image-size 64] [--overwrite] [--progress | --no-progress]

Each task's generator is one module of this package (``retrieval``, ``time_of_day``, ``geo_time``,
``contextual``, ``meme``) that registers a :class:`SynthTask` under the task's name:

    register_synth("my_task", SynthTask(describe=describe, make_sample=make_sample))

``describe(seed)`` gives task-level metadata (saved in meta.json and handed back to every sample),
``make_sample(rng, split, image_size, task_meta)`` gives one sample's images and json fields (with
``caption`` and ``label``), ``write_extras(out, task_meta, seed)`` writes files beside the splits and
``run_options(out)`` gives the task options that point a training run at them.
Every sample has its own RNG seeded by (task, seed, split, index), so output does not depend on
generation order. An out-of-tree task registers the same way from a module named in
``MULTICLIP_PLUGINS`` (see ``shards.plugins``): the registry imports every module of this package and
then the plugins the first time it is asked for a task.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shards.plugins import load_plugins
from shards.progress import add_progress_argument, apply_progress_argument, progress_bar
from shards.synth.scenes import COLOURS, GRID_CELLS, POSITIONS, SHAPES, SceneObject, draw_scene
from shards.writer import ShardSetWriter

SampleFields = dict[str, Any]


@dataclass(frozen=True)
class SynthTask:
    """How one task makes its data: task-level metadata, then independent samples."""

    describe: Callable[[int], dict[str, Any]]
    make_sample: Callable[[random.Random, str, int, dict[str, Any]], tuple[dict[str, bytes], SampleFields]]
    write_extras: Callable[[Path, dict[str, Any], int], None] | None = None  # files beside the splits
    # task options a run on the generated set needs (paths of the extras), from the output directory
    run_options: Callable[[Path], dict[str, Any]] | None = None


# --------------------------------------------------------------------------- registry

_TASKS: dict[str, SynthTask] = {}
_discovered = False


def register_synth(name: str, task: SynthTask) -> SynthTask:
    """Register a task's generator under ``name``; returns ``task``.

    Args:
        name: the task name ``--task`` and ``generate(task=...)`` take.
        task: its :class:`SynthTask`.

    Raises:
        ValueError: when ``name`` is already registered (two generators for one task are a bug).
    """
    if name in _TASKS:
        raise ValueError(f"synthetic task {name!r} is already registered")
    if not isinstance(task, SynthTask):
        raise TypeError(f"register_synth({name!r}, ...) needs a SynthTask, got {type(task).__name__}")
    _TASKS[name] = task
    return task


def _discover() -> None:
    """Import every generator module of this package, then the plugins; once, on first lookup.

    Not at package import: the generator modules import this package, and importing one of them
    directly (``shards.synth.time_of_day``) must not pull in all the others.
    """
    global _discovered
    if _discovered:
        return
    _discovered = True  # first, so a plugin that looks a name up while it registers does not recurse
    try:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        load_plugins("synth")
    except BaseException:
        _discovered = False
        raise


def list_synth() -> list[str]:
    """Names of the registered synthetic tasks, sorted."""
    _discover()
    return sorted(_TASKS)


def get_synth(name: str) -> SynthTask:
    """The registered generator of a task; raises KeyError listing the known tasks for an unknown name."""
    _discover()
    if name not in _TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; known: {sorted(_TASKS)}")
    return _TASKS[name]


# --------------------------------------------------------------------------- generation


def sample_rng(task: str, seed: int, split: str, index: int) -> random.Random:
    """String seeds are hashed with SHA-512 by random.Random, so this is stable across processes."""
    return random.Random(f"{task}/{seed}/{split}/{index}")


def write_split(
    out_dir: Path, task: str, count: int, seed: int, shard_size: int, image_size: int,
    task_meta: dict[str, Any], split: str, overwrite: bool,
) -> dict[str, Any]:
    """Write one split's shards; returns its sizes.json content."""
    make_sample = get_synth(task).make_sample
    with ShardSetWriter(out_dir, shard_size, overwrite=overwrite) as writer:
        for index in progress_bar(range(count), desc=f"synth {task}/{split}", unit="sample"):
            images, fields = make_sample(sample_rng(task, seed, split, index), split, image_size, task_meta)
            source = f"synth/{task}/seed{seed}/{split}/{index:07d}"
            meta = {"task": task, "caption": fields.pop("caption"), "label": fields.pop("label"), "source": source}
            writer.write(f"{split}-{index:07d}", images, {**meta, **fields})
    return writer.close()


def generate(
    out: str | Path,
    task: str,
    n_train: int = 4000,
    n_val: int = 500,
    seed: int = 0,
    shard_size: int = 500,
    image_size: int = 64,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write out/train, out/val and out/meta.json; returns the meta.json content."""
    if task not in list_synth():
        raise ValueError(f"unknown synthetic task {task!r}; known: {list_synth()}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 so objects stay visible, got {image_size}")
    out = Path(out)
    spec = get_synth(task)
    task_meta = spec.describe(seed)
    counts = {}
    for split, count in (("train", n_train), ("val", n_val)):
        sizes = write_split(out / split, task, count, seed, shard_size, image_size, task_meta, split, overwrite)
        counts[split] = sizes["total"]
    if spec.write_extras is not None:
        spec.write_extras(out, task_meta, seed)
    meta = {"task": task, "seed": seed, "image_size": image_size, **task_meta, "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shards.synth", description="Write synthetic shard sets.")
    parser.add_argument("--out", required=True, help="output directory (gets train/, val/, meta.json)")
    parser.add_argument("--task", required=True, choices=list_synth())
    parser.add_argument("--train", type=int, default=4000, help="training samples")
    parser.add_argument("--val", type=int, default=500, help="validation samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output dirs")
    add_progress_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_progress_argument(args)
    meta = generate(
        args.out, task=args.task, n_train=args.train, n_val=args.val, seed=args.seed,
        shard_size=args.shard_size, image_size=args.image_size, overwrite=args.overwrite,
    )
    print(json.dumps({"out": str(args.out), "task": meta["task"], "counts": meta["counts"]}))


__all__ = [
    "COLOURS",
    "GRID_CELLS",
    "POSITIONS",
    "SHAPES",
    "SampleFields",
    "SceneObject",
    "SynthTask",
    "draw_scene",
    "generate",
    "get_synth",
    "list_synth",
    "main",
    "parse_args",
    "register_synth",
    "sample_rng",
    "write_split",
]
