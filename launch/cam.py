"""Grad-CAM heatmaps of a trained run: which part of each image matches each text.

    python launch/cam.py --checkpoint runs/retrieval_tiny --images a.png b.png \
        --texts "a red circle" "a blue square" --out cams/

    python launch/cam.py --checkpoint runs/all_heads_tiny --shards data/synth/retrieval/val --count 2 --out cams/

Writes ``<out>/<image>__<i>-<text>.png`` (heatmap over the image as the model sees it, with the box
of the thresholded mask) and a ``.json`` beside each (box, peak, score). ViT and ResNet backbones.
``--shards``: the first ``--count`` samples of a shard set (their images saved to ``<out>/inputs/``), each
scored against every one of their captions unless ``--texts`` is given (a matching and a non-matching
caption per image: where each one looks).
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+")
    source.add_argument("--shards", help="a shard set: its first --count samples and their captions")
    parser.add_argument("--count", type=int, default=2, help="with --shards: samples taken")
    parser.add_argument("--texts", nargs="+", help="texts to locate (default with --shards: the samples' captions)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.3, help="mask threshold on the normalised CAM")
    args = parser.parse_args(argv)
    from training.retrieval.gradcam import cams_for_files

    try:
        images, texts = args.images, args.texts
        if args.shards:
            images, captions = first_samples(args.shards, args.count, Path(args.out) / "inputs")
            texts = texts or captions
        if not texts:
            raise ValueError("--texts is required with --images")
        written = cams_for_files(args.checkpoint, images, texts, args.out, threshold=args.threshold)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for item in written:
        print(json.dumps(item))
    return 0


def first_samples(shards: str, count: int, out_dir: Path) -> tuple[list[Path], list[str]]:
    """The first ``count`` readable samples of a shard set: their images written to ``out_dir`` (cams_for_files
    reads files) and their captions."""
    from shards.members import IMAGE_MEMBERS, JSON_MEMBER
    from shards.samples import expand_urls, tar_samples

    out_dir.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for url in expand_urls(shards):
        for sample in tar_samples(url, failures=[]):
            ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
            if ext is None or JSON_MEMBER not in sample:
                continue
            path = out_dir / f"{sample['__key__']}.{ext}"
            path.write_bytes(sample[ext])
            images.append(path)
            captions.append(json.loads(sample[JSON_MEMBER])["caption"])
            if len(images) == count:
                return images, captions
    if not images:
        raise ValueError(f"{shards}: no sample with an image and a json")
    return images, captions


if __name__ == "__main__":
    sys.exit(main())
