"""Synthetic data for the "time" task (TICL): hour of day and month from a still outdoor scene.

Registers itself with ``shards.synth`` as "time" (module ``time_of_day``, so it never shadows the standard
library's ``time``). A scene is sky, ground, a tree and a house:

- hour: sky colour (night dark blue, dawn orange/pink, day light blue, dusk red/purple), light level on
  everything below the sky, and the sun (day) or moon (night) on an arc whose x position moves
  continuously with the time of day, left at sunrise (06:00) / moonrise (18:00), right at set; by day
  the tree and house cast shadows away from the sun, long in the morning and evening.
- month: the ground's and the tree's foliage colour follow a seasonal palette (winter white/grey, spring
  light green with blossoms, summer deep green, autumn orange/brown), interpolated across months.
- nuisance: horizon height, clouds, stars, moon phase, tree and house positions, palette jitter and
  sparse grey pixel noise, so a model has to read the cues rather than a fixed pixel.

Per-sample json fields (besides ``caption``, ``label`` and the common ones): ``hour`` (0-23),
``minute`` (0-59), ``month`` (1-12), ``time`` ("YYYY-MM-DD HH:MM:00", local time) and, in held-out
splits only, ``retrieval_role``: ``"query"`` for about QUERY_SHARE of the samples (drawn per sample),
``"database"`` for the rest, so time-based retrieval runs TICL's query/database protocol (48 queries
against 13,043 database images on TOC) and not only leave-one-out. The role is drawn after the scene,
so the images are those of a generator without roles.

Captions and labels use one format ("a photo taken at 17:49 in May", "17h"), defined here and imported
by ``shards.convert.toc``, so synthetic and converted TOC shards are interchangeable.
"""
from __future__ import annotations

import calendar
import math
import random
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from shards.synth import SampleFields, SynthTask, register_synth
from shards.writer import encode_image

MONTH_NAMES = ("January", "February", "March", "April", "May", "June",
               "July", "August", "September", "October", "November", "December")
HOUR_LABELS = tuple(f"{hour}h" for hour in range(24))
QUERY_SHARE = 0.1  # share of a held-out split marked as retrieval queries (the rest is the database)
YEARS = (2006, 2014)  # synthetic timestamps get a year in this range (only for the "time" string)

Colour = tuple[float, float, float]
# (hour, colour) keyframes, interpolated cyclically over 24 h: sky top and sky at the horizon. Night is
# darkest at 01:00; dawn is pink/peach under a light-blue top, dusk red/crimson under a purple top; the
# day sky drifts from pale cyan (morning) through deep blue (noon) to a golden haze (afternoon).
SKY_TOP: tuple[tuple[float, Colour], ...] = (
    (1.0, (4, 6, 28)), (3.5, (10, 22, 52)), (5.0, (30, 36, 88)), (5.75, (85, 95, 165)),
    (6.5, (140, 172, 222)), (8.0, (125, 188, 235)), (12.0, (55, 125, 235)), (15.5, (105, 150, 215)),
    (16.75, (125, 125, 190)), (17.6, (120, 75, 150)), (18.4, (80, 32, 100)), (19.25, (45, 22, 85)),
    (20.75, (22, 18, 66)),
)
SKY_HORIZON: tuple[tuple[float, Colour], ...] = (
    (1.0, (12, 16, 45)), (3.5, (22, 40, 70)), (5.0, (95, 65, 125)), (5.75, (245, 150, 175)),
    (6.5, (255, 195, 125)), (8.0, (195, 228, 235)), (12.0, (150, 195, 245)), (15.5, (225, 215, 175)),
    (16.75, (245, 175, 90)), (17.6, (235, 80, 40)), (18.4, (190, 35, 80)), (19.25, (110, 40, 120)),
    (20.75, (42, 30, 92)),
)
# Light on ground, tree and house: dim at night, full at noon.
LIGHT: tuple[tuple[float, float], ...] = (
    (1.0, 0.25), (4.5, 0.32), (6.0, 0.6), (8.0, 0.9), (12.0, 1.0), (16.0, 0.92), (18.0, 0.6),
    (19.5, 0.36), (21.0, 0.3),
)
# (month, colour) keyframes, interpolated cyclically over 12 months.
GROUND: tuple[tuple[float, Colour], ...] = (
    (1, (235, 238, 245)), (2, (200, 200, 205)), (3, (150, 160, 110)), (4, (150, 210, 110)),
    (5, (115, 195, 85)), (7, (45, 125, 45)), (8, (60, 120, 40)), (10, (190, 115, 45)),
    (11, (130, 90, 60)), (12, (215, 218, 225)),
)
FOLIAGE: tuple[tuple[float, Colour], ...] = (
    (1, (225, 228, 235)), (2, (180, 175, 170)), (3, (160, 190, 120)), (4, (170, 225, 130)),
    (5, (130, 210, 100)), (7, (25, 100, 30)), (8, (40, 105, 30)), (10, (230, 120, 30)),
    (11, (150, 85, 40)), (12, (200, 200, 205)),
)
BLOSSOM: dict[int, float] = {3: 0.4, 4: 1.0, 5: 0.6}  # share of the blossom count per spring month
BLOSSOM_COLOUR = (250, 175, 205)
SUN_COLOUR, SUN_LOW_COLOUR, MOON_COLOUR = (255, 245, 200), (255, 170, 80), (230, 230, 215)
TRUNK_COLOUR = (90, 60, 35)
WINDOW_COLOUR = (255, 215, 90)  # lit at night
WINDOW_DAY_COLOUR = (60, 70, 90)
SHADOW_REACH = 0.35  # shadow length at sunrise/sunset, as a share of the image side
SHADOW_LIGHT = 0.6  # a shadow is the ground at this share of the light
PALETTE_JITTER = 12
NOISE_AMPLITUDE = 10
NOISE_DENSITY = 0.12
NOISE_BANK_SEED = 20240605


