"""Synthetic shard sets for smoke tests and compositional-generalisation checks, byte-identical per seed.

    python -m shards.synth --out DIR [--task retrieval] [--train 4000] [--val 500] [--seed 0]
                           [--shard-size 500] [--image-size 64] [--overwrite]

Each task registers a ``SynthTask`` in ``SYNTH_TASKS``: ``describe(seed)`` gives task-level metadata
(saved in meta.json and handed back to every sample), ``make_sample(rng, split, image_size, task_meta)``
gives one sample's images and json fields. Every sample has its own RNG seeded by (task, seed, split,
index), so output does not depend on generation order.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from shards.shapes import draw_shape
from shards.writer import ShardSetWriter, encode_image

# Saturated object colours; every one has a channel >= 200, backgrounds stay below 100 in every channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 205, 60),
    "blue": (45, 90, 240),
    "yellow": (245, 225, 35),
    "purple": (160, 55, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 225, 230),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES = ("small", "large")
# Objects live in disjoint cells of a 3x3 grid, so they never overlap.
GRID_CELLS = {"top left": (0, 0), "top right": (2, 0), "bottom left": (0, 2), "bottom right": (2, 2), "center": (1, 1)}
SIZE_FRACTION = {"small": 0.5, "large": 0.85}
BACKGROUND_MAX = 80  # darkest-but-visible range for background colours
NOISE_AMPLITUDE = 12
TWIN_PROBABILITY = 0.2  # chance that a further object copies the main object's colour and shape
SIZE_WORD_PROBABILITY = 0.3

SampleFields = dict[str, Any]


@dataclass(frozen=True)
class SynthTask:
    """How one task makes its data: task-level metadata, then independent samples."""

    describe: Callable[[int], dict[str, Any]]
    make_sample: Callable[[random.Random, str, int, dict[str, Any]], tuple[dict[str, bytes], SampleFields]]
    write_extras: Callable[[Path, dict[str, Any], int], None] | None = None  # files beside the splits


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str
    size: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


# --------------------------------------------------------------------------- retrieval: task metadata


def retrieval_classes() -> list[str]:
    """Labels are '{colour} {shape}' of the main object."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def held_out_triples(seed: int) -> list[tuple[str, str, str]]:
    """One position per colour+shape (20% of triples) is never a main object in train.

    Holding out one position per class keeps every class trainable and every held-out triple novel
    only as a combination.
    """
    rng = random.Random(f"retrieval/held-out/{seed}")
    return [(colour, shape, rng.choice(POSITIONS)) for colour in COLOURS for shape in SHAPES]


def describe_retrieval(seed: int) -> dict[str, Any]:
    return {"classes": retrieval_classes(), "held_out": [list(t) for t in held_out_triples(seed)]}


# --------------------------------------------------------------------------- retrieval: scene content


def allowed_appearances(position: str, banned: set[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s, position) not in banned]


def draw_objects(rng: random.Random, banned: set[tuple[str, str, str]]) -> list[SceneObject]:
    """1-3 objects in distinct cells; the first is the main object. No object uses a banned triple."""
    positions = rng.sample(POSITIONS, rng.randint(1, 3))
    objects: list[SceneObject] = []
    for position in positions:
        appearance = rng.choice(allowed_appearances(position, banned))
        if objects and rng.random() < TWIN_PROBABILITY:
            twin = (objects[0].colour, objects[0].shape)
            if (*twin, position) not in banned:
                appearance = twin
        objects.append(SceneObject(appearance[0], appearance[1], position, rng.choice(SIZES)))
    return objects


# --------------------------------------------------------------------------- retrieval: drawing


def dark_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(5, BACKGROUND_MAX), rng.randint(5, BACKGROUND_MAX), rng.randint(5, BACKGROUND_MAX))


def gradient_background(rng: random.Random, size: int) -> np.ndarray:
    start, end = np.array(dark_colour(rng), float), np.array(dark_colour(rng), float)
    ramp = np.linspace(0.0, 1.0, size)
    weights = np.broadcast_to(ramp[None, :] if rng.random() < 0.5 else ramp[:, None], (size, size))
    return start + (end - start) * weights[..., None]


