"""Batch inference on exported models, without torch: items in, one JSONL file per task out.

    model = ExportedModel("exports/run1")                 # manifest, sessions, tokenizer, preprocessing
    summary = infer(model, shard_items("data/val"), None, "out/")   # every task of the export

The engine knows no task: each task's predictor (``serving/predictors/<task>.py``) says what an item
is and how a batch is scored. Items are decoded once per kind of item (predictors that share a
``load`` share it) and the image tower runs once per batch for all predictors of plain images. A bad
item is written to ``errors.jsonl`` with its shard, key and the tasks it could not serve; the batch
goes on without it.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from serving.items import Item, batched, count_items, folder_items, read_lines, shard_items  # noqa: F401  (the inputs, re-exported)
from serving.model import ExportedModel, normalize, top_k  # noqa: F401  (re-exported for the jobs)
from serving.predictors import Batch, Predictor, Settings, get_predictor, list_predictors

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = choose_predictors(model, tasks)
    predictors = [get_predictor(t)(model, settings) for t in tasks]
    groups = group_by_item(predictors)
    files = {t: (out_dir / f"{t}.jsonl").open("w") for t in tasks}
    counts = {"items": 0, "predicted": 0, "errors": 0}
    with (out_dir / "errors.jsonl").open("w") as errors, ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=total, unit="item", desc="infer") as bar:
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
        write_records(files[predictor.task], predictor.finish(out_dir))
        files[predictor.task].close()
    summary = {**counts, "tasks": tasks}
    record_providers(model, out_dir, summary)
    return summary


def write_records(out, pairs: Iterable[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for ident, record in pairs:
        out.write(json.dumps({**ident, **record}) + "\n")


def answer_queries(model: ExportedModel, queries: list[str], out_dir: str | Path, tasks: list[str] | None,
                   settings: Settings = Settings()) -> dict[str, Any]:
    """Text queries for every chosen task whose predictor answers them (``<task>.jsonl``); summary per task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = {}
    for task in choose_predictors(model, tasks):
        summary = get_predictor(task).answer_queries(model, queries, out_dir, settings)
        if summary is not None:
            answers[task] = summary
    if not answers:
        raise ValueError(f"no task of {choose_predictors(model, tasks)} answers text queries")
    record_providers(model, out_dir, {"queries": len(queries), "tasks": answers}, keep_counts=True)
    return answers


def record_providers(model: ExportedModel, out_dir: Path, summary: dict[str, Any], keep_counts: bool = False) -> None:
    """summary.json with ``providers`` (:meth:`ExportedModel.provider_report`) next to the counts.

    ``keep_counts``: a summary.json already there (an image run into the same folder) keeps its counts
    and only gets its ``providers`` brought up to date.
    """
    path = out_dir / "summary.json"
    data = json.loads(path.read_text()) if keep_counts and path.is_file() else summary
    path.write_text(json.dumps({**data, "providers": model.provider_report()}, indent=1))
