"""Synthetic data for the "contextual" task (ImageCoDe): pick 1 of 10 near-identical images from a description.

Registers itself with ``shards.synth`` as "contextual". A set is one scene drawn 10 times: a dark
background, a static distractor object and a main object that differs only slightly between frames.

- video sets (``static: false``, set name ``synth-video-N``): frames are in time order; the main object
  drifts a little along a straight line from frame to frame, and in one frame (the "flash") it takes
  another colour.
- static sets (``static: true``, set name ``synth-open-images-N``, the ImageCoDe naming rule): 10 unordered
  shots of the same scene; the main object's position is jittered by a few pixels in each, one of them
  pushed clearly further in one direction, and one shot shows the flash colour.

Descriptions name the distinguishing detail, as ImageCoDe's annotators do:

- ``flash``: "the circle is yellow" - the one frame of another colour (readable from that frame alone);
- ``before`` / ``after`` (video): "just before the circle turns yellow" - the target looks like every other
  frame, so only the order and the neighbouring frames tell it apart;
- ``extreme``: "the circle is furthest to the left" - a property relative to the other frames.

So a frame-independent scorer (zero-shot cosine) gets ``flash`` and some ``extreme`` right but not
``before``/``after``, and a scorer that looks at the whole set (the ContextualCLIP head) can do better.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from shards.shapes import draw_shape
from shards.synth import SampleFields, SynthTask, register_synth
from shards.synth.scenes import COLOURS, SHAPES
from shards.writer import encode_image

NUM_FRAMES = 10
STATIC_SHARE = 0.35  # ImageCoDe: about a third of the sets are static (Open Images)
VIDEO_KINDS = (("flash", 0.25), ("before", 0.25), ("after", 0.25), ("extreme", 0.25))
STATIC_KINDS = (("flash", 0.4), ("extreme", 0.6))
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom"}
OBJECT_FRACTION = 0.2  # object side as a share of the image side
VIDEO_STEP = (0.02, 0.035)  # per-frame drift, as a share of the image side
STATIC_JITTER = 0.06  # position jitter of static shots, share of the image side
STATIC_EXTREME = 0.11  # how far the target of an "extreme" description is pushed, share of the side
BACKGROUND_MAX = 70
FRAME_NOISE = 8  # per-frame pixel noise: frames are near-identical, never identical
NOISE_DENSITY = 0.1  # share of pixels that get noise


def describe_contextual(seed: int) -> dict[str, Any]:
    """Task-level metadata: the vocabulary; nothing depends on the seed."""
    return {"colours": list(COLOURS), "shapes": list(SHAPES), "num_frames": NUM_FRAMES,
            "kinds": {"video": [k for k, _ in VIDEO_KINDS], "static": [k for k, _ in STATIC_KINDS]}}


def weighted_choice(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([name for name, _ in options], weights=[w for _, w in options])[0]


# --------------------------------------------------------------------------- geometry of a set


def video_positions(rng: random.Random, size: int, extent: float) -> list[tuple[float, float]]:
    """A straight drift over the 10 frames, chosen so every frame keeps the object inside the image."""
    angle = rng.uniform(0, 2 * np.pi)
    step = rng.uniform(*VIDEO_STEP) * size
    dx, dy = step * np.cos(angle), step * np.sin(angle)
    span_x, span_y = dx * (NUM_FRAMES - 1), dy * (NUM_FRAMES - 1)
    low_x, high_x = max(0.0, -span_x), size - extent - max(0.0, span_x)
    low_y, high_y = max(0.0, -span_y), size - extent - max(0.0, span_y)
    x0, y0 = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
    return [(x0 + i * dx, y0 + i * dy) for i in range(NUM_FRAMES)]


def static_positions(rng: random.Random, size: int, extent: float, pushed: int, direction: str) -> list[tuple[float, float]]:
    """Jittered shots around one place; frame ``pushed`` lies clearly furthest in ``direction``."""
    margin = (STATIC_EXTREME + 0.01) * size
    cx, cy = rng.uniform(margin, size - extent - margin), rng.uniform(margin, size - extent - margin)
    jitter = STATIC_JITTER * size / 2
    positions = [(cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)) for _ in range(NUM_FRAMES)]
    ux, uy = DIRECTIONS[direction]
    x, y = positions[pushed]
    push = STATIC_EXTREME * size
    positions[pushed] = (cx + ux * push if ux else x, cy + uy * push if uy else y)
    return positions


def along_motion(rng: random.Random, positions: list[tuple[float, float]]) -> str:
    """A direction on the axis the object drifts along most (either way), so the extreme is clear."""
    dx, dy = positions[-1][0] - positions[0][0], positions[-1][1] - positions[0][1]
    return rng.choice(("left", "right") if abs(dx) >= abs(dy) else ("top", "bottom"))


def furthest_frame(positions: list[tuple[float, float]], direction: str) -> int:
    ux, uy = DIRECTIONS[direction]
    return max(range(len(positions)), key=lambda i: ux * positions[i][0] + uy * positions[i][1])


# --------------------------------------------------------------------------- drawing


def background(rng: random.Random, size: int) -> np.ndarray:
    """A dark flat or gradient backdrop, shared by all frames of a set."""
    start = np.array([rng.randint(5, BACKGROUND_MAX) for _ in range(3)], float)
    end = np.array([rng.randint(5, BACKGROUND_MAX) for _ in range(3)], float)
    ramp = np.linspace(0.0, 1.0, size)
    weights = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    return np.broadcast_to(start + (end - start) * weights, (size, size, 3)).copy()


def draw_frame(rng: random.Random, backdrop: np.ndarray, distractor: tuple, main: tuple) -> Image.Image:
    """One frame: backdrop + fresh pixel noise, the distractor, then the main object (each (shape, xy, extent, rgb))."""
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    noise = noise_rng.integers(-FRAME_NOISE, FRAME_NOISE + 1, backdrop.shape)
    noise *= noise_rng.random(backdrop.shape[:2])[..., None] < NOISE_DENSITY  # sparse: small PNGs
    image = Image.fromarray(np.clip(backdrop + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for shape, (x, y), extent, colour in (distractor, main):
        draw_shape(draw, shape, x, y, extent, colour)
    return image


# --------------------------------------------------------------------------- one sample


def describe_target(rng: random.Random, kind: str, shape: str, flash: str, direction: str) -> str:
    if kind == "flash":
        return rng.choice((f"the {shape} is {flash}", f"the {flash} {shape}", f"here the {shape} has turned {flash}"))
    if kind == "before":
        return rng.choice((f"just before the {shape} turns {flash}", f"the frame right before the {shape} is {flash}"))
    if kind == "after":
        return rng.choice((f"just after the {shape} turns {flash}", f"the frame right after the {shape} is {flash}"))
    return rng.choice((f"the {shape} is furthest {DIRECTION_WORDS[direction]}",
                       f"the {shape} is as far {DIRECTION_WORDS[direction]} as it gets"))


def plan_set(rng: random.Random, static: bool, size: int, extent: float) -> dict[str, Any]:
    """Where the main object is in each frame, which frame flashes, and which frame is the target."""
    kind = weighted_choice(rng, STATIC_KINDS if static else VIDEO_KINDS)
    direction = rng.choice(sorted(DIRECTIONS))
    if static:
        flash_frame = rng.randrange(NUM_FRAMES)
        pushed = rng.randrange(NUM_FRAMES)
        positions = static_positions(rng, size, extent, pushed, direction)
    else:
        flash_frame = rng.randint(1, NUM_FRAMES - 2)  # both neighbours exist for before/after
        positions = video_positions(rng, size, extent)
        direction = along_motion(rng, positions)
    target = {"flash": flash_frame, "before": flash_frame - 1, "after": flash_frame + 1}.get(kind)
    if target is None:
        target = furthest_frame(positions, direction)
    return {"kind": kind, "direction": direction, "flash_frame": flash_frame, "positions": positions, "target": target}


def make_contextual_sample(
    rng: random.Random, split: str, image_size: int, task_meta: dict[str, Any]
) -> tuple[dict[str, bytes], SampleFields]:
    """One set of 10 frames ``0.png`` ... ``9.png`` and the description of its target frame."""
    static = rng.random() < STATIC_SHARE
    shape, distractor_shape = rng.choice(SHAPES), rng.choice(SHAPES)
    colour, flash, distractor_colour = rng.sample(sorted(COLOURS), 3)
    extent = OBJECT_FRACTION * image_size
    plan = plan_set(rng, static, image_size, extent)
    backdrop = background(rng, image_size)
    distractor = (distractor_shape, (rng.uniform(0, image_size - extent), rng.uniform(0, image_size - extent)),
                  extent * 0.8, COLOURS[distractor_colour])
    images = {}
    for i, xy in enumerate(plan["positions"]):
        main = (shape, xy, extent, COLOURS[flash if i == plan["flash_frame"] else colour])
        images[f"{i}.png"] = encode_image(draw_frame(rng, backdrop, distractor, main), "png")
    description = describe_target(rng, plan["kind"], shape, flash, plan["direction"])
    index = rng.getrandbits(32)
    set_name = f"synth-open-images-{index:08x}" if static else f"synth-video-{index:08x}"
    fields = {"caption": description, "label": description, "description": description, "target": plan["target"],
              "static": static, "set": set_name, "kind": plan["kind"]}
    return images, fields


register_synth("contextual", SynthTask(describe=describe_contextual, make_sample=make_contextual_sample))
