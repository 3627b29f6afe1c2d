"""contextual (ImageCoDe): the accuracy metric, the ImageCoDe converter, the synthetic sets, multi-image shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from shards.convert import main as convert_main
from shards.reader import make_eval_loader
from shards.synth import generate
from shards.synth.contextual import COLOURS
from training.tasks.contextual import contextual_accuracy


# --------------------------------------------------------------------------- metric


def test_accuracy_overall_video_static_on_hand_made_scores():
    scores = torch.zeros(5, 10)
    for row, best in enumerate([3, 0, 9, 2, 5]):
        scores[row, best] = 1.0
    targets = torch.tensor([3, 1, 9, 2, 4])  # rows 0, 2, 3 right
    static = torch.tensor([False, False, True, True, True])
    out = contextual_accuracy(scores, targets, static)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy_video"] == pytest.approx(1 / 2)
    assert out["accuracy_static"] == pytest.approx(2 / 3)
    assert out["accuracy_chance"] == pytest.approx(0.1)
    assert (out["num_video"], out["num_static"]) == (2, 3)


def test_accuracy_ties_take_the_first_and_empty_subsets_are_left_out():
    scores = torch.zeros(2, 10)  # all tied: argmax is index 0
    out = contextual_accuracy(scores, torch.tensor([0, 4]), torch.tensor([False, False]))
    assert out["accuracy"] == 0.5 and out["accuracy_video"] == 0.5
    assert "accuracy_static" not in out
    with pytest.raises(ValueError, match="scores"):
        contextual_accuracy(torch.zeros(3, 10), torch.tensor([0, 1]), torch.tensor([False, True]))


# --------------------------------------------------------------------------- converter


def _write_set(root: Path, name: str, frames: list[int], corrupt: int | None = None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for frame in frames:
        path = folder / f"img{frame}.jpg"
        Image.new("RGB", (16, 16), (frame * 20 % 256, 60, 90)).save(path, format="JPEG")
        if frame == corrupt:
            path.write_bytes(path.read_bytes()[:40])
    (folder / "notes.txt").write_text("not an image")  # ignored: not img<frame>.jpg


def test_imagecode_converter_orders_frames_and_counts_every_skip(tmp_path):
    images = tmp_path / "image-sets"
    video_frames = [0, 2, 5, 9, 10, 14, 21, 33, 100, 101]  # img10 must come after img9, not after img1
    _write_set(images, "video-clip-a", video_frames)
    _write_set(images, "open-images-123_b", list(range(10)))
    _write_set(images, "video-short", list(range(9)))  # 9 images
    _write_set(images, "video-corrupt", list(range(10)), corrupt=4)
    _write_set(images, "video-bad-index", list(range(10)))
    descriptions = {
        "video-clip-a": {"4": "the man raises his hand", "0": "first frame", "10": "out of range"},
        "open-images-123_b": {"7": "the dog looks left", "x": "not a number", "3": ""},
        "video-short": {"1": "nine frames only"},
        "video-missing": {"2": "no folder", "3": "no folder either"},
        "video-corrupt": {"5": "a corrupt frame"},
        "video-bad-index": {"-1": "negative"},
        "video-not-object": ["a list"],
    }
    file = tmp_path / "train_data.json"
    file.write_text(json.dumps(descriptions))
    out = tmp_path / "shards"
    summary = convert_main(["imagecode", "--descriptions", str(file), "--images", str(images), "--out", str(out),
                            "--shard-size", "2"])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["read"] == 12 and summary["written"] == 3
    assert summary["skipped"] == {"bad_set": 1, "corrupt_image": 1, "index_out_of_range": 3, "missing_description": 1,
                                  "missing_folder": 2, "not_10_images": 1}
    assert summary["sets"] == {"read": 7, "written": 2, "skipped": {
        "bad_set": 1, "corrupt_image": 1, "index_out_of_range": 1, "missing_folder": 1, "not_10_images": 1}}

    samples = list(make_eval_loader(str(out), map_fn=lambda s: s, batch_size=1, collate_fn=lambda b: b[0]))
    by_source = {s["json"]["source"]: s for s in samples}
    assert set(by_source) == {"video-clip-a/4", "video-clip-a/0", "open-images-123_b/7"}
    raised = by_source["video-clip-a/4"]
    assert raised["json"]["target"] == 4 and raised["json"]["static"] is False
    assert raised["json"]["description"] == "the man raises his hand"
    assert raised["json"]["frames"] == [f"img{f}.jpg" for f in video_frames]
    for i, frame in enumerate(video_frames):  # member i.jpg holds the i-th frame by number
        assert raised[f"{i}.jpg"].getpixel((8, 8))[0] == pytest.approx(frame * 20 % 256, abs=12)
    assert by_source["open-images-123_b/7"]["json"]["static"] is True


def test_imagecode_converter_rejects_a_file_that_is_not_a_set_mapping(tmp_path):
    file = tmp_path / "d.json"
    file.write_text("[1, 2]")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match="d.json"):
        convert_main(["imagecode", "--descriptions", str(file), "--images", str(tmp_path / "imgs"),
                      "--out", str(tmp_path / "out")])


# --------------------------------------------------------------------------- synthetic sets


def test_synthetic_sets_are_deterministic_and_well_formed(tmp_path):
    first = generate(tmp_path / "a", task="contextual", n_train=12, n_val=6, seed=3, shard_size=6)
    generate(tmp_path / "b", task="contextual", n_train=12, n_val=6, seed=3, shard_size=6)
    generate(tmp_path / "c", task="contextual", n_train=12, n_val=6, seed=4, shard_size=6)
    assert first["counts"] == {"train": 12, "val": 6}
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "a" / split).glob("*.tar")):
            assert shard.read_bytes() == (tmp_path / "b" / split / shard.name).read_bytes()
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() != (tmp_path / "c/train/shard-000000.tar").read_bytes()

    samples = list(make_eval_loader(str(tmp_path / "a" / "train"), map_fn=lambda s: s, batch_size=1,
                                    collate_fn=lambda b: b[0]))
    assert len(samples) == 12
    for sample in samples:
        meta = sample["json"]
        assert meta["task"] == "contextual" and 0 <= meta["target"] < 10
        assert ("open-images" in meta["set"]) == meta["static"]
        frames = [sample[f"{i}.png"] for i in range(10)]
        assert all(f.size == (64, 64) for f in frames)
        differing = [i for i in range(1, 10) if frames[i].tobytes() != frames[0].tobytes()]
        assert len(differing) == 9, "frames are near-identical, never identical"
        if meta["kind"] in ("flash", "before", "after"):  # names the colour the object turns
            assert any(colour in meta["description"].split() for colour in COLOURS), meta["description"]


def test_synthetic_description_kinds_cover_video_and_static(tmp_path):
    generate(tmp_path / "s", task="contextual", n_train=60, n_val=0, seed=0, shard_size=60)
    samples = list(make_eval_loader(str(tmp_path / "s" / "train"), map_fn=lambda s: s["json"], batch_size=1,
                                    collate_fn=lambda b: b[0]))
    kinds = {(m["static"], m["kind"]) for m in samples}
    assert {(False, "before"), (False, "after"), (False, "flash"), (False, "extreme"),
            (True, "flash"), (True, "extreme")} <= kinds
    for meta in samples:
        if meta["kind"] in ("before", "after"):
            assert not meta["static"] and 0 <= meta["target"] <= 9
