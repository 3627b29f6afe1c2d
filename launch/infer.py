"""Batch inference with exported ONNX models; imports no torch (see serving/infer.py).

    python launch/infer.py --model exports/run --shards data/synth/time/val --out preds/
    python launch/infer.py --model exports/run --images photos/ --out preds/ --tasks retrieval time
    python launch/infer.py --model exports/run --queries queries.txt --gallery preds/gallery --out q/

Writes <out>/<task>.jsonl (one record per item; what a task's records hold: docs/serving.md),
errors.jsonl (bad items and the tasks they could not serve; the batch goes on), summary.json (with
"providers": per graph, the providers requested, those in use and why a requested GPU provider is not).
Each task's predictor adds its own options below (serving/predictors/<task>.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.infer import ExportedModel, answer_queries, choose_predictors, count_items, folder_items, infer, \
    read_lines, shard_items  # noqa: E402
from serving.predictors import Settings, get_predictor, list_predictors  # noqa: E402
from serving.runtime import ProviderError, RuntimeOptions  # noqa: E402
from shards.progress import add_progress_argument, apply_progress_argument, logs_above_bars  # noqa: E402


def positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more (a batch of 0 items, a top-0 list, -1 workers mean nothing)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more (where 0 means "the default")."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be an integer of {least} or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (launch/export.py --out)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="WebDataset shards: directory, brace pattern or glob")
    source.add_argument("--images", help="folder of image files (recursive)")
    source.add_argument("--queries", help="text file, one query per line (tasks that answer text queries)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="*", help="default: every task of the export")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--top-k", type=positive_int, default=5)
    parser.add_argument("--providers", nargs="*", default=["tensorrt", "cuda", "cpu"],
                        help="execution providers in order of preference (tensorrt: the towers only; heads use cuda)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail (exit 2) when a requested GPU provider is not in use, instead of running without it")
    parser.add_argument("--trt-max-batch", type=non_negative_int, default=0,
                        help="TensorRT profile: largest batch (default: 256, or more for --batch-size and "
                             "tasks whose items hold several images)")
    parser.add_argument("--trt-cache", help="TensorRT engine and timing caches (default: <model>/trt_cache)")
    parser.add_argument("--fp16", action="store_true", help="fp16 graphs where exported; TensorRT fp16 engines")
    parser.add_argument("--int8", action="store_true", help="int8 towers where exported (export --int8; CPUs)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--workers", type=positive_int, default=4, help="image decoding threads")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the export's files against the manifest's sha256 (a warning says so)")
    add_progress_argument(parser)
    for task in list_predictors():
        get_predictor(task).add_arguments(parser)
    return parser


def open_model(args: argparse.Namespace) -> ExportedModel:
    options = RuntimeOptions(providers=tuple(args.providers), fp16=args.fp16, int8=args.int8,
                             intra_op_threads=args.threads, require_gpu=args.require_gpu,
                             trt_cache_dir=args.trt_cache, trt_opt_batch=max(1, args.batch_size))
    model = ExportedModel(args.model, options, verify=not args.no_verify)
    # TensorRT profile: the largest batch a tower sees (a task's item may hold several images)
    per_item = max([model.manifest["tasks"][t].get("images_per_item", 1) for t in (args.tasks or model.tasks)
                    if t in model.manifest["tasks"]], default=1)
    model.options = dataclasses.replace(options, trt_max_batch=args.trt_max_batch or
                                        max(256, args.batch_size, args.batch_size * per_item))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_progress_argument(args)
    settings = Settings(top_k=args.top_k, options=vars(args))
    try:
        with logs_above_bars():
            summary = run(parser, args, settings)
    except (FileNotFoundError, ValueError, KeyError, ProviderError) as err:
        print(f"infer error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> dict:
    """Image/shard inference or text queries, as the arguments ask; returns the summary."""
    model = open_model(args)
    if args.queries:
        return answer_queries(model, read_lines(args.queries), args.out, args.tasks, settings)
    tasks = choose_predictors(model, args.tasks)
    if args.images:
        shards_only = [t for t in tasks if get_predictor(t).shards_only]
        if shards_only:
            parser.error("; ".join(f"{t} reads {get_predictor(t).item} from --shards, not --images"
                                   for t in shards_only))
    items = shard_items(args.shards) if args.shards else folder_items(args.images)
    total = count_items(args.shards, "shards") if args.shards else count_items(args.images, "images")
    return infer(model, items, tasks, args.out, settings, args.batch_size, args.workers, total=total)


if __name__ == "__main__":
    sys.exit(main())
