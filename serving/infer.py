"""Batch inference on exported models, without torch: items in, one JSONL file per task out.

    model = ExportedModel("exports/run1")                 # manifest, sessions, tokenizer, preprocessing
    summary = infer(model, shard_items("data/val"), None, "out/")   # every task of the export

The engine knows no task: each task's predictor (``serving/predictors/<task>.py``) says what an item
is and how a batch is scored. Items are decoded once per kind of item (predictors that share a
``load`` share it) and the image tower runs once per batch for all predictors of plain images. A bad
item is written to ``errors.jsonl`` with its shard, key and the tasks it could not serve; the batch
goes on without it.

Outputs are written into a hidden folder inside ``out_dir`` and only replace the files of an earlier
run there once the whole run has succeeded (:func:`staged_outputs`): a run that fails leaves them as
they were.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

from serving.items import Item, batched, count_items, folder_items, read_lines, shard_items  # noqa: F401  (the inputs, re-exported)
from serving.model import ExportedModel, normalize, top_k  # noqa: F401  (re-exported for the jobs)
from serving.predictors import Batch, Predictor, Settings, get_predictor, list_predictors
from shards.progress import progress_bar

LOG = logging.getLogger("multiclip.serving")
__all__ = ["ExportedModel", "Item", "Settings", "answer_queries", "choose_predictors", "count_items", "folder_items",
           "infer", "normalize", "read_lines", "shard_items", "top_k"]


def choose_predictors(model: ExportedModel, tasks: list[str] | None) -> list[str]:
    """The tasks asked for (default: every task of the export that has a predictor); ValueError otherwise."""
    known = list_predictors()
    tasks = tasks or [t for t in model.tasks if t in known]
    unknown = [t for t in tasks if t not in model.tasks or t not in known]
    if unknown:
        raise ValueError(f"task(s) {unknown} not in this export ({model.tasks}) or without a predictor ({known})")
    return tasks


def group_by_item(predictors: list[Predictor]) -> list[list[Predictor]]:
    """Predictors that read items the same way (the same ``load``) decode them once."""
    groups: dict[Any, list[Predictor]] = {}
    for predictor in predictors:
        groups.setdefault(type(predictor).load, []).append(predictor)
    return list(groups.values())


def infer(model: ExportedModel, items: Iterable[Item], tasks: list[str] | None, out_dir: str | Path,
          settings: Settings = Settings(), batch_size: int = 64, workers: int = 4,
          total: int | None = None) -> dict[str, Any]:
    """Run each task's predictor over the items; ``<task>.jsonl`` per task, ``errors.jsonl``, ``summary.json``.

    Returns:
        ``{"items": n, "predicted": n, "errors": n, "tasks": [...]}`` (also written to summary.json, with
        the providers in use); an item counts as predicted when every task could use it.
    """
    if batch_size < 1 or settings.top_k < 1:
        raise ValueError(f"batch_size and top_k must be 1 or more, got {batch_size} and {settings.top_k}")
    out_dir = Path(out_dir)
    tasks = choose_predictors(model, tasks)
    predictors = [get_predictor(t)(model, settings) for t in tasks]
    groups = group_by_item(predictors)
    counts = {"items": 0, "predicted": 0, "errors": 0}
    with staged_outputs(out_dir) as stage:
        with contextlib.ExitStack() as opened:
            files = {t: opened.enter_context((stage / f"{t}.jsonl").open("w")) for t in tasks}
            errors = opened.enter_context((stage / "errors.jsonl").open("w"))
            pool = opened.enter_context(ThreadPoolExecutor(max(1, workers)))
            bar = opened.enter_context(progress_bar(total=total, unit="item", desc="infer"))  # terminal only
            for items_batch in batched(items, batch_size):
                failed: dict[int, dict[str, Any]] = {}
                for group in groups:
                    loaded = list(pool.map(group[0].load, items_batch))
                    for i, x in enumerate(loaded):
                        if isinstance(x, str):
                            failed.setdefault(i, {"error": x, "tasks": []})["tasks"] += [p.task for p in group]
                    good = [(it, x) for it, x in zip(items_batch, loaded) if not isinstance(x, str)]
                    if good:
                        batch = Batch(model, [it for it, _ in good], [x for _, x in good])
                        for predictor in group:
                            write_records(files[predictor.task], zip(batch.ids, predictor.predict(batch) or ()))
                for i, failure in sorted(failed.items()):
                    it = items_batch[i]
                    LOG.warning("skipped %s %s: %s", it.source, it.key, failure["error"])
                    errors.write(json.dumps({"key": it.key, "source": it.source, **failure}) + "\n")
                counts["items"] += len(items_batch)
                counts["errors"] += len(failed)
                counts["predicted"] += len(items_batch) - len(failed)
                bar.update(len(items_batch))
            for predictor in predictors:
                write_records(files[predictor.task], predictor.finish(stage))
        summary = {**counts, "tasks": tasks}
        record_providers(model, stage, summary)
    return summary


@contextlib.contextmanager
def staged_outputs(out_dir: str | Path) -> Iterator[Path]:
    """A hidden folder inside ``out_dir`` for a run's outputs, moved over ``out_dir``'s when the block succeeds.

    Each file (and folder, e.g. ``gallery/``) written there replaces its namesake in ``out_dir`` by a
    rename, ``summary.json`` last; on an exception nothing in ``out_dir`` is touched and the folder is
    removed. Files of ``out_dir`` the run does not write (another task's, a query run's) stay.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".infer-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        for entry in sorted(stage.iterdir(), key=lambda p: (p.name == "summary.json", p.name)):
            _publish(entry, out_dir / entry.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(entry: Path, target: Path) -> None:
    """``entry`` (flushed to disk) in place of ``target``: one rename for a file; a folder is swapped in whole."""
    for path in [entry, *entry.rglob("*")] if entry.is_dir() else [entry]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if entry.is_dir() and target.is_dir():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(entry, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(entry, target)


def write_records(out, pairs: Iterable[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for ident, record in pairs:
        out.write(json.dumps({**ident, **record}) + "\n")


def answer_queries(model: ExportedModel, queries: list[str], out_dir: str | Path, tasks: list[str] | None,
                   settings: Settings = Settings()) -> dict[str, Any]:
    """Text queries for every chosen task whose predictor answers them (``<task>.jsonl``); summary per task."""
    out_dir = Path(out_dir)
    answers = {}
    with staged_outputs(out_dir) as stage:
        for task in choose_predictors(model, tasks):
            summary = get_predictor(task).answer_queries(model, queries, stage, settings)
            if summary is not None:
                answers[task] = summary
        if not answers:
            raise ValueError(f"no task of {choose_predictors(model, tasks)} answers text queries")
        record_providers(model, stage, {"queries": len(queries), "tasks": answers}, keep_counts=out_dir)
    return answers


def record_providers(model: ExportedModel, out_dir: Path, summary: dict[str, Any],
                     keep_counts: Path | None = None) -> None:
    """summary.json with ``providers`` (:meth:`ExportedModel.provider_report`) next to the counts.

    ``keep_counts``: a folder whose summary.json (an image run's) keeps its counts and only gets its
    ``providers`` brought up to date.
    """
    earlier = Path(keep_counts) / "summary.json" if keep_counts is not None else None
    data = json.loads(earlier.read_text()) if earlier is not None and earlier.is_file() else summary
    (out_dir / "summary.json").write_text(json.dumps({**data, "providers": model.provider_report()}, indent=1))
