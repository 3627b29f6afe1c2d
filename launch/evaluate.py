"""Evaluate trained weights (or the configured pretrained backbone, zero-shot) on a shard set.

    python launch/evaluate.py --config configs/retrieval_tiny.yaml --checkpoint runs/retrieval_tiny
    python launch/evaluate.py --config configs/retrieval_tiny.yaml --zero-shot --out zs.json

Writes the metrics as JSON (``--out``, default ``<run>/eval.json``) and prints them. Held-out samples it
skips (bad image, bad json, a field of the wrong type) are counted per task (``<task>/skipped_samples``) and
written to ``skipped/<out name>/<task>/`` beside the JSON. A config or checkpoint that cannot be evaluated
(weights of another model, too few held-out samples, missing shards) is an error before any sample is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import training  # noqa: F401  (must come before open_clip: torchvision compatibility)
from training.config import ConfigError
from training.validation import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run folder or final/model.safetensors")
    source.add_argument("--zero-shot", action="store_true", help="the config's backbone as built, untrained")
    parser.add_argument("--shards", help="shard pattern to evaluate on (default: the config's data.val)")
    parser.add_argument("--out", help="metrics JSON path")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from training.data import check_held_out
    from training.evaluation import check_checkpoint, evaluate_checkpoint

    out = Path(args.out or Path(cfg.run.output_dir) / ("eval_zero_shot.json" if args.zero_shot else "eval.json"))
    try:
        if not args.zero_shot:
            check_checkpoint(cfg, args.checkpoint)
        check_held_out(cfg, args.shards)
        metrics = evaluate_checkpoint(cfg, None if args.zero_shot else args.checkpoint, args.shards,
                                      skip_dir=out.parent / "skipped" / out.stem)
    except (ConfigError, FileNotFoundError) as err:  # e.g. weights of another model: named, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
