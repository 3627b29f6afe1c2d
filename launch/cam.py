"""Grad-CAM heatmaps of a trained run: which part of each image matches each text.

    python launch/cam.py --checkpoint runs/retrieval_tiny --images a.png b.png \
        --texts "a red circle" "a blue square" --out cams/

Writes ``<out>/<image>__<i>-<text>.png`` (heatmap over the image as the model sees it, with the box
of the thresholded mask) and a ``.json`` beside each (box, peak, score). ViT and ResNet backbones.
"""
from __future__ import annotations

import argparse
import json
import sys

import training  # noqa: F401  (must come before open_clip: torchvision compatibility)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a finished run folder (config.yaml + final/)")
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--texts", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.3, help="mask threshold on the normalised CAM")
    args = parser.parse_args(argv)
    from training.retrieval.gradcam import cams_for_files

    try:
        written = cams_for_files(args.checkpoint, args.images, args.texts, args.out, threshold=args.threshold)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for item in written:
        print(json.dumps(item))
    return 0


if __name__ == "__main__":
    sys.exit(main())
