"""Synthetic data for the geo_time task (QR-CLIP: where and when a photo was taken), plus its knowledge corpus.

A fixed invented world per seed: 3 regions, 2 countries each, 2 cities each (12 locations labelled
"City, Country, Region", TARA style) and 5 decades of 2 years each (labels "YYYY-M", or "YYYY" for about
a fifth of the samples). Every level of both hierarchies has its own visual cue, so a model can only be
right at a fine level by reading the matching cue:

    region  sky colour family and terrain silhouette     decade  tint/grain style of the whole photo
    country striped flag on a pole                       year    the car: body style and colour
    city    landmark: shape and colour                   month   the season's ground colour

The world has a long tail, as photo collections do: one city per country is 20 times rarer than the other
(``RARE_CITY_WEIGHT``, in every split), while the knowledge corpus describes every city alike. It is also
open: each country has a third, knowledge-only city (``meta["unseen_cities"]``) that no training photo shows
and that the knowledge corpus describes like the others; held-out photos show it with weight
``UNSEEN_VAL_WEIGHT`` (``meta["unseen_val_weight"]``). The knowledge-only cities are drawn after the rest
of the world from their own RNG and have weight 0 in training, so the training photos are the ones the
12-city world gives. ``labels.json`` lists them under ``unseen`` (the task reports ``*_unseen`` metrics).
Time labels have no knowledge-only counterpart (see ``labels_of``).
``meta["knowledge_prompt_form"]`` (off by default) adds a fourth text per city that opens with the label
prompt's own words ("a photo taken in City, Country, Region shows its tall red tower"). With the tiny
from-scratch text tower of the world test its nearest label prompt is its own for 5 of the 6
knowledge-only cities (the "City, Country, Region is known for ..." form: 3 of 6), at a margin of ~0.01
cosine; it moved no measured top-1, as the photos' location tokens do not retrieve it.
``describe_geo(seed, borrowed_landmarks=True)`` (off by default) makes the knowledge-only cities compositional:
each shows the landmark of a common seen city of another region (``city["landmark_of"]``, like a replica of a
famous tower abroad) under its own country's flag, and every city gains a signature text naming its landmark
and its flag ("photos of City in Country show a wide red arch and a flag with ... stripes"); training photos
are the default world's, byte for byte.
Positions, sizes, clouds, trees and noise vary per sample. ``write_knowledge_corpus`` writes texts that
describe these cues by name (the retrieval side of QR-CLIP) among many distractors that describe nothing
in the images. Registers itself with ``shards.synth`` as "geo_time"; ``write_geo_extras`` writes the
corpus (``knowledge.txt``) and the candidate labels (``labels.json``) beside the splits.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from shards.synth import SampleFields, SynthTask, register_synth

RGB = tuple[int, int, int]

N_REGIONS, COUNTRIES_PER_REGION, CITIES_PER_COUNTRY = 3, 2, 2
DECADES = (1970, 1980, 1990, 2000, 2010)
YEARS_PER_DECADE = 2
YEAR_ONLY_FRACTION = 0.2  # share of samples whose time label is "YYYY" rather than "YYYY-M"
RARE_CITY_WEIGHT = 0.05  # one city per country is this much rarer than the other, in every split (the long tail)
UNSEEN_VAL_WEIGHT = 0.05  # held-out weight of each country's knowledge-only city (0 in training)

# Named colours shared by landmarks, flags and cars; the names appear in the knowledge corpus.
PALETTE: dict[str, RGB] = {
    "red": (205, 40, 40),
    "white": (240, 240, 240),
    "blue": (40, 70, 200),
    "green": (40, 150, 60),
    "yellow": (240, 210, 40),
    "black": (25, 25, 30),
    "orange": (240, 130, 30),
    "gold": (215, 175, 50),
    "teal": (30, 150, 150),
    "purple": (130, 60, 170),
}
LANDMARK_COLOURS = ("red", "white", "gold", "teal", "black", "purple")
FLAG_COLOURS = ("red", "white", "blue", "green", "yellow", "black", "orange")
CAR_COLOURS = ("red", "blue", "yellow", "white", "black", "green")

# Landmark shape -> the adjective the corpus uses for it.
LANDMARKS = {"tower": "tall", "dome": "round", "pyramid": "stepped", "arch": "wide", "spire": "slender",
             "wheel": "giant"}
LANDMARK_NOUNS = {"wheel": "observation wheel"}
CAR_STYLES = ("sedan", "beetle", "van", "pickup", "wagon")
SKIES: dict[str, RGB] = {
    "pale blue": (125, 175, 235),
    "golden orange": (240, 175, 95),
    "pink dusk": (225, 145, 175),
    "teal green": (100, 195, 185),
    "deep violet": (105, 90, 185),
    "grey overcast": (165, 168, 178),
}
TERRAINS = ("jagged mountains", "rolling hills", "flat-topped mesas", "sand dunes")
TERRAIN_COLOURS: dict[str, RGB] = {
    "dark blue-grey": (70, 80, 110),
    "dark green": (40, 85, 50),
    "red-brown": (135, 65, 40),
    "dusky purple": (85, 65, 105),
}


@dataclass(frozen=True)
class DecadeStyle:
    """How a decade's photos look: a whole-image colour treatment, independent of content."""

    name: str
    description: str
    sepia: float = 0.0
    saturation: float = 1.0
    contrast: float = 1.0
    lift: float = 0.0
    cast: RGB = (0, 0, 0)
    grain: float = 0.0
    blur: bool = False
    vignette: float = 0.0


# Fixed in chronological order: older photos look older, as in real archives.
DECADE_STYLES = (
    DecadeStyle("sepia", "a brown sepia tint, dark corners and heavy film grain",
                sepia=0.7, saturation=0.6, contrast=0.8, lift=10, grain=14, vignette=0.35),
    DecadeStyle("faded", "faded, washed-out colours with a warm yellow cast",
                sepia=0.2, saturation=0.6, contrast=0.72, lift=32, cast=(14, 6, -8), grain=8),
    DecadeStyle("green film", "a slight green film cast and light grain",
                saturation=0.95, contrast=0.95, lift=6, cast=(-6, 12, -4), grain=5),
    DecadeStyle("soft digital", "soft, slightly blurry pictures with a cool blue digital cast",
                cast=(-8, -2, 14), grain=2, blur=True),
    DecadeStyle("vivid", "crisp, vivid, highly saturated colours", saturation=1.4, contrast=1.15),
)

