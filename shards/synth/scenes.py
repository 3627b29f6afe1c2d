"""The shared scene vocabulary and drawing: coloured shapes in the cells of a 3x3 grid on a cluttered dark backdrop.

The retrieval generator draws its scenes with it, and the Grad-CAM tests draw known objects with it.
Every object colour has a channel >= 200 and backgrounds stay below 100 in every channel, so an
object is always brighter than what is behind it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shards.shapes import draw_shape

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


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str
    size: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


# --------------------------------------------------------------------------- drawing


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