# --------------------------------------------------------------------------- shared caption format


def hour_label(hour: int) -> str:
    return f"{hour}h"


def time_caption(hour: int, minute: int, month: int) -> str:
    """The one caption format of the time task, for synthetic and converted data alike."""
    return f"a photo taken at {hour:02d}:{minute:02d} in {MONTH_NAMES[month - 1]}"


def describe_time(seed: int) -> dict[str, Any]:
    """Hour labels are the classes; nothing depends on the seed (no held-out combinations)."""
    return {"classes": list(HOUR_LABELS), "months": list(MONTH_NAMES)}


# --------------------------------------------------------------------------- palettes


def cyclic_interpolate(keys: Sequence[tuple[float, Any]], x: float, period: float) -> Any:
    """Linear interpolation between keyframes on a circle, so 23:59 flows into 00:00 and Dec into Jan."""
    x = x % period
    for (x0, v0), (x1, v1) in zip(keys, (*keys[1:], (keys[0][0] + period, keys[0][1]))):
        if x0 <= x < x1 or x1 > period and x < x1 - period:
            return mix(v0, v1, ((x - x0) % period) / (x1 - x0))
    return keys[0][1]  # not reached for sorted keyframes


def mix(a: Any, b: Any, t: float) -> Any:
    """(1 - t) * a + t * b for numbers or colour tuples (plain Python: these are tiny, numpy is slower)."""
    if isinstance(a, tuple):
        return tuple((1 - t) * x + t * y for x, y in zip(a, b))
    return (1 - t) * a + t * b


def jittered(rng: random.Random, colour: Colour) -> Colour:
    return tuple(c + rng.uniform(-PALETTE_JITTER, PALETTE_JITTER) for c in colour)


def as_rgb(colour: Colour) -> tuple[int, int, int]:
    r, g, b = (int(min(255.0, max(0.0, c))) for c in colour)
    return r, g, b


def lit(colour: Colour, light: float, horizon: Colour) -> tuple[int, int, int]:
    """Scene colour under the current light, with a little of the sky's tint (warm at dawn and dusk)."""
    return as_rgb(tuple((0.85 * c + 0.15 * h) * light for c, h in zip(colour, horizon)))


# --------------------------------------------------------------------------- drawing


def sky_pixels(top: Colour, horizon_colour: Colour, horizon: int, size: int) -> np.ndarray:
    """Vertical gradient from the sky's top to the horizon; rows below the horizon are overdrawn later."""
    ramp = np.clip(np.arange(size, dtype=np.float32) / max(horizon, 1), 0.0, 1.0)[:, None]
    top_row = np.asarray(top, np.float32)[None, :]
    column = top_row + (np.asarray(horizon_colour, np.float32)[None, :] - top_row) * ramp
    return np.broadcast_to(column[:, None, :], (size, size, 3))


def sky_at(top: Colour, horizon_colour: Colour, y: float, horizon: int) -> Colour:
    return mix(top, horizon_colour, min(1.0, max(0.0, y / max(horizon, 1))))


def arc_position(phase: float, horizon: int, size: int) -> tuple[float, float]:
    """Sun/moon centre for phase 0 (rise, left) .. 1 (set, right): x moves linearly, y along a half arc."""
    margin = 0.08 * size
    x = margin + phase * (size - 2 * margin)
    y = horizon - (horizon - 0.12 * size) * math.sin(math.pi * phase)
    return x, y


def sky_body(hour: float) -> tuple[bool, float]:
    """(is_day, phase): the sun is up from 06:00 to 18:00, the moon from 18:00 to 06:00, phase 0..1 each."""
    if 6.0 <= hour < 18.0:
        return True, (hour - 6.0) / 12.0
    return False, ((hour - 18.0) % 24.0) / 12.0