# Month -> (name, ground description, ground colour): a northern-hemisphere seasonal cycle.
MONTHS: dict[int, tuple[str, str, RGB]] = {
    1: ("January", "covered in white snow", (236, 238, 242)),
    2: ("February", "grey with slushy snow", (178, 182, 188)),
    3: ("March", "muddy brown with patches of green", (118, 100, 62)),
    4: ("April", "pale spring green", (168, 210, 120)),
    5: ("May", "bright green with fresh grass", (80, 190, 60)),
    6: ("June", "deep green with thick grass", (30, 120, 40)),
    7: ("July", "yellow-green and sun-dried", (160, 175, 60)),
    8: ("August", "golden like straw", (215, 190, 95)),
    9: ("September", "amber with harvest stubble", (200, 140, 45)),
    10: ("October", "orange-red with fallen leaves", (205, 85, 35)),
    11: ("November", "bare brown earth", (115, 80, 55)),
    12: ("December", "frosty blue-grey", (150, 170, 195)),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth")

# --------------------------------------------------------------------------- invented names

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "th", "tr")
VOWELS = ("a", "e", "i", "o", "u")
CITY_ENDINGS = ("", "", "", "n", "r", "l", "s", "sk", "nd", "th")
COUNTRY_ENDINGS = ("dan", "via", "land", "ra", "nesh", "mark", "stan", "ria", "dor")
REGION_PREFIXES = ("North", "South", "East", "West", "High", "Low", "Far", "Sun", "Frost", "Amber", "Iron", "Mist")
REGION_SUFFIXES = ("march", "reach", "lands", "moor", "vale", "shore", "fell", "wold")


def syllables(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(count))


def city_name(rng: random.Random) -> str:
    return (syllables(rng, 2) + rng.choice(CITY_ENDINGS)).capitalize()


def country_name(rng: random.Random) -> str:
    return (syllables(rng, rng.randint(1, 2)) + rng.choice(COUNTRY_ENDINGS)).capitalize()


def region_name(rng: random.Random) -> str:
    return rng.choice(REGION_PREFIXES) + rng.choice(REGION_SUFFIXES)


def unique_name(rng: random.Random, make: Callable[[random.Random], str], taken: set[str]) -> str:
    """A fresh name; ``taken`` is compared case-insensitively so no name hides inside another label."""
    while True:
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


# --------------------------------------------------------------------------- the world (meta.json)


def distinct_combinations(rng: random.Random, first: tuple, second: tuple, count: int) -> list[tuple]:
    """``count`` different (a, b) pairs, so each label's cue is unique in the world."""
    return rng.sample([(a, b) for a in first for b in second], count)