def stripes_background(rng: random.Random, size: int) -> np.ndarray:
    first, second = np.array(dark_colour(rng), float), np.array(dark_colour(rng), float)
    width = rng.randint(2, max(2, size // 8))
    ys, xs = np.mgrid[0:size, 0:size]
    coordinate = rng.choice([xs, ys, xs + ys, xs - ys + size])
    on = ((coordinate // width) % 2 == 0)[..., None]
    return np.where(on, first, second)


def noise_background(rng: random.Random, size: int) -> np.ndarray:
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (size, size, 3))
    return np.array(dark_colour(rng), float) + noise


def flat_background(rng: random.Random, size: int) -> np.ndarray:
    return np.broadcast_to(np.array(dark_colour(rng), float), (size, size, 3))


BACKGROUNDS = (flat_background, gradient_background, stripes_background, noise_background)


def draw_background(rng: random.Random, size: int) -> Image.Image:
    """Clutter so a model cannot key on a constant backdrop; always darker than any object colour."""
    pixels = rng.choice(BACKGROUNDS)(rng, size)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def object_box(rng: random.Random, obj: SceneObject, image_size: int) -> tuple[float, float, float]:
    """(x0, y0, extent) of the object: its size inside its grid cell, jittered within the cell."""
    cell = image_size / 3
    extent = SIZE_FRACTION[obj.size] * cell
    column, row = GRID_CELLS[obj.position]
    x0 = column * cell + rng.uniform(0, cell - extent)
    y0 = row * cell + rng.uniform(0, cell - extent)
    return x0, y0, extent


def draw_scene(rng: random.Random, objects: list[SceneObject], image_size: int) -> Image.Image:
    image = draw_background(rng, image_size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj.shape, *object_box(rng, obj, image_size), fill=COLOURS[obj.colour])
    return image


# --------------------------------------------------------------------------- retrieval: captions

CORNER_PHRASES = ("at the {}", "in the {} corner", "in the {}")
CENTER_PHRASES = ("in the center", "at the center", "in the middle")
JOINERS = (" with ", " and ", ", plus ")
PREFIXES = ("", "", "", "a picture of ", "an image of ")
NUMBER_WORDS = {2: "two", 3: "three"}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def position_phrase(rng: random.Random, position: str) -> str:
    if position == "center":
        return rng.choice(CENTER_PHRASES)
    return rng.choice(CORNER_PHRASES).format(position)


def positions_phrase(positions: list[str]) -> str:
    """'at the top left and the center' for a group of identical objects."""
    named = [f"the {p}" for p in positions]
    listed = ", ".join(named[:-1]) + " and " + named[-1]
    return "at " + listed


def group_phrase(rng: random.Random, group: list[SceneObject]) -> str:
    first = group[0]
    if len(group) == 1:
        words = f"{first.colour} {first.shape}"
        if rng.random() < SIZE_WORD_PROBABILITY:
            words = f"{first.size} {words}"
        return f"{with_article(words)} {position_phrase(rng, first.position)}"
    noun = f"{NUMBER_WORDS[len(group)]} {first.colour} {plural(first.shape)}"
    return f"{noun} {positions_phrase([obj.position for obj in group])}"


def group_by_appearance(objects: list[SceneObject]) -> list[list[SceneObject]]:
    """Objects of the same colour and shape are counted together; the main object's group comes first."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    return list(groups.values())


def make_caption(rng: random.Random, objects: list[SceneObject]) -> str:
    """A small grammar: optional prefix, the main object's group, then the others with varied joiners."""
    phrases = [group_phrase(rng, group) for group in group_by_appearance(objects)]
    caption = phrases[0]
    for phrase in phrases[1:]:
        caption += rng.choice(JOINERS) + phrase
    return rng.choice(PREFIXES) + caption


def make_retrieval_sample(
    rng: random.Random, split: str, image_size: int, task_meta: dict[str, Any]
) -> tuple[dict[str, bytes], SampleFields]:
    """One scene: train never uses held-out triples, val draws from all of them."""
    held_out = {tuple(triple) for triple in task_meta["held_out"]}
    objects = draw_objects(rng, banned=held_out if split == "train" else set())
    image = draw_scene(rng, objects, image_size)
    main = objects[0]
    fields = {
        "caption": make_caption(rng, objects),
        "label": f"{main.colour} {main.shape}",
        "objects": [asdict(obj) for obj in objects],
        "held_out": main.triple in held_out,
    }
    return {"png": encode_image(image, "png")}, fields


from shards.synth_geo import describe_geo, labels_of, make_geo_sample, write_knowledge_corpus  # noqa: E402
from shards.synth_time import describe_time, make_time_sample  # noqa: E402
from shards.synth_meme import describe_meme, make_meme_sample, write_meme_extras  # noqa: E402
from shards.synth_contextual import describe_contextual, make_contextual_sample  # noqa: E402


def write_geo_extras(out: Path, task_meta: dict[str, Any], seed: int) -> None:
    """geo_time also needs its knowledge corpus and the candidate labels."""
    write_knowledge_corpus(task_meta, out / "knowledge.txt", seed=seed)
    (out / "labels.json").write_text(json.dumps(labels_of(task_meta), indent=1) + "\n")


SYNTH_TASKS: dict[str, SynthTask] = {
    "retrieval": SynthTask(describe=describe_retrieval, make_sample=make_retrieval_sample),
    "time": SynthTask(describe=describe_time, make_sample=make_time_sample),
    "geo_time": SynthTask(describe=describe_geo, make_sample=make_geo_sample, write_extras=write_geo_extras),
    "meme": SynthTask(describe=describe_meme, make_sample=make_meme_sample, write_extras=write_meme_extras),
    "contextual": SynthTask(describe=describe_contextual, make_sample=make_contextual_sample),
}


# --------------------------------------------------------------------------- generation


def sample_rng(task: str, seed: int, split: str, index: int) -> random.Random:
    """String seeds are hashed with SHA-512 by random.Random, so this is stable across processes."""
    return random.Random(f"{task}/{seed}/{split}/{index}")


def write_split(
    out_dir: Path, task: str, count: int, seed: int, shard_size: int, image_size: int,
    task_meta: dict[str, Any], split: str, overwrite: bool,
) -> dict[str, Any]:
    """Write one split's shards; returns its sizes.json content."""
    make_sample = SYNTH_TASKS[task].make_sample
    with ShardSetWriter(out_dir, shard_size, overwrite=overwrite) as writer:
        for index in range(count):
            images, fields = make_sample(sample_rng(task, seed, split, index), split, image_size, task_meta)
            source = f"synth/{task}/seed{seed}/{split}/{index:07d}"
            meta = {"task": task, "caption": fields.pop("caption"), "label": fields.pop("label"), "source": source}
            writer.write(f"{split}-{index:07d}", images, {**meta, **fields})
    return writer.close()


def generate(
    out: str | Path,
    task: str = "retrieval",
    n_train: int = 4000,
    n_val: int = 500,
    seed: int = 0,
    shard_size: int = 500,
    image_size: int = 64,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write out/train, out/val and out/meta.json; returns the meta.json content."""
    if task not in SYNTH_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(SYNTH_TASKS)}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 so objects stay visible, got {image_size}")
    out = Path(out)
    task_meta = SYNTH_TASKS[task].describe(seed)
    counts = {}
    for split, count in (("train", n_train), ("val", n_val)):
        sizes = write_split(out / split, task, count, seed, shard_size, image_size, task_meta, split, overwrite)
        counts[split] = sizes["total"]
    if SYNTH_TASKS[task].write_extras is not None:
        SYNTH_TASKS[task].write_extras(out, task_meta, seed)
    meta = {"task": task, "seed": seed, "image_size": image_size, **task_meta, "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shards.synth", description="Write synthetic shard sets.")
    parser.add_argument("--out", required=True, help="output directory (gets train/, val/, meta.json)")
    parser.add_argument("--task", default="retrieval", choices=sorted(SYNTH_TASKS))
    parser.add_argument("--train", type=int, default=4000, help="training samples")
    parser.add_argument("--val", type=int, default=500, help="validation samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output dirs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = generate(
        args.out, task=args.task, n_train=args.train, n_val=args.val, seed=args.seed,
        shard_size=args.shard_size, image_size=args.image_size, overwrite=args.overwrite,
    )
    print(json.dumps({"out": str(args.out), "task": meta["task"], "counts": meta["counts"]}))


if __name__ == "__main__":
    main()
