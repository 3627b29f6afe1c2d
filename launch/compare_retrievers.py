"""CLIP against the classical bag-of-features retriever, side by side, on one held-out set.

    python launch/compare_retrievers.py --checkpoint runs/retrieval_tiny --data data/synth/retrieval

Fits the classical retriever on DIR/train only, scores both on DIR/val with the same metric functions,
prints one table (metrics and wall seconds of fit, index and query) and writes it to
``<run>/compare_retrievers.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import training  # noqa: F401  (must come before open_clip: torchvision compatibility)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a finished run folder (config.yaml + final/)")
    parser.add_argument("--data", help="folder with train/ and val/ shards (default: the run config's data)")
    parser.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=None,
                        help="also score the untrained configured backbone (default: only if it has pretrained weights)")
    parser.add_argument("--vocabulary", type=int, default=128, help="k-means visual words")
    parser.add_argument("--pca", type=int, default=32, help="PCA components before k-means (0: none)")
    parser.add_argument("--out", help="output path without suffix (default: <run>/compare_retrievers)")
    args = parser.parse_args(argv)
    from training.retrieval.classical import ClassicalOptions, compare_retrievers

    run = Path(args.checkpoint)
    data = Path(args.data) if args.data else None
    for split in ("train", "val"):
        if data is not None and not (data / split).is_dir():
            print(f"--data {data}: no {split}/ folder", file=sys.stderr)
            return 2
    options = ClassicalOptions(vocabulary=args.vocabulary, pca_components=args.pca or None)
    report = compare_retrievers(run, data and str(data / "train"), data and str(data / "val"), args.zero_shot, options)
    out = Path(args.out) if args.out else run / "compare_retrievers"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report["markdown"])
    out.with_suffix(".json").write_text(json.dumps({k: report[k] for k in ("results", "samples")}, indent=1) + "\n")
    print(report["markdown"])
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
