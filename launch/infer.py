"""Batch inference with exported ONNX models; imports no torch (see serving/infer.py).

    python launch/infer.py --model exports/run --shards data/synth/time/val --out preds/
    python launch/infer.py --model exports/run --images photos/ --out preds/ --tasks retrieval time
    python launch/infer.py --model exports/run --queries queries.txt --gallery preds/gallery --out q/

Writes <out>/<task>.jsonl (one record per image), errors.jsonl (bad items, the batch goes on),
summary.json (with "providers": per graph, the providers requested, those in use and why a requested
GPU provider is not), and for retrieval <out>/gallery/{embeddings.npy,keys.json} (queries search it).
meme writes <out>/meme.jsonl: per meme, its caption's top-k memes by fused score (with qi and qc).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.infer import ExportedModel, Settings, count_items, folder_items, infer_contextual, infer_images, \
    infer_meme, infer_queries, read_queries, shard_items  # noqa: E402
from serving.runtime import ProviderError, RuntimeOptions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (launch/export.py --out)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="WebDataset shards: directory, brace pattern or glob")
    source.add_argument("--images", help="folder of image files (recursive)")
    source.add_argument("--queries", help="text file, one query per line (needs --gallery)")
    parser.add_argument("--gallery", help="gallery folder written by an image run (<out>/gallery)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="*", help="default: every task of the export")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--classes", help="retrieval zero-shot classes, one per line")
    parser.add_argument("--geo-labels", help='geo_time candidates: JSON {"location": [...], "time": [...]}')
    parser.add_argument("--providers", nargs="*", default=["tensorrt", "cuda", "cpu"],
                        help="execution providers in order of preference (tensorrt: the towers only; heads use cuda)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail (exit 2) when a requested GPU provider is not in use, instead of running without it")
    parser.add_argument("--trt-max-batch", type=int, default=0,
                        help="TensorRT profile: largest batch (default: 256, or more for --batch-size / contextual sets)")
    parser.add_argument("--trt-cache", help="TensorRT engine and timing caches (default: <model>/trt_cache)")
    parser.add_argument("--fp16", action="store_true", help="fp16 graphs where exported; TensorRT fp16 engines")
    parser.add_argument("--int8", action="store_true", help="int8 towers where exported (export --int8; CPUs)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = RuntimeOptions(providers=tuple(args.providers), fp16=args.fp16, int8=args.int8,
                             intra_op_threads=args.threads, require_gpu=args.require_gpu,
                             trt_cache_dir=args.trt_cache, trt_opt_batch=max(1, args.batch_size))
    try:
        model = ExportedModel(args.model, options)
        # TensorRT profile: the largest batch a tower sees (a head may send several images per item)
        per_item = max([model.manifest["tasks"][t].get("images_per_item", 1) for t in (args.tasks or model.tasks)
                        if t in model.manifest["tasks"]], default=1)
        model.options = dataclasses.replace(options, trt_max_batch=args.trt_max_batch or
                                            max(256, args.batch_size, args.batch_size * per_item))
        if args.queries:
            if not args.gallery:
                parser.error("--queries needs --gallery")
            summary = infer_queries(model, read_queries(args.queries), args.out, args.gallery, args.top_k, args.batch_size)
        else:
            settings = Settings(top_k=args.top_k, classes=read_queries(args.classes) if args.classes else None,
                                geo_labels=json.loads(Path(args.geo_labels).read_text()) if args.geo_labels else None)
            kind, spec = ("shards", args.shards) if args.shards else ("images", args.images)
            tasks = args.tasks or model.tasks
            single = [t for t in tasks if t not in ("contextual", "meme")]
            if single:
                items = shard_items(spec) if kind == "shards" else folder_items(spec)
                summary = infer_images(model, items, single, args.out, settings, args.batch_size, args.workers,
                                       total=count_items(spec, kind))
            if "contextual" in tasks:  # sets of images + a description: a loop of its own (errors appended)
                if kind != "shards":
                    parser.error("contextual reads multi-image samples from --shards")
                summary = infer_contextual(model, shard_items(spec), args.out, args.batch_size, args.workers,
                                           total=count_items(spec, kind))
            if "meme" in tasks:  # each meme's caption queries the gallery of all memes read (errors appended)
                if kind != "shards":
                    parser.error("meme reads caption, context and emotions from --shards")
                summary = infer_meme(model, shard_items(spec), args.out, args.top_k, args.batch_size, args.workers,
                                     total=count_items(spec, kind))
    except (FileNotFoundError, ValueError, ProviderError) as err:
        print(f"infer error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
