"""Export a training run to ONNX for torch-free batch inference (see training/export/exporter.py).

    python launch/export.py --checkpoint runs/retrieval_tiny --out exports/retrieval_tiny [--fp16] [--int8]
    python launch/export.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --out exports/vit-b-32 --int8

Writes the image and text encoders, each head's inference graphs, the tokenizer, preprocessing,
label sets and a manifest; every graph is checked against torch with onnxruntime (exit 1 if not).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import training  # noqa: F401  (must come before open_clip: torchvision compatibility)
from shards.progress import add_progress_argument, apply_progress_argument, logs_above_bars
from training.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run folder holding final/")
    source.add_argument("--model", help="a plain open_clip model name (the towers only, no training run)")
    parser.add_argument("--pretrained", help="with --model: an open_clip pretrained tag or a checkpoint file")
    parser.add_argument("--model-config-dir", default="configs/models", help="with --model: JSON model configs")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (checked by cosine to fp32)")
    parser.add_argument("--int8", action="store_true",
                        help="also write int8 towers for CPU inference (dynamic quantisation, checked by cosine to fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (swapped in whole)")
    add_progress_argument(parser)
    args = parser.parse_args(argv)
    apply_progress_argument(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("multiclip").setLevel(logging.INFO)
    from training.export.exporter import ParityError

    try:
        with logs_above_bars():
            manifest = export(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    except ParityError as err:
        print(f"parity check failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps({name: {k: v for k, v in g.items() if k in ("file", "max_abs_diff_fp32", "fp16", "int8")}
                      for name, g in manifest["graphs"].items()}, indent=1))
    return 0


def export(args: argparse.Namespace) -> dict:
    """A run's export (--checkpoint) or a plain open_clip model's (--model); returns the manifest."""
    from training.export.exporter import export_pretrained, export_run

    if args.model:
        return export_pretrained(args.model, args.pretrained, args.out, fp16=args.fp16, int8=args.int8,
                                 model_config_dir=args.model_config_dir, overwrite=args.overwrite)
    return export_run(args.checkpoint, args.out, fp16=args.fp16, int8=args.int8, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