def shadow_offset(hour: float, size: int) -> float:
    """Horizontal reach of cast shadows: away from the sun, long at sunrise/sunset, none at night."""
    is_day, phase = sky_body(hour)
    return (0.5 - phase) * 2 * SHADOW_REACH * size if is_day else 0.0


def draw_stars(rng: random.Random, draw: ImageDraw.ImageDraw, darkness: float, horizon: int, size: int) -> None:
    level = int(120 + 120 * darkness)
    for _ in range(int(rng.randint(4, 12) * darkness)):
        x, y = rng.randrange(size), rng.randrange(max(horizon - 2, 1))
        draw.point((x, y), fill=(level, level, level))


def draw_clouds(rng: random.Random, draw: ImageDraw.ImageDraw, light: float, horizon: int, size: int) -> None:
    grey = as_rgb((rng.uniform(0.75, 1.0) * 245 * light,) * 3)
    for _ in range(rng.randint(0, 3)):
        w, h = rng.uniform(0.15, 0.35) * size, rng.uniform(0.05, 0.1) * size
        x, y = rng.uniform(-0.1, 0.95) * size, rng.uniform(0.0, max(horizon - h, 1) * 0.8)
        draw.ellipse((x, y, x + w, y + h), fill=grey)


def draw_sun_or_moon(rng: random.Random, draw: ImageDraw.ImageDraw, hour: float, sky: tuple[Colour, Colour],
                     horizon: int, size: int) -> None:
    """Sun by day, moon by night, both on the same arc."""
    is_day, phase = sky_body(hour)
    x, y = arc_position(phase, horizon, size)
    if is_day:
        r = 0.07 * size
        low = 1.0 - math.sin(math.pi * phase)  # 1 at the horizon, 0 at noon
        draw.ellipse((x - r, y - r, x + r, y + r), fill=as_rgb(mix(SUN_COLOUR, SUN_LOW_COLOUR, low)))
        return
    r = 0.055 * size
    draw.ellipse((x - r, y - r, x + r, y + r), fill=MOON_COLOUR)
    if rng.random() < 0.7:  # moon phase: a sky-coloured disc cuts a crescent
        shadow = rng.uniform(0.5, 1.6) * r * rng.choice((-1, 1))
        draw.ellipse((x + shadow - r, y - r, x + shadow + r, y + r), fill=as_rgb(sky_at(*sky, y, horizon)))


def draw_shadow(draw: ImageDraw.ImageDraw, x0: float, x1: float, base: float, reach: float, fill: tuple,
                size: int) -> None:
    """A flat band on the ground from the object's foot (x0..x1) stretched by reach, away from the sun."""
    left, right = min(x0, x0 + reach), max(x1, x1 + reach)
    draw.ellipse((left, base - 0.02 * size, right, base + 0.04 * size), fill=fill)


def draw_tree(rng: random.Random, draw: ImageDraw.ImageDraw, foliage: tuple[int, int, int],
              trunk: tuple[int, int, int], blossoms: int, shadow: tuple[float, tuple], horizon: int,
              size: int) -> None:
    x = rng.uniform(0.1, 0.9) * size
    base = horizon + rng.uniform(0.05, 0.2) * (size - horizon)
    height, crown = rng.uniform(0.3, 0.42) * size, rng.uniform(0.12, 0.17) * size
    draw_shadow(draw, x - 0.5 * crown, x + 0.5 * crown, base, shadow[0], shadow[1], size)
    draw.rectangle((x - 0.02 * size, base - 0.5 * height, x + 0.02 * size, base), fill=trunk)
    cy = base - height + crown
    draw.ellipse((x - crown, cy - crown, x + crown, cy + crown), fill=foliage)
    for _ in range(blossoms):
        angle, radius = rng.uniform(0, 2 * math.pi), crown * math.sqrt(rng.random()) * 0.9
        px, py = x + radius * math.cos(angle), cy + radius * math.sin(angle)
        draw.rectangle((px, py, px + 1, py + 1), fill=BLOSSOM_COLOUR)


