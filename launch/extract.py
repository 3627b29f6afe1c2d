"""Embed every sample of a shard set with an exported model or a trained run, on Ray (local, a cluster, or a Ray job).

    python launch/extract.py --model exports/geo_time --shards data/synth/geo_time/val --out feats/geo_val [--int8]
    python launch/export.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --out exports/b32 --int8   # no run needed
    python launch/extract.py --model exports/b32 --int8 --shards data/shards --out feats/b32
    python launch/extract.py --run runs/geo_time_tiny --shards data/synth/geo_time/val --out feats/geo_val  # torch actors
    python launch/extract.py --run runs/x --shards 'data/big/shard-{000000..000999}.tar' --out feats/big --address auto
    ray job submit --working-dir . -- python launch/extract.py --run /abs/runs/x --shards /abs/data --out /abs/feats

Writes ``<out>/job.json`` first (the model this folder's embeddings come from), ``<out>/parts/<shard>.parquet``
(key + one column per embedding) with a ``.done.json`` marker each (the model's key and the input shard's
size and mtime), and ``<out>/manifest.json`` (model, config and weights hashes, counts, skipped records). A
rerun skips shards finished by the same model from the same input; another model's folder is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.extract import EncoderSpec, ExtractOptions, extract, init_ray  # noqa: E402
from shards.progress import add_progress_argument, apply_progress_argument, logs_above_bars  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="export folder (launch/export.py): onnxruntime actors, no torch")
    source.add_argument("--run", help="training run folder (its final/ is loaded): torch actors")
    parser.add_argument("--int8", action="store_true", help="with --model: the int8 towers (exported with --int8)")
    parser.add_argument("--gpu", action="store_true", help="with --model: onnxruntime CUDA, one GPU per actor")
    parser.add_argument("--shards", required=True, nargs="+", help="shard directory, brace pattern or glob")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--actors", type=int, help="embedding actors (default: as many as the CPUs hold)")
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--threads", "--torch-threads", type=int, default=1,
                        help="threads per actor (torch's, or onnxruntime's intra-op threads)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of another model")
    add_progress_argument(parser)
    args = parser.parse_args(argv)
    apply_progress_argument(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("multiclip").setLevel(logging.INFO)
    if (args.int8 or args.gpu) and not args.model:
        print("error: --int8 and --gpu apply to --model (an export folder)", file=sys.stderr)
        return 2
    if args.model:
        encoder = EncoderSpec("onnx", args.model, int8=args.int8, gpu=args.gpu)
    else:
        from training.extract_torch import KIND  # registers the torch-run backend: torch only on this path

        encoder = EncoderSpec(KIND, args.run)
    try:
        encoder.check()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray(args.address, args.num_cpus)
    options = ExtractOptions(actors=args.actors, actor_cpus=args.actor_cpus, threads=args.threads,
                             actor_gpus=1.0 if args.gpu else 0.0, batch_size=args.batch_size, overwrite=args.overwrite)
    with logs_above_bars():
        manifest = extract(args.shards, args.out, encoder, options)
    summary = {k: manifest[k] for k in ("shards", "samples", "columns")}
    summary["skipped"] = {k: manifest["skipped"][k] for k in ("count", "by_reason")}
    print(json.dumps({**summary, "this_run": manifest["this_run"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
