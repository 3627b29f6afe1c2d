"""Synthetic data for the "meme" task (CLIP4Meme): query -> meme retrieval.

Registers itself with ``shards.synth`` as "meme". A meme is a picture of two objects of the same size (colour + shape, the
retrieval palette) on a noisy gradient, plus:

- ``context``: a VLM-style caption of the picture ("a red circle at the top left next to a blue
  square"): it names the main object first and never the feeling;
- ``emotions``: the people's emotion words, as the emotions file gives them (``happy``, sometimes a
  second person who is ``calm``): they carry the feeling but never the object;
- ``caption`` (the query): ``"{reaction} about the {colour} {shape}"`` where the reaction phrase is
  fixed by the emotion ("pure joy" for happy) and never contains the emotion word itself.

So a query needs both the object (named first by the context; the pixels show two candidates) and
the emotion (only in the emotion words): the QC branch (query vs context) cannot tell the six feelings
apart, and the QI branch (image + emotion words + context tokens) sees the feeling but, from pixels,
not which of the two objects the meme is about. Compositional hold-out: for every (colour, shape) one emotion is never used in
training, so 1/6 of the queries of the val split never occur in training.

``write_meme_extras`` writes a tiny BERT (``bert-tiny/``: a small ``BertConfig`` with random weights and
a WordPiece vocabulary of the emotion words) next to the splits, loadable with
``BertModel.from_pretrained`` / ``BertTokenizerFast.from_pretrained`` exactly like ``bert-base-uncased``,
which is what real data should use (put it in that folder or name it in the config).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from shards import torchvision_compat
from shards.synth import SynthTask, register_synth
from shards.synth.scenes import COLOURS, SHAPES
from shards.synth.scenes import GRID_CELLS as POSITIONS  # position word -> (column, row) in a 3x3 grid
from shards.writer import encode_image

TASK = "meme"
# emotion word (as in the emotions file) -> the reaction phrase queries use for it
REACTIONS = {
    "happy": "pure joy",
    "sad": "feeling down",
    "angry": "so mad",
    "surprised": "total shock",
    "scared": "absolutely terrified",
    "bored": "so sleepy",
}
NEUTRAL_EMOTION = "calm"  # a second person's emotion word: present in the input, never in a query
SECOND_PERSON_PROBABILITY = 0.3
# The retrieval palette (every colour has a channel >= 200); meme backgrounds stay below 90.
SIZE_FRACTION = {"large": 0.85}  # of a grid cell
BERT_FOLDER = "bert-tiny"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


def query_text(emotion: str, colour: str, shape: str) -> str:
    return f"{REACTIONS[emotion]} about the {colour} {shape}"


def held_out_triples(seed: int) -> list[tuple[str, str, str]]:
    """One emotion per (colour, shape) never appears in training: 1/6 of all queries."""
    rng = random.Random(f"meme/held-out/{seed}")
    return [(rng.choice(sorted(REACTIONS)), colour, shape) for colour in COLOURS for shape in SHAPES]


def describe_meme(seed: int) -> dict[str, Any]:
    return {"emotions": sorted(REACTIONS), "held_out": [list(t) for t in held_out_triples(seed)]}


def draw_meme_triple(rng: random.Random, split: str, held_out: set[tuple[str, str, str]]) -> tuple[str, str, str]:
    while True:
        triple = (rng.choice(sorted(REACTIONS)), rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if split != "train" or triple not in held_out:
            return triple


@dataclass(frozen=True)
class MemeObject:
    colour: str
    shape: str
    position: str
    size: str


def meme_objects(rng: random.Random, colour: str, shape: str) -> list[MemeObject]:
    """The main object and a second one of another look, as large, in another cell.

    The pixels alone do not say which of the two the meme is about; the context names it first.
    """
    positions = rng.sample(sorted(POSITIONS), 2)
    others = [(c, s) for c in COLOURS for s in SHAPES if c != colour and s != shape]
    other_colour, other_shape = rng.choice(others)
    return [MemeObject(colour, shape, positions[0], "large"), MemeObject(other_colour, other_shape, positions[1], "large")]


def background(rng: random.Random, size: int) -> Image.Image:
    """A dark two-colour gradient with pixel noise, so no constant backdrop can be keyed on."""
    start = np.array([rng.randint(5, 80) for _ in range(3)], float)
    end = np.array([rng.randint(5, 80) for _ in range(3)], float)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None] * np.ones((1, size, 1))
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-10, 11, (size, size, 3))
    return Image.fromarray(np.clip(start + (end - start) * ramp + noise, 0, 255).astype(np.uint8), "RGB")


def draw_object(rng: random.Random, draw: ImageDraw.ImageDraw, obj: MemeObject, image_size: int) -> None:
    """The object inside its grid cell, jittered; its size is a share of the cell."""
    cell = image_size / 3
    extent = SIZE_FRACTION[obj.size] * cell
    column, row = POSITIONS[obj.position]
    x0, y0 = column * cell + rng.uniform(0, cell - extent), row * cell + rng.uniform(0, cell - extent)
    x1, y1, fill = x0 + extent, y0 + extent, COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        bar = extent / 3
        draw.rectangle((x0, y0 + bar, x1, y0 + 2 * bar), fill=fill)
        draw.rectangle((x0 + bar, y0, x0 + 2 * bar, y1), fill=fill)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def context_caption(rng: random.Random, objects: list[MemeObject]) -> str:
    """What a captioning model would say: the main object, where it is, and the other object."""
    main = objects[0]
    where = "in the center" if main.position == "center" else rng.choice(("at the {}", "in the {}")).format(main.position)
    text = f"{with_article(f'{main.colour} {main.shape}')} {where}"
    if len(objects) > 1:
        text += f" next to {with_article(f'{objects[1].colour} {objects[1].shape}')}"
    return text


def emotion_entries(rng: random.Random, emotion: str) -> list[dict[str, str]]:
    """The emotions file's per-meme list: person_1 carries the meme's feeling."""
    entries = [{"person_1": emotion}]
    if rng.random() < SECOND_PERSON_PROBABILITY:
        entries.append({"person_2": NEUTRAL_EMOTION})
    return entries


def make_meme_sample(
    rng: random.Random, split: str, image_size: int, task_meta: dict[str, Any]
) -> tuple[dict[str, bytes], dict[str, Any]]:
    held_out = {tuple(t) for t in task_meta["held_out"]}
    emotion, colour, shape = draw_meme_triple(rng, split, held_out)
    objects = meme_objects(rng, colour, shape)
    image = background(rng, image_size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(rng, draw, obj, image_size)
    entries = emotion_entries(rng, emotion)
    query = query_text(emotion, colour, shape)
    fields = {
        "caption": query,
        "label": query,
        "context": context_caption(rng, objects),
        "emotions": [word for entry in entries for word in entry.values()],
        "emotion": emotion,
        "held_out": (emotion, colour, shape) in held_out,
    }
    return {"jpg": encode_image(image, "jpg")}, fields


# --------------------------------------------------------------------------- the tiny BERT


def emotion_vocabulary() -> list[str]:
    """WordPiece vocabulary: special tokens, the emotion words, and single letters for anything else."""
    words = sorted({*REACTIONS, NEUTRAL_EMOTION})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return [*SPECIAL_TOKENS, *words, *letters, *(f"##{letter}" for letter in letters)]


def write_tiny_bert(folder: str | Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """A randomly initialised tiny BERT + WordPiece tokenizer, saved like any Hugging Face BERT folder.

    transformers is imported here, not at module level: it takes seconds to import (and pulls in
    torchvision, hence the compatibility shim first), and only the meme task needs it.
    """
    import torch

    torchvision_compat.install()
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = words or emotion_vocabulary()
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), **TINY_BERT)).save_pretrained(str(folder))
    return folder


def write_meme_extras(out: Path, task_meta: dict[str, Any], seed: int) -> None:
    """The tiny BERT that configs/meme_tiny.yaml names (real data: bert-base-uncased instead)."""
    write_tiny_bert(out / BERT_FOLDER, seed=seed)


def meme_run_options(out: Path) -> dict[str, Any]:
    """The meme task option that points a run at the tiny BERT ``write_meme_extras`` wrote."""
    return {"bert": str(Path(out) / BERT_FOLDER)}


register_synth("meme", SynthTask(describe=describe_meme, make_sample=make_meme_sample,
                                 write_extras=write_meme_extras, run_options=meme_run_options))
