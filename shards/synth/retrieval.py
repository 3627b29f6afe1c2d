"""Synthetic data for the "retrieval" task: scenes of 1-3 coloured shapes and the captions that describe them.

Labels are the main object's "{colour} {shape}". One position per colour+shape (20% of all triples) is
held out of training as a main or further object, so val measures compositional generalisation.
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.synth import SampleFields, SynthTask, register_synth
from shards.synth.scenes import COLOURS, POSITIONS, SHAPES, SIZES, SceneObject, draw_scene
from shards.writer import encode_image

TWIN_PROBABILITY = 0.2  # chance that a further object copies the main object's colour and shape
SIZE_WORD_PROBABILITY = 0.3


# --------------------------------------------------------------------------- task metadata


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


# --------------------------------------------------------------------------- scene content


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


# --------------------------------------------------------------------------- captions

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


def retrieval_run_options(out: Path) -> dict[str, Any]:
    """Zero-shot classes: every label the generator can draw (held-out combinations included)."""
    return {"classnames": retrieval_classes()}


register_synth("retrieval", SynthTask(describe=describe_retrieval, make_sample=make_retrieval_sample,
                                      run_options=retrieval_run_options))