def make_landmarks(rng: random.Random, n_countries: int) -> list[list[tuple[str, str]]]:
    """(shape, colour) per city, grouped by country: every shape is used equally often (twice for 12 cities,
    in different colours), and the cities of one country never share a shape."""
    n_cities = n_countries * CITIES_PER_COUNTRY
    shapes = [shape for shape in LANDMARKS for _ in range(-(-n_cities // len(LANDMARKS)))][:n_cities]
    while True:
        rng.shuffle(shapes)
        groups = [shapes[i:i + CITIES_PER_COUNTRY] for i in range(0, n_cities, CITIES_PER_COUNTRY)]
        if all(len(set(group)) == len(group) for group in groups):
            break
    colours = {shape: rng.sample(LANDMARK_COLOURS, len(LANDMARK_COLOURS)) for shape in LANDMARKS}
    return [[(shape, colours[shape].pop()) for shape in group] for group in groups]


def make_flags(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Striped flags, different in orientation or colour sequence."""
    flags: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    while len(flags) < count:
        flag = {"orientation": rng.choice(("horizontal", "vertical")),
                "colours": rng.sample(FLAG_COLOURS, rng.choice((2, 3)))}
        key = (flag["orientation"], tuple(flag["colours"]))
        if key not in seen:
            seen.add(key)
            flags.append(flag)
    return flags


def make_regions(rng: random.Random, taken: set[str]) -> list[dict[str, Any]]:
    n_countries = N_REGIONS * COUNTRIES_PER_REGION
    skies = rng.sample(sorted(SKIES), N_REGIONS)
    terrains = rng.sample(TERRAINS, N_REGIONS)
    terrain_colours = rng.sample(sorted(TERRAIN_COLOURS), N_REGIONS)
    flags = iter(make_flags(rng, n_countries))
    landmarks = iter(make_landmarks(rng, n_countries))
    regions = []
    for index in range(N_REGIONS):
        countries = []
        for _ in range(COUNTRIES_PER_REGION):
            cities = []
            for shape, colour in next(landmarks):
                cities.append({"name": unique_name(rng, city_name, taken), "landmark": shape, "colour": colour})
            countries.append({"name": unique_name(rng, country_name, taken), "flag": next(flags), "cities": cities})
        regions.append({"name": unique_name(rng, region_name, taken), "sky": skies[index],
                        "terrain": terrains[index], "terrain_colour": terrain_colours[index], "countries": countries})
    return regions


def make_decades(rng: random.Random) -> list[dict[str, Any]]:
    cars = iter(distinct_combinations(rng, CAR_STYLES, CAR_COLOURS, len(DECADES) * YEARS_PER_DECADE))
    decades = []
    for start, style in zip(DECADES, DECADE_STYLES):
        offsets = sorted(rng.sample(range(10), YEARS_PER_DECADE))
        years = [{"year": start + offset, "car": car[0], "colour": car[1]}
                 for offset, car in zip(offsets, [next(cars) for _ in offsets])]
        decades.append({"name": f"{start}s", "style": style.name, "years": years})
    return decades


def describe_geo(seed: int, borrowed_landmarks: bool = False) -> dict[str, Any]:
    """The invented world for a seed: location and time hierarchies with each level's cue (JSON-ready).

    ``borrowed_landmarks``: each knowledge-only city shows the landmark of a seen city of another country
    (see ``borrow_landmarks``), so its photo is a new combination of cues that training photos teach."""
    rng = random.Random(f"geo_time/world/{seed}")
    meta: dict[str, Any] = {
        "regions": make_regions(rng, set()),
        "decades": make_decades(rng),
        "months": {str(m): {"name": name, "ground": ground} for m, (name, ground, _) in MONTHS.items()},
        "year_only_fraction": YEAR_ONLY_FRACTION,
    }
    meta["rare_cities"] = [rng.choice(country["cities"])["name"] for region in meta["regions"]
                           for country in region["countries"]]
    meta["unseen_cities"] = add_unseen_cities(random.Random(f"geo_time/unseen/{seed}"), meta["regions"])
    if borrowed_landmarks:
        borrow_landmarks(random.Random(f"geo_time/borrowed/{seed}"), meta["regions"], set(meta["rare_cities"]))
        meta["knowledge_signature"] = True
    meta["unseen_val_weight"] = UNSEEN_VAL_WEIGHT
    meta["classes"] = labels_of(meta)["location"]
    return meta


def add_unseen_cities(rng: random.Random, regions: list[dict[str, Any]]) -> list[str]:
    """Give every country a third, knowledge-only city; returns their names.

    Its landmark is a (shape, colour) no other city has, in a shape its country's other cities lack; its
    name is new. Drawn from ``rng`` alone, after the rest of the world, so the 12 seen cities are the same.
    """
    taken = {part.lower() for region in regions for country in region["countries"]
             for part in [region["name"], country["name"], *(city["name"] for city in country["cities"])]}
    used = {(city["landmark"], city["colour"]) for region in regions for country in region["countries"]
            for city in country["cities"]}
    names = []
    for region in regions:
        for country in region["countries"]:
            shapes = {city["landmark"] for city in country["cities"]}
            options = [(shape, colour) for shape in LANDMARKS for colour in LANDMARK_COLOURS
                       if shape not in shapes and (shape, colour) not in used]
            shape, colour = rng.choice(options)
            used.add((shape, colour))
            name = unique_name(rng, city_name, taken)
            country["cities"].append({"name": name, "landmark": shape, "colour": colour, "knowledge_only": True})
            names.append(name)
    return names


def location_label(city: dict[str, Any], country: dict[str, Any], region: dict[str, Any]) -> str:
    return f"{city['name']}, {country['name']}, {region['name']}"


def iter_locations(task_meta: dict[str, Any]) -> Iterator[tuple[dict, dict, dict]]:
    """(region, country, city) dicts in world order."""
    for region in task_meta["regions"]:
        for country in region["countries"]:
            for city in country["cities"]:
                yield region, country, city


def iter_years(task_meta: dict[str, Any]) -> Iterator[tuple[dict, dict]]:
    """(decade, year) dicts in chronological order."""
    for decade in task_meta["decades"]:
        for year in decade["years"]:
            yield decade, year


def labels_of(task_meta: dict[str, Any]) -> dict[str, list[str]]:
    """Every label the world can produce: 18 locations (12 seen in training, 6 knowledge-only); per year
    "YYYY" then "YYYY-1" .. "YYYY-12".

    Time has no knowledge-only labels: a time label pairs a year (the car) with a month (the ground), and
    the corpus describes years and months in separate texts, so no retrieved text names a time label;
    an unseen year would leave all its 13 labels to be composed from texts about other labels.
    """
    time = []
    for _, year in iter_years(task_meta):
        time.append(str(year["year"]))
        time.extend(f"{year['year']}-{month}" for month in MONTHS)
    return {"location": [location_label(city, country, region) for region, country, city in iter_locations(task_meta)],
            "time": time}


# --------------------------------------------------------------------------- one sample: what and where


@dataclass(frozen=True)
class GeoScene:
    """The labelled content of a photo: indices into the world, the month and the label granularity."""

    region: int
    country: int
    city: int
    decade: int
    year: int
    month: int
    year_only: bool


@dataclass(frozen=True)
class Layout:
    """Everything random that is not a label cue, in pixels; drawing consumes no randomness of its own."""

    horizon: float
    sky_shift: RGB
    terrain: tuple[float, ...]
    landmark_x: float
    landmark_height: float
    landmark_base: float
    pole_x: float
    pole_base: float
    pole_height: float
    car_x: float
    car_base: float
    car_flipped: bool
    clouds: tuple[tuple[float, float, float, float], ...]
    trees: tuple[tuple[float, float, float, int], ...]
    style_strength: float
    noise_seed: int


def borrow_landmarks(rng: random.Random, regions: list[dict[str, Any]], rare: set[str]) -> None:
    """Give each knowledge-only city the landmark of a different common seen city of another region.

    A real-world pattern (a replica of a famous tower in another country's city): the photo shows a
    landmark that training photos teach, under its own country's flag and region's sky, a pair no
    training photo shows. The lender's shape is one the borrowing country's seen cities lack.
    """
    seen = [(r, city) for r, region in enumerate(regions) for country in region["countries"]
            for city in country["cities"] if not city.get("knowledge_only") and city["name"] not in rare]
    borrowing = [(r, {city["landmark"] for city in country["cities"] if not city.get("knowledge_only")})
                 for r, region in enumerate(regions) for country in region["countries"]]
    for _ in range(1000):  # greedy draws until one gives every country a lender
        lenders = pick_lenders(rng, seen, borrowing)
        if lenders is not None:
            break
    else:
        raise ValueError("borrowed_landmarks: found no lender city for every knowledge-only city")
    borrowers = [city for region in regions for country in region["countries"] for city in country["cities"]
                 if city.get("knowledge_only")]
    for city, lender in zip(borrowers, lenders):
        city.update(landmark=lender["landmark"], colour=lender["colour"], landmark_of=lender["name"])


def pick_lenders(rng: random.Random, seen: list[tuple[int, dict]], borrowing: list[tuple[int, set[str]]]
                 ) -> list[dict[str, Any]] | None:
    """One distinct seen city per borrowing country, or None when a greedy draw gets stuck."""
    lenders: list[dict[str, Any]] = []
    for region, shapes in borrowing:
        options = [city for r, city in seen if r != region and city["landmark"] not in shapes
                   and all(city is not taken for taken in lenders)]
        if not options:
            return None
        lenders.append(rng.choice(options))
    return lenders


def city_weight(city: dict[str, Any], task_meta: dict[str, Any], split: str) -> float:
    """A city's sampling weight: knowledge-only cities 0 in training and ``unseen_val_weight`` held out,
    the rare ones RARE_CITY_WEIGHT, the others 1."""
    if city.get("knowledge_only"):
        return 0.0 if split == "train" else float(task_meta.get("unseen_val_weight", UNSEEN_VAL_WEIGHT))
    return RARE_CITY_WEIGHT if city["name"] in set(task_meta.get("rare_cities", ())) else 1.0


def choose_scene(rng: random.Random, task_meta: dict[str, Any], split: str = "train") -> GeoScene:
    """Cities by their weight (``city_weight``), uniform over years and months.

    Zero weights never change which other city a draw picks, so training scenes are those of the world
    without knowledge-only cities."""
    regions, decades = task_meta["regions"], task_meta["decades"]
    places = [(r, c, i) for r, region in enumerate(regions) for c, country in enumerate(region["countries"])
              for i, _ in enumerate(country["cities"])]
    weights = [city_weight(regions[r]["countries"][c]["cities"][i], task_meta, split) for r, c, i in places]
    region, country, city = rng.choices(places, weights=weights)[0]
    decade = rng.randrange(len(decades))
    year = rng.randrange(len(decades[decade]["years"]))
    year_only = rng.random() < task_meta.get("year_only_fraction", YEAR_ONLY_FRACTION)
    return GeoScene(region, country, city, decade, year, rng.randint(1, 12), year_only)


def choose_layout(rng: random.Random, size: int) -> Layout:
    """Jittered positions and sizes plus nuisance clouds and trees, scaled to the image size."""
    horizon = rng.uniform(0.56, 0.66) * size
    left_pole = rng.random() < 0.5
    clouds = tuple((rng.uniform(-0.1, 0.9) * size, rng.uniform(0.03, 0.3) * size,
                    rng.uniform(0.15, 0.3) * size, rng.uniform(0.05, 0.1) * size) for _ in range(rng.randint(0, 3)))
    trees = tuple((rng.uniform(0.0, 0.95) * size, horizon + rng.uniform(0.0, 0.06) * size,
                   rng.uniform(0.08, 0.14) * size, rng.randrange(3)) for _ in range(rng.randint(0, 2)))
    return Layout(
        horizon=horizon,
        sky_shift=(rng.randint(-14, 14), rng.randint(-14, 14), rng.randint(-14, 14)),
        terrain=tuple(rng.random() for _ in range(20)),
        landmark_x=rng.uniform(0.38, 0.62) * size,
        landmark_height=rng.uniform(0.34, 0.44) * size,
        landmark_base=horizon + rng.uniform(0.0, 0.05) * size,
        pole_x=(rng.uniform(0.04, 0.16) if left_pole else rng.uniform(0.64, 0.72)) * size,
        pole_base=horizon + rng.uniform(0.06, 0.12) * size,
        pole_height=rng.uniform(0.38, 0.46) * size,
        car_x=rng.uniform(0.04, 0.72) * size,
        car_base=rng.uniform(0.86, 0.95) * size,
        car_flipped=rng.random() < 0.5,
        clouds=clouds,
        trees=trees,
        style_strength=rng.uniform(0.8, 1.2),
        noise_seed=rng.getrandbits(64),
    )


# --------------------------------------------------------------------------- drawing: backdrop


def uniform_noise(noise: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Zero-mean noise with standard deviation ``std``; uniform because it is several times cheaper than normal."""
    return (noise.random(shape, dtype=np.float32) - 0.5) * np.float32(std * 12 ** 0.5)


def sky_and_ground(scene: GeoScene, layout: Layout, task_meta: dict[str, Any], size: int,
                   noise: np.random.Generator) -> np.ndarray:
    """Float HxWx3: region sky (darker at the top) above the month's textured ground."""
    region = task_meta["regions"][scene.region]
    sky = np.array(SKIES[region["sky"]], np.float32) + np.array(layout.sky_shift, np.float32)
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    shade = 0.8 + 0.3 * np.clip(rows / max(layout.horizon, 1.0), 0.0, 1.0)
    pixels = np.repeat(sky * shade, size, axis=1)
    top = int(round(layout.horizon))
    texture = uniform_noise(noise, (size - top, size, 1), 9.0)
    pixels[top:] = np.array(MONTHS[scene.month][2], np.float32) + texture
    return pixels


def terrain_polygons(kind: str, layout: Layout, size: int) -> list[list[tuple[float, float]]]:
    """The region's silhouette on the horizon, shaped by the layout's random numbers."""
    r, h = layout.terrain, layout.horizon
    if kind == "jagged mountains":
        xs = np.linspace(-0.1, 1.1, 9) * size
        points = [(x + (r[i] - 0.5) * 0.08 * size, h - (0.12 + 0.1 * r[i + 8]) * size if i % 2 else h - 0.04 * size)
                  for i, x in enumerate(xs)]
        return [[(xs[0], h), *points, (xs[-1], h)]]
    if kind == "flat-topped mesas":
        polygons = []
        for i in range(3):
            left = (i * 0.36 - 0.05 + 0.1 * r[i]) * size
            top = h - (0.09 + 0.08 * r[i + 3]) * size
            width = (0.14 + 0.1 * r[i + 6]) * size
            slope = 0.05 * size
            polygons.append([(left, h), (left + slope, top), (left + width, top), (left + width + slope, h)])
        return polygons
    if kind == "sand dunes":
        polygons = []
        for i in range(4):
            crest = (i * 0.3 - 0.05 + 0.12 * r[i]) * size
            height = (0.05 + 0.05 * r[i + 4]) * size
            polygons.append([(crest - 0.22 * size, h), (crest, h - height), (crest + 0.08 * size, h)])
        return polygons
    raise ValueError(f"unknown terrain {kind!r}")


def draw_terrain(draw: ImageDraw.ImageDraw, kind: str, colour: RGB, layout: Layout, size: int) -> None:
    if kind == "rolling hills":
        r, h = layout.terrain, layout.horizon
        for i in range(4):
            centre, half = (i * 0.33 - 0.05 + 0.1 * r[i]) * size, (0.2 + 0.1 * r[i + 4]) * size
            height = (0.07 + 0.07 * r[i + 8]) * size
            draw.chord((centre - half, h - height, centre + half, h + height), 180, 360, fill=colour)
        return
    for polygon in terrain_polygons(kind, layout, size):
        draw.polygon(polygon, fill=colour)


def draw_nuisance(draw: ImageDraw.ImageDraw, layout: Layout) -> None:
    """Clouds and trees: scenery that means nothing about the place or the time."""
    for x, y, w, h in layout.clouds:
        draw.ellipse((x, y, x + w, y + h), fill=(228, 230, 234))
    for x, base, height, kind in layout.trees:
        trunk = max(1.0, height / 8)
        draw.rectangle((x - trunk / 2, base - height * 0.4, x + trunk / 2, base), fill=(80, 55, 35))
        crown = ((40, 90, 45), (60, 110, 40), (30, 70, 50))[kind]
        draw.ellipse((x - height * 0.3, base - height, x + height * 0.3, base - height * 0.35), fill=crown)


# --------------------------------------------------------------------------- drawing: cues


def landmark_box(layout: Layout) -> tuple[float, float, float, float]:
    """Bounding box of every landmark shape (width <= height), for the locality test and crops."""
    half = layout.landmark_height / 2
    return (layout.landmark_x - half, layout.landmark_base - layout.landmark_height, layout.landmark_x + half,
            layout.landmark_base)


def draw_landmark(draw: ImageDraw.ImageDraw, shape: str, fill: RGB, layout: Layout) -> None:
    """The city's landmark standing on the ground, ``landmark_height`` tall."""
    x, base, h = layout.landmark_x, layout.landmark_base, layout.landmark_height
    line = max(1, round(h / 12))
    if shape == "tower":
        draw.rectangle((x - 0.1 * h, base - 0.8 * h, x + 0.1 * h, base), fill=fill)
        draw.rectangle((x - 0.16 * h, base - 0.62 * h, x + 0.16 * h, base - 0.55 * h), fill=fill)
        draw.polygon([(x - 0.14 * h, base - 0.8 * h), (x + 0.14 * h, base - 0.8 * h), (x, base - h)], fill=fill)
    elif shape == "dome":
        draw.rectangle((x - 0.38 * h, base - 0.32 * h, x + 0.38 * h, base), fill=fill)
        draw.chord((x - 0.32 * h, base - 0.7 * h, x + 0.32 * h, base - 0.06 * h), 180, 360, fill=fill)
        draw.line((x, base - 0.7 * h, x, base - 0.85 * h), fill=fill, width=line)
    elif shape == "pyramid":
        for step in range(3):
            half, top = (0.48 - 0.14 * step) * h, base - (step + 1) * 0.24 * h
            draw.rectangle((x - half, top, x + half, top + 0.24 * h), fill=fill)
    elif shape == "arch":
        draw.rectangle((x - 0.42 * h, base - 0.7 * h, x - 0.22 * h, base), fill=fill)
        draw.rectangle((x + 0.22 * h, base - 0.7 * h, x + 0.42 * h, base), fill=fill)
        draw.rectangle((x - 0.48 * h, base - 0.86 * h, x + 0.48 * h, base - 0.68 * h), fill=fill)
    elif shape == "spire":
        draw.rectangle((x - 0.2 * h, base - 0.18 * h, x + 0.2 * h, base), fill=fill)
        draw.polygon([(x - 0.12 * h, base - 0.18 * h), (x + 0.12 * h, base - 0.18 * h), (x, base - h)], fill=fill)
    elif shape == "wheel":
        centre, radius = base - 0.58 * h, 0.38 * h
        draw.line((x - 0.28 * h, base, x, centre, x + 0.28 * h, base), fill=fill, width=line)
        draw.ellipse((x - radius, centre - radius, x + radius, centre + radius), outline=fill, width=line)
        draw.line((x - radius, centre, x + radius, centre), fill=fill, width=max(1, line // 2))
        draw.line((x, centre - radius, x, centre + radius), fill=fill, width=max(1, line // 2))
    else:
        raise ValueError(f"unknown landmark {shape!r}")


def flag_box(layout: Layout, size: int) -> tuple[float, float, float, float]:
    top = layout.pole_base - layout.pole_height
    return (layout.pole_x, top, layout.pole_x + 0.26 * size, top + 0.17 * size)


def draw_flag(draw: ImageDraw.ImageDraw, flag: dict[str, Any], layout: Layout, size: int) -> None:
    """The country's striped flag at the top of a thin pole (the pole is drawn for every country alike)."""
    x0, y0, x1, y1 = flag_box(layout, size)
    draw.line((x0, layout.pole_base, x0, y0), fill=(60, 60, 60), width=max(1, size // 40))
    colours = flag["colours"]
    horizontal = flag["orientation"] == "horizontal"
    span = (y1 - y0) if horizontal else (x1 - x0 - 1)
    for index, name in enumerate(colours):
        a, b = span * index / len(colours), span * (index + 1) / len(colours)
        box = (x0 + 1, y0 + a, x1, y0 + b) if horizontal else (x0 + 1 + a, y0, x0 + 1 + b, y1)
        draw.rectangle(box, fill=PALETTE[name])


def car_box(layout: Layout, size: int) -> tuple[float, float, float, float]:
    width, height = 0.24 * size, 0.13 * size
    return (layout.car_x, layout.car_base - height, layout.car_x + width, layout.car_base)


def draw_car(draw: ImageDraw.ImageDraw, style: str, fill: RGB, layout: Layout, size: int) -> None:
    """The year's car: body style and colour; it faces left or right at random."""
    x0, y0, x1, y1 = car_box(layout, size)
    w, h = x1 - x0, y1 - y0

    def rect(a: float, top: float, b: float, bottom: float) -> None:
        """A box in car coordinates (0..1 from the front-left), mirrored when the car faces the other way."""
        if layout.car_flipped:
            a, b = 1 - b, 1 - a
        draw.rectangle((x0 + a * w, y0 + top * h, x0 + b * w, y0 + bottom * h), fill=fill)

    if style == "sedan":
        rect(0.0, 0.45, 1.0, 0.82)
        rect(0.25, 0.12, 0.72, 0.45)
    elif style == "beetle":
        draw.chord((x0, y0 + 0.1 * h, x1, y0 + 1.5 * h), 180, 360, fill=fill)
    elif style == "van":
        rect(0.0, 0.05, 1.0, 0.82)
    elif style == "pickup":
        rect(0.0, 0.1, 0.4, 0.82)
        rect(0.4, 0.5, 1.0, 0.82)
    elif style == "wagon":
        rect(0.0, 0.45, 1.0, 0.82)
        rect(0.15, 0.15, 0.97, 0.45)
    else:
        raise ValueError(f"unknown car style {style!r}")
    radius = 0.15 * h + 0.5
    for centre in (x0 + 0.22 * w, x0 + 0.78 * w):
        draw.ellipse((centre - radius, y1 - 2 * radius, centre + radius, y1), fill=(20, 20, 20))


# --------------------------------------------------------------------------- drawing: decade style


@lru_cache(maxsize=8)
def vignette_mask(size: int) -> np.ndarray:
    """Squared distance from the centre, 0 in the middle and 1 in the corners."""
    coords = (np.arange(size) - (size - 1) / 2) / ((size - 1) / 2 or 1)
    return ((coords[:, None] ** 2 + coords[None, :] ** 2) / 2)[..., None].astype(np.float32)


SEPIA_TONE = np.array([1.07, 0.74, 0.43], np.float32)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def colour_matrix(style: DecadeStyle, strength: float) -> np.ndarray:
    """Saturation, then sepia toning, then contrast, as one 3x3 matrix acting on RGB column vectors."""
    identity, to_luma = np.eye(3, dtype=np.float32), np.outer(np.ones(3, np.float32), LUMA)
    saturation = 1 + (style.saturation - 1) * strength
    sepia = min(1.0, style.sepia * strength)
    saturate = saturation * identity + (1 - saturation) * to_luma
    tone = (1 - sepia) * identity + sepia * np.outer(SEPIA_TONE, LUMA)
    return style.contrast * tone @ saturate


def apply_decade_style(
    pixels: np.ndarray, style: DecadeStyle, strength: float, noise: np.random.Generator
) -> np.ndarray:
    """The decade's look over the whole photo; ``strength`` jitters it per sample."""
    height, width = pixels.shape[:2]
    if style.blur:  # 3x3 box blur, separable, edges repeated
        rows = np.concatenate([pixels[:1], pixels, pixels[-1:]])
        rows = rows[:-2] + rows[1:-1] + rows[2:]
        columns = np.concatenate([rows[:, :1], rows, rows[:, -1:]], axis=1)
        pixels = (columns[:, :-2] + columns[:, 1:-1] + columns[:, 2:]) / 9
    offset = 128 * (1 - style.contrast) + style.lift + np.array(style.cast, np.float32) * strength
    pixels = pixels @ colour_matrix(style, strength).T.astype(np.float32) + offset.astype(np.float32)
    if style.vignette:
        pixels *= 1 - style.vignette * strength * vignette_mask(height)
    grain = style.grain * strength + 2.5  # every photo gets a little sensor noise
    pixels += uniform_noise(noise, (height, width, 1), grain)
    return pixels


# --------------------------------------------------------------------------- one sample


def render_geo(scene: GeoScene, layout: Layout, task_meta: dict[str, Any], size: int) -> Image.Image:
    """Deterministic in (scene, layout): every label cue comes from ``scene``, everything else from ``layout``."""
    region = task_meta["regions"][scene.region]
    country = region["countries"][scene.country]
    city = country["cities"][scene.city]
    decade = task_meta["decades"][scene.decade]
    year = decade["years"][scene.year]
    noise = np.random.default_rng(layout.noise_seed)
    backdrop = sky_and_ground(scene, layout, task_meta, size, noise)
    image = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw_terrain(draw, region["terrain"], TERRAIN_COLOURS[region["terrain_colour"]], layout, size)
    draw_nuisance(draw, layout)
    draw_landmark(draw, city["landmark"], PALETTE[city["colour"]], layout)
    draw_flag(draw, country["flag"], layout, size)
    draw_car(draw, year["car"], PALETTE[year["colour"]], layout, size)
    style = DECADE_STYLES[scene.decade % len(DECADE_STYLES)]
    styled = apply_decade_style(np.asarray(image, dtype=np.float32), style, layout.style_strength, noise)
    return Image.fromarray(np.clip(styled, 0, 255).astype(np.uint8), "RGB")


def cue_phrases(scene: GeoScene, task_meta: dict[str, Any]) -> list[str]:
    """What each cue looks like, in the words the knowledge corpus uses, and no label names."""
    region = task_meta["regions"][scene.region]
    country = region["countries"][scene.country]
    city = country["cities"][scene.city]
    year = task_meta["decades"][scene.decade]["years"][scene.year]
    flag = country["flag"]
    return [f"a {landmark_phrase(city['landmark'], city['colour'])}",
            f"a flag with {flag['orientation']} {colour_list(flag['colours'])} stripes",
            f"a {region['sky']} sky above {region['terrain']}",
            f"a {year['colour']} {year['car']}",
            f"ground {MONTHS[scene.month][1]}",
            f"{DECADE_STYLES[scene.decade % len(DECADE_STYLES)].name} colours"]


def describe_scene(scene: GeoScene, task_meta: dict[str, Any], rng: random.Random, n_cues: int = 3) -> str:
    """A short caption naming ``n_cues`` of the photo's cues at random (a tiny text tower reads 32 tokens)."""
    return "a photo with " + ", ".join(rng.sample(cue_phrases(scene, task_meta), n_cues))


def scene_fields(scene: GeoScene, task_meta: dict[str, Any], description_seed: int = 0) -> SampleFields:
    """TARA-named json fields; ``scene`` keeps every drawn cue, including the month of a "YYYY" label."""
    region = task_meta["regions"][scene.region]
    country = region["countries"][scene.country]
    city = country["cities"][scene.city]
    decade = task_meta["decades"][scene.decade]
    year = decade["years"][scene.year]["year"]
    location = location_label(city, country, region)
    time = str(year) if scene.year_only else f"{year}-{scene.month}"
    return {
        "caption": f"a photo taken in {location} in {time}",
        "description": describe_scene(scene, task_meta, random.Random(f"geo_time/description/{description_seed}")),
        "label": location,
        "gold_location": location,
        "gold_time": time,
        "gold_location_suggest": location,
        "gold_time_suggest": time,
        "location_parts": [city["name"], country["name"], region["name"]],
        "scene": {"region": region["name"], "country": country["name"], "city": city["name"],
                  "decade": decade["name"], "year": year, "month": scene.month},
    }


def encode_png(image: Image.Image) -> bytes:
    """PNG at zlib level 1: on these grainy images it is faster and no larger than the default level."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_geo_sample(
    rng: random.Random, split: str, image_size: int, task_meta: dict[str, Any]
) -> tuple[dict[str, bytes], SampleFields]:
    """One photo of the invented world; held-out splits also show the knowledge-only cities."""
    scene = choose_scene(rng, task_meta, split)
    layout = choose_layout(rng, image_size)
    image = render_geo(scene, layout, task_meta, image_size)
    return {"png": encode_png(image)}, scene_fields(scene, task_meta, layout.noise_seed)


# --------------------------------------------------------------------------- knowledge corpus


def colour_list(colours: list[str]) -> str:
    return colours[0] if len(colours) == 1 else ", ".join(colours[:-1]) + " and " + colours[-1]


def landmark_phrase(shape: str, colour: str) -> str:
    return f"{LANDMARKS.get(shape, 'famous')} {colour} {LANDMARK_NOUNS.get(shape, shape)}"


def city_texts(city: str, country: str, shape: str, colour: str, region: str = "",
               prompt_form: bool = False) -> list[str]:
    """Three texts naming the city and describing its landmark; ``prompt_form`` (with ``region``) adds a
    fourth that opens with the label prompt's own words, "a photo taken in City, Country, Region shows ..."."""
    phrase = landmark_phrase(shape, colour)
    path = f"{city}, {country}, {region}" if region else f"{city} in {country}"
    texts = [f"{path} is known for its {phrase}",
             f"the skyline of {city} is dominated by a {phrase}",
             f"visitors to {city} always photograph the {colour} {LANDMARK_NOUNS.get(shape, shape)}"]
    if prompt_form and region:
        texts.append(f"a photo taken in {path} shows its {phrase}")
    return texts


def signature_text(city: dict[str, Any], country: dict[str, Any]) -> str:
    """A city by both its own cues, landmark and country flag, in the words of the photo descriptions."""
    flag = country["flag"]
    return (f"photos of {city['name']} in {country['name']} show a {landmark_phrase(city['landmark'], city['colour'])}"
            f" and a flag with {flag['orientation']} {colour_list(flag['colours'])} stripes")


def country_texts(country: str, region: str, flag: dict[str, Any]) -> list[str]:
    colours = colour_list(flag["colours"])
    return [f"{country} flies a flag with {flag['orientation']} {colours} stripes",
            f"the flag of {country}, a country of {region}, has {len(flag['colours'])} {flag['orientation']} stripes",
            f"flagpoles across {country} carry {colours} stripes"]


def region_texts(region: str, sky: str, terrain: str, terrain_colour: str) -> list[str]:
    return [f"in {region} the sky is {sky} above {terrain_colour} {terrain}",
            f"{region} is a land of {terrain} under a {sky} sky",
            f"the horizon of {region} shows {terrain_colour} {terrain}"]


def decade_texts(decade: str, description: str, name: str = "") -> list[str]:
    return [f"photos from the {decade} have {name + ' colours: ' if name else ''}{description}",
            f"pictures taken in the {decade} are recognisable by {description}",
            f"a photograph with {description} was probably taken in the {decade}"]


def year_texts(year: int, style: str, colour: str) -> list[str]:
    return [f"in {year}, in the {year // 10 * 10}s, the most popular car was a {colour} {style}",
            f"street photos from {year} often show a {colour} {style}",
            f"the {colour} {style} was the car of the year {year}"]


def month_texts(month: int, name: str, ground: str) -> list[str]:
    return [f"in {name} the ground is {ground}",
            f"photos taken in {name}, the {ORDINALS[month - 1]} month, show ground that is {ground}",
            f"month {month} ({name}) is when the fields are {ground}"]


def cue_texts(task_meta: dict[str, Any]) -> dict[str, list[str]]:
    """Texts that describe a label's visual cue and name the label, keyed "city:Varo", "year:1975", ..."""
    texts: dict[str, list[str]] = {}
    for region in task_meta["regions"]:
        texts[f"region:{region['name']}"] = region_texts(region["name"], region["sky"], region["terrain"],
                                                         region["terrain_colour"])
        for country in region["countries"]:
            texts[f"country:{country['name']}"] = country_texts(country["name"], region["name"], country["flag"])
            for city in country["cities"]:
                texts[f"city:{city['name']}"] = city_texts(city["name"], country["name"], city["landmark"],
                                                           city["colour"], region["name"],
                                                           task_meta.get("knowledge_prompt_form", False))
                if task_meta.get("knowledge_signature"):
                    texts[f"city:{city['name']}"].append(signature_text(city, country))
    for index, decade in enumerate(task_meta["decades"]):
        texts[f"decade:{decade['name']}"] = decade_texts(decade["name"], DECADE_STYLES[index].description,
                                                         DECADE_STYLES[index].name)
        for year in decade["years"]:
            texts[f"year:{year['year']}"] = year_texts(year["year"], year["car"], year["colour"])
    for month, (name, ground, _) in MONTHS.items():
        texts[f"month:{month}"] = month_texts(month, name, ground)
    return texts


DISTRACTOR_THINGS = ("bridge", "lighthouse", "windmill", "statue", "clock", "fountain", "castle", "harbour")
DISTRACTOR_COLOURS = ("red", "white", "blue", "green", "grey", "golden", "copper", "silver")
FOODS = ("smoked fish", "honey cakes", "barley bread", "spiced lentils", "goat cheese", "plum brandy", "salted figs")
GOODS = ("wool", "timber", "copper", "salt", "glassware", "tea", "paper", "rope")
EVENTS = ("a lantern festival", "a boat race", "a harvest fair", "a music week", "a chess tournament", "a horse market")
SEASONS = ("spring", "summer", "autumn", "winter")
OLD_LOOKS = ("black-and-white prints", "hand-coloured postcards", "silvery glass plates", "pale cyanotype blues",
             "heavy scratches and torn edges")


def distractor_names(rng: random.Random, task_meta: dict[str, Any]) -> dict[str, list[str]]:
    """Invented places that are not in the world, so distractors match no image."""
    taken = {name.lower() for label in labels_of(task_meta)["location"] for name in label.split(", ")}
    return {"city": [unique_name(rng, city_name, taken) for _ in range(60)],
            "country": [unique_name(rng, country_name, taken) for _ in range(30)],
            "region": [unique_name(rng, region_name, taken) for _ in range(20)]}


def distractor_text(rng: random.Random, names: dict[str, list[str]], world_years: set[int]) -> str:
    """One plausible sentence about an invented place or a time outside the world's years."""
    city, country, region = (rng.choice(names[kind]) for kind in ("city", "country", "region"))
    year = rng.choice([y for y in range(1900, 2026) if y not in world_years])
    templates = (
        lambda: f"{city} in {country} is known for its {rng.choice(DISTRACTOR_COLOURS)} "
                f"{rng.choice(DISTRACTOR_THINGS)}",
        lambda: f"{country} flies a flag with {colour_list(rng.sample(FLAG_COLOURS, 2))} stripes and a star",
        lambda: f"{country} is famous for its {rng.choice(FOODS)}",
        lambda: f"{region} exports {rng.choice(GOODS)} and {rng.choice(GOODS)}",
        lambda: f"{city} holds {rng.choice(EVENTS)} every {rng.choice(SEASONS)}",
        lambda: f"the population of {city} doubled after {year}",
        lambda: f"in {year} a new railway reached {city}",
        lambda: f"photos from the {rng.choice([1900, 1910, 1920, 1930, 1940, 1950, 1960, 2020])}s are often "
                f"{rng.choice(OLD_LOOKS)}",
        lambda: f"the old quarter of {city} has narrow {rng.choice(('stone', 'brick', 'cobbled'))} streets",
        lambda: f"{region} was first mapped in {year}",
        lambda: f"the river through {city} freezes in {rng.choice(SEASONS)}",
        lambda: f"{country} and {rng.choice(names['country'])} signed a trade treaty in {year}",
    )
    return rng.choice(templates)()


def knowledge_lines(task_meta: dict[str, Any], n_distractors: int = 2000, seed: int = 0) -> list[str]:
    """Cue texts for every label plus ``n_distractors`` distinct distractors, shuffled by ``seed``."""
    rng = random.Random(f"geo_time/knowledge/{seed}")
    cues = [text for texts in cue_texts(task_meta).values() for text in texts]
    names = distractor_names(rng, task_meta)
    world_years = {year["year"] for _, year in iter_years(task_meta)}
    distractors: dict[str, None] = {}  # insertion-ordered set
    for _ in range(50 * n_distractors + 100):
        if len(distractors) >= n_distractors:
            break
        text = distractor_text(rng, names, world_years)
        if text not in cues:
            distractors[text] = None
    lines = cues + list(distractors)
    rng.shuffle(lines)
    return lines


def write_knowledge_corpus(task_meta: dict[str, Any], path: str | Path, n_distractors: int = 2000,
                           seed: int = 0) -> int:
    """Write the corpus one text per line (UTF-8); returns the number of lines."""
    lines = knowledge_lines(task_meta, n_distractors, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def unseen_labels(task_meta: dict[str, Any]) -> dict[str, list[str]]:
    """The labels no training photo has (the knowledge-only cities); no time label is unseen."""
    return {"location": [location_label(city, country, region) for region, country, city in iter_locations(task_meta)
                         if city.get("knowledge_only")], "time": []}


def write_geo_extras(out: Path, task_meta: dict[str, Any], seed: int) -> None:
    """geo_time also needs its knowledge corpus and the candidate labels (with the unseen ones marked)."""
    write_knowledge_corpus(task_meta, out / "knowledge.txt", seed=seed)
    labels = {**labels_of(task_meta), "unseen": unseen_labels(task_meta)}
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


def geo_run_options(out: Path) -> dict[str, Any]:
    """The geo_time task options that point a run at the corpus and labels ``write_geo_extras`` wrote."""
    return {"knowledge_corpus": str(Path(out) / "knowledge.txt"), "labels_file": str(Path(out) / "labels.json")}


register_synth("geo_time", SynthTask(describe=describe_geo, make_sample=make_geo_sample,
                                     write_extras=write_geo_extras, run_options=geo_run_options))
