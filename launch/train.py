"""Train the heads named in a config on the shared backbone.

    deepspeed --num_gpus 2 launch/train.py --config configs/retrieval_tiny.yaml
    python launch/train.py --config configs/retrieval_tiny.yaml optim.max_steps=50
    deepspeed ... launch/train.py --config ... --resume      # continue from the last checkpoint
    python launch/train.py --config ... --resume             # ... on another number of ranks (ZeRO 0-2)
    deepspeed ... launch/train.py --config ... run.output_dir=s3://bucket/runs/x   # an fsspec location

``--resume`` on another world size converts a ZeRO-1/2 checkpoint to DeepSpeed's universal format and
repositions the data streams by epoch fraction; an fsspec ``run.output_dir`` is written through a local
staging folder and mirrored checkpoint by checkpoint (docs/checkpoints.md).

Installed (``pip install .``), the same is the console script ``multiclip-train``: run plainly it is a
world of one; under the deepspeed launcher give it the script's path, ``deepspeed --num_gpus 2
$(which multiclip-train) --config retrieval_tiny``. ``--config`` takes a file or a shipped config's name
(``retrieval_tiny``; rule: training/shipped.py).

Trailing ``key.path=value`` arguments override the YAML. The config is validated completely
before any process group, data loader or model is created.
"""
from __future__ import annotations

import argparse
import json
import sys

import training  # noqa: F401  (must come before open_clip: torchvision compatibility)
from training.config import ConfigError
from training.validation import load_config
from training.data import check_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_shards(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from training.trainer import train

    try:
        result = train(cfg, resume=args.resume)
    except ConfigError as err:  # e.g. --resume of a checkpoint trained with another model
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result and training_is_main():
        print(json.dumps({"before": result["before"], "after": result["after"]}, indent=1))
    return 0


def training_is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
