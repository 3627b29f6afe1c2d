"""Grad-CAM: on a model trained through the real launcher the heat sits on the object the text names."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from shards.synth import COLOURS, GRID_CELLS, POSITIONS, SHAPES, SceneObject, draw_scene
from conftest import _run, _train, _write_config
from training.retrieval.gradcam import grad_cam, load_run, mask_box, peak, tokens_to_maps

SIZE = 64  # synthetic image side; the tiny ViT sees it unchanged


@pytest.fixture(scope="module")
def vit_run(retrieval_shards, tmp_path_factory):
    """The tiny ViT after 120 steps (~1 min): enough for held-out R@1 far above chance."""
    tmp = tmp_path_factory.mktemp("cam_vit")
    raw = tiny_config(retrieval_shards, tmp / "run",
                      optim={"max_steps": 120, "micro_batch_size": 32, "warmup_steps": 10},
                      schedule={"log_every": 20}, eval={"max_samples": None, "batch_size": 200})
    # ~70 s alone on 2 cores; the long timeout only matters when other jobs share the cores
    proc = _run([sys.executable, "launch/train.py", "--config", str(_write_config(tmp, raw))], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def two_object_scenes(count: int, seed: int = 0):
    """(image, [(text, position), (text, position)]): two large objects of different colours in two cells."""
    rng = random.Random(seed)
    for index in range(count):
        positions = rng.sample(POSITIONS, 2)
        colours = rng.sample(list(COLOURS), 2)
        shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
        objects = [SceneObject(c, s, p, "large") for c, s, p in zip(colours, shapes, positions)]
        image = draw_scene(random.Random(index), objects, SIZE)
        yield image, [(f"a {o.colour} {o.shape}", o.position) for o in objects]


def cell_of(x: int, y: int) -> tuple[int, int]:
    return (x * 3 // SIZE, y * 3 // SIZE)


def cell_max(cam: np.ndarray, position: str) -> float:
    column, row = GRID_CELLS[position]
    lo = lambda i: round(i * SIZE / 3)  # noqa: E731
    return float(cam[lo(row):lo(row + 1), lo(column):lo(column + 1)].max())


def test_tokens_to_maps_drops_the_class_token_and_keeps_positions():
    grid = (2, 3)
    tokens = torch.arange(7 * 4, dtype=torch.float32).reshape(1, 7, 4)  # class token + 6 patches, 4 channels
    maps = tokens_to_maps(tokens, grid, batch_first=True)
    assert maps.shape == (1, 4, 2, 3)
    assert torch.equal(maps[0, :, 1, 2], tokens[0, 6])  # last patch = bottom right
    assert torch.equal(maps[0, :, 0, 0], tokens[0, 1])
    assert torch.equal(tokens_to_maps(tokens.transpose(0, 1), grid, batch_first=False), maps)


def test_mask_box_is_the_box_of_the_thresholded_map():
    cam = np.zeros((8, 8), np.float32)
    cam[2:4, 5:7] = 1.0
    cam[6, 1] = 0.2
    assert mask_box(cam, 0.3) == (5, 2, 6, 3)
    assert mask_box(cam, 0.1) == (1, 2, 6, 6)
    assert mask_box(np.zeros((4, 4)), 0.3) is None


def test_vit_heat_follows_the_named_object(vit_run):
    """For two objects and two texts, each text's heat is hotter on its own object: a map that ignores
    the text can satisfy at most one of the two, so 'both right' has chance 0 for it."""
    model, preprocess, tokenizer = load_run(vit_run)
    both_right, peak_on_named, scenes = 0, 0, 40
    for image, named in two_object_scenes(scenes):
        pixels = preprocess(image)
        right = []
        for (text, position), (_, other) in zip(named, named[::-1]):
            cam = grad_cam(model, pixels, tokenizer([text])[0]).cam
            assert cam.shape == (SIZE, SIZE) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
            right.append(cell_max(cam, position) > cell_max(cam, other))
            peak_on_named += cell_of(*peak(cam)) == GRID_CELLS[position]
        both_right += all(right)
    assert both_right / scenes >= 0.6, f"both texts localised in {both_right}/{scenes} scenes"
    assert peak_on_named / (2 * scenes) >= 0.5, f"peak on the named object {peak_on_named}/{2 * scenes}"


def test_cam_cli_writes_overlays_and_boxes(vit_run, retrieval_shards, tmp_path):
    image, named = next(two_object_scenes(1, seed=3))
    image.save(tmp_path / "scene.png")
    texts = [text for text, _ in named]
    out = tmp_path / "cams"
    proc = _run([sys.executable, "launch/cam.py", "--checkpoint", str(vit_run), "--images", str(tmp_path / "scene.png"),
                 "--texts", *texts, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("scene__*.png"))
    assert len(pngs) == 2 and [json.loads(line)["text"] for line in proc.stdout.splitlines()] == texts
    for png in pngs:
        assert Image.open(png).size == (256, 256)  # 64 px upscaled x4
        info = json.loads(png.with_suffix(".json").read_text())
        x0, y0, x1, y1 = info["box"]
        assert 0 <= x0 <= x1 < SIZE and 0 <= y0 <= y1 < SIZE
        assert x0 <= info["peak"][0] <= x1 and y0 <= info["peak"][1] <= y1
    proc = _run([sys.executable, "launch/cam.py", "--checkpoint", str(vit_run), "--images", str(tmp_path / "none.png"),
                 "--texts", "x", "--out", str(out)])
    assert proc.returncode == 2 and "none.png" in proc.stderr
    # --shards: the first samples of a shard set, each against every one of their captions
    proc = _run([sys.executable, "launch/cam.py", "--checkpoint", str(vit_run), "--shards",
                 str(retrieval_shards / "val"), "--count", "2", "--out", str(tmp_path / "from_shards")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    inputs = sorted((tmp_path / "from_shards" / "inputs").iterdir())
    assert len(inputs) == 2 and len(rows) == 4 and {r["image"] for r in rows} == {str(p) for p in inputs}
    assert all(Path(r["png"]).is_file() for r in rows)


def test_resnet_cam_end_to_end(retrieval_shards, tmp_path):
    """open_clip's ModifiedResNet (configs/models/tiny-rn.json) trains and gives a map on layer4's grid: a lit one
    (an untrained network's Grad-CAM can be all zero after the ReLU; such a map must fail this test)."""
    raw = tiny_config(retrieval_shards, tmp_path / "run", model={"name": "tiny-rn"},
                      optim={"max_steps": 40, "micro_batch_size": 32}, schedule={"log_every": 20})  # enough to have evidence
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, preprocess, tokenizer = load_run(tmp_path / "run")
    side = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    maps = []
    for image, named in two_object_scenes(3):
        for text, _ in named:
            result = grad_cam(model, preprocess(image), tokenizer([text])[0])
            assert result.grid.shape == (side // 32, side // 32) == (3, 3)
            assert result.cam.shape == (side, side) and np.isfinite(result.cam).all() and result.cam.min() >= 0
            maps.append((result.grid, result.cam))
    lit = [cam for grid, cam in maps if grid.any()]
    assert len(lit) >= len(maps) // 2, f"{len(maps) - len(lit)} of {len(maps)} maps are all zero"  # not a blank map
    assert all(cam.max() == pytest.approx(1.0) for cam in lit)  # scaled to [0, 1]
    assert len({grid.round(4).tobytes() for grid, _ in maps}) > 1  # the map depends on the image and the text
    image.save(tmp_path / "scene.png")
    proc = _run([sys.executable, "launch/cam.py", "--checkpoint", str(tmp_path / "run"), "--images",
                 str(tmp_path / "scene.png"), "--texts", named[0][0], "--out", str(tmp_path / "cams")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(next((tmp_path / "cams").glob("*.png"))).size == (288, 288)  # 96 px upscaled x3