def draw_house(rng: random.Random, draw: ImageDraw.ImageDraw, light: float, horizon_colour: Colour,
               shadow: tuple[float, tuple], horizon: int, size: int) -> None:
    """A box with a roof; its window is lit when it is dark outside."""
    w, h = rng.uniform(0.15, 0.25) * size, rng.uniform(0.1, 0.18) * size
    x = rng.uniform(0.0, 1.0) * size - w / 2
    base = horizon + rng.uniform(0.25, 0.7) * (size - horizon)
    wall = (rng.uniform(90, 200), rng.uniform(70, 170), rng.uniform(60, 150))
    roof = (rng.uniform(80, 160), rng.uniform(30, 70), rng.uniform(20, 60))
    draw_shadow(draw, x, x + w, base, 1.3 * shadow[0], shadow[1], size)
    draw.rectangle((x, base - h, x + w, base), fill=lit(wall, light, horizon_colour))
    draw.polygon([(x - 0.1 * w, base - h), (x + w / 2, base - h - 0.5 * h), (x + 1.1 * w, base - h)],
                 fill=lit(roof, light, horizon_colour))
    window = WINDOW_COLOUR if light < 0.5 else lit(WINDOW_DAY_COLOUR, light, horizon_colour)
    wx, wy = x + 0.3 * w, base - 0.7 * h
    draw.rectangle((wx, wy, wx + 0.25 * w, wy + 0.3 * h), fill=window)


@lru_cache(maxsize=8)
def noise_bank(size: int) -> np.ndarray:
    """A fixed field of sparse grey noise, twice the image side; each sample cuts a window at a random offset.

    Sparse (NOISE_DENSITY of the pixels): dense noise makes PNG encoding 3x slower. One fixed field:
    a numpy Generator per sample would cost more than the rest of the scene, and windows at random
    offsets still give every image different noise.
    """
    generator = np.random.default_rng(NOISE_BANK_SEED)
    shape = (2 * size, 2 * size, 1)
    noise = generator.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, shape, dtype=np.int16)
    return noise * (generator.random(shape) < NOISE_DENSITY)


def add_noise(rng: random.Random, image: Image.Image) -> Image.Image:
    bank = noise_bank(image.width)
    y, x = rng.randrange(image.height), rng.randrange(image.width)
    pixels = np.asarray(image, dtype=np.int16) + bank[y:y + image.height, x:x + image.width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def draw_time_scene(rng: random.Random, hour: float, month: int, image_size: int) -> Image.Image:
    """The scene for a time of day (fractional hour) and month, with random nuisance layout."""
    size = image_size
    horizon = int(rng.uniform(0.55, 0.72) * size)
    light = cyclic_interpolate(LIGHT, hour, 24.0) * rng.uniform(0.92, 1.08)
    sky = (jittered(rng, cyclic_interpolate(SKY_TOP, hour, 24.0)),
           jittered(rng, cyclic_interpolate(SKY_HORIZON, hour, 24.0)))
    image = Image.fromarray(np.clip(sky_pixels(*sky, horizon, size), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw_stars(rng, draw, max(0.0, 1.0 - 2.0 * (light - 0.3)), horizon, size)
    draw_clouds(rng, draw, light, horizon, size)
    draw_sun_or_moon(rng, draw, hour, sky, horizon, size)
    ground = jittered(rng, cyclic_interpolate(GROUND, month, 12.0))
    draw.rectangle((0, horizon, size, size), fill=lit(ground, light, sky[1]))
    shadow = (shadow_offset(hour, size), lit(ground, SHADOW_LIGHT * light, sky[1]))
    foliage = lit(jittered(rng, cyclic_interpolate(FOLIAGE, month, 12.0)), light, sky[1])
    blossoms = int(BLOSSOM.get(month, 0.0) * rng.randint(6, 12))
    draw_tree(rng, draw, foliage, lit(TRUNK_COLOUR, light, sky[1]), blossoms, shadow, horizon, size)
    draw_house(rng, draw, light, sky[1], shadow, horizon, size)
    return add_noise(rng, image)


# --------------------------------------------------------------------------- samples


def random_timestamp(rng: random.Random) -> tuple[int, int, int, str]:
    """(hour, minute, month, 'YYYY-MM-DD HH:MM:00'): hour, minute and month uniform, a valid day."""
    hour, minute, month = rng.randrange(24), rng.randrange(60), rng.randint(1, 12)
    year = rng.randint(*YEARS)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return hour, minute, month, f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:00"


def make_time_sample(
    rng: random.Random, split: str, image_size: int, task_meta: dict[str, Any]
) -> tuple[dict[str, bytes], SampleFields]:
    """One scene at a uniformly drawn time and month; train and val share one distribution. Held-out
    samples also get a ``retrieval_role`` (query with probability QUERY_SHARE, else database)."""
    hour, minute, month, stamp = random_timestamp(rng)
    image = draw_time_scene(rng, hour + minute / 60.0, month, image_size)
    fields = {
        "caption": time_caption(hour, minute, month),
        "label": hour_label(hour),
        "hour": hour,
        "minute": minute,
        "month": month,
        "time": stamp,
    }
    if split != "train":
        fields["retrieval_role"] = "query" if rng.random() < QUERY_SHARE else "database"
    return {"png": encode_image(image, "png")}, fields


register_synth("time", SynthTask(describe=describe_time, make_sample=make_time_sample))
