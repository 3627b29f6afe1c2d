"""The time task's data: synthetic scenes (shards.synth.time_of_day), the TOC converter (shards.convert.toc)."""
from __future__ import annotations

import argparse
import io
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shards import convert, records, synth
from shards.convert.toc import add_toc_arguments, convert_toc, parse_local_time
from shards.reader import make_eval_loader
from shards.synth.time_of_day import MONTH_NAMES, QUERY_SHARE, describe_time, draw_time_scene, make_time_sample
from shards.writer import encode_image

TIME_TASK = synth.SynthTask(describe=describe_time, make_sample=make_time_sample)

# --------------------------------------------------------------------------- helpers


def synth_samples(seed: int, split: str, count: int, image_size: int = 64) -> list[tuple[dict[str, bytes], dict]]:
    """Samples as shards.synth.write_split makes them: one RNG per (task, seed, split, index)."""
    meta = describe_time(seed)
    return [make_time_sample(synth.sample_rng("time", seed, split, index), split, image_size, meta)
            for index in range(count)]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def read_samples(out: Path) -> list[dict[str, Any]]:
    """Every written sample's json plus its image size, in shard order, through the eval loader."""
    def keep(sample: dict[str, Any]) -> dict[str, Any]:
        image = next(value for key, value in sample.items() if isinstance(value, Image.Image))
        return {**sample["json"], "image_size": image.size}

    loader = make_eval_loader(str(out), map_fn=keep, batch_size=100, collate_fn=list)
    return [sample for batch in loader for sample in batch]


def write_image(path: Path, colour: tuple[int, int, int] = (90, 140, 200), fmt: str = "jpg") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(Image.new("RGB", (16, 12), colour), fmt))
    return path


def toc_row(ground_path: str, when: Any = "2010-05-13 17:49:28.0", **fields: Any) -> dict[str, Any]:
    row = {"ground_path": ground_path, "latitude": 60.14549, "longitude": 24.9883, "time": when,
           "timezone": "Europe/Helsinki", **fields}
    if when is KeyError:
        del row["time"]
    return row


# --------------------------------------------------------------------------- synthetic scenes


def test_synth_time_is_deterministic_and_fields_are_in_range():
    first, again = synth_samples(0, "train", 40), synth_samples(0, "train", 40)
    assert [images for images, _ in first] == [images for images, _ in again]
    assert [fields for _, fields in first] == [fields for _, fields in again]
    assert [images for images, _ in synth_samples(1, "train", 5)] != [images for images, _ in first[:5]]
    for images, fields in first:
        assert set(images) == {"png"}
        assert Image.open(io.BytesIO(images["png"])).size == (64, 64)
        hour, minute, month = fields["hour"], fields["minute"], fields["month"]
        assert 0 <= hour <= 23 and 0 <= minute <= 59 and 1 <= month <= 12
        assert fields["label"] == f"{hour}h"
        assert fields["caption"] == f"a photo taken at {hour:02d}:{minute:02d} in {MONTH_NAMES[month - 1]}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:00", fields["time"])
        stamp = parse_local_time(fields["time"])  # the converter reads the same hour/minute/month back
        assert (stamp.hour, stamp.minute, stamp.month) == (hour, minute, month)


def test_synth_time_draws_hours_and_months_uniformly():
    fields = [f for _, f in synth_samples(3, "val", 1200)]
    assert set(f["hour"] for f in fields) == set(range(24))
    assert set(f["month"] for f in fields) == set(range(1, 13))
    assert max(np.bincount([f["hour"] for f in fields])) < 3 * 1200 / 24


def test_synth_time_marks_a_query_subset_of_held_out_splits_only():
    """val samples are retrieval queries (about QUERY_SHARE) or database; train samples have no role; the
    role is drawn after the scene, so a sample's image does not depend on it."""
    assert all("retrieval_role" not in f for _, f in synth_samples(3, "train", 200))
    val = [f for _, f in synth_samples(3, "val", 1000)]
    roles = [f["retrieval_role"] for f in val]
    assert set(roles) == {"query", "database"}
    assert abs(roles.count("query") / len(roles) - QUERY_SHARE) < 0.03
    meta = describe_time(0)
    for seed in range(5):
        train_images, train_fields = make_time_sample(random.Random(seed), "train", 64, meta)
        val_images, val_fields = make_time_sample(random.Random(seed), "val", 64, meta)
        assert train_images == val_images
        assert {k: v for k, v in val_fields.items() if k != "retrieval_role"} == train_fields


def test_synth_time_generate_is_byte_identical(tmp_path):
    """Through shards.synth.generate, as the CLI runs it: "time" is the time_of_day module's registration."""
    assert synth.get_synth("time") == TIME_TASK
    metas = [synth.generate(tmp_path / name, task="time", n_train=30, n_val=10, seed=7, shard_size=16)
             for name in ("a", "b")]
    assert metas[0] == metas[1] and metas[0]["counts"] == {"train": 30, "val": 10}
    assert metas[0]["classes"] == [f"{h}h" for h in range(24)] and metas[0]["months"] == list(MONTH_NAMES)
    tars = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(tars) == 3
    for tar in tars:
        assert (tmp_path / "a" / tar).read_bytes() == (tmp_path / "b" / tar).read_bytes()
    samples = read_samples(tmp_path / "a" / "train")
    assert len(samples) == 30 and samples[0]["task"] == "time"
    assert samples[0]["source"] == "synth/time/seed7/train/0000000"
    assert {s["retrieval_role"] for s in read_samples(tmp_path / "a" / "val")} <= {"query", "database"}


def test_different_hours_look_different():
    """Night (03:30) vs afternoon (13:30) differs far more than two layouts at one hour."""
    def mean_difference(hour_a: float, hour_b: float) -> float:
        return float(np.mean([np.abs(pixels(draw_time_scene(random.Random(s), hour_a, month, 64))
                                     - pixels(draw_time_scene(random.Random(s + 1000), hour_b, month, 64))).mean()
                              for s in range(6) for month in (1, 4, 7, 10)]))

    across_hours = mean_difference(3.5, 13.5)
    same_hour = max(mean_difference(3.5, 3.5), mean_difference(13.5, 13.5))
    assert across_hours > 60
    assert across_hours > 2.5 * same_hour


def test_months_look_different():
    """Winter (January) vs summer (July) at noon: ground and foliage palettes differ."""
    difference = np.mean([np.abs(pixels(draw_time_scene(random.Random(s), 12.0, 1, 64))
                                 - pixels(draw_time_scene(random.Random(s), 12.0, 7, 64)))[40:].mean()
                          for s in range(6)])
    assert difference > 40


def test_sun_moves_left_to_right_through_the_day():
    """The sun (bright, warm: R >= 230 and R - B >= 40, unlike sky, clouds or a July tree) moves right with the hour."""
    def sun_x(seed: int, hour: float) -> float:
        rgb = pixels(draw_time_scene(random.Random(seed), hour, 7, 64))
        ys, xs = np.nonzero((rgb[..., 0] >= 230) & (rgb[..., 0] - rgb[..., 2] >= 40))
        assert len(xs) > 10, (seed, hour)
        return float(xs.mean())

    for seed in range(4):
        xs = [sun_x(seed, hour) for hour in (8.0, 10.0, 12.0, 14.0)]
        assert all(later - earlier > 5 for earlier, later in zip(xs, xs[1:])), xs


# --------------------------------------------------------------------------- TOC converter


def test_parse_local_time_as_written_and_strict():
    assert parse_local_time("2010-05-13 17:49:28.0").timetuple()[:6] == (2010, 5, 13, 17, 49, 28)
    assert parse_local_time("2014-01-12 19:24").hour == 19
    assert parse_local_time(" 2011-07-17T06:18:26 ").minute == 18
    assert parse_local_time("2012-12-31 00:00:00.123").month == 12
    # unpadded fields, as TICL's strptime("%Y-%m-%d %H:%M:%S") reads them; padding spaces are stripped
    assert parse_local_time("2010-5-3 7:05:09").timetuple()[:6] == (2010, 5, 3, 7, 5, 9)
    assert parse_local_time("\t2010-05-03 7:5:9.999999 \n").timetuple()[:6] == (2010, 5, 3, 7, 5, 9)
    assert parse_local_time("2010-05-03 00:00").timetuple()[3:5] == (0, 0)
    assert parse_local_time("2012-02-29 23:59:59.9").timetuple()[1:6] == (2, 29, 23, 59, 59)  # leap day
    for bad in ("2010-13-01 10:00:00.0", "2010-05-13 25:00:00.0", "2010-05-13 23:60:00", "2010-02-30 10:00:00",
                "2010-05-13", "25:00", "garbage", "2010-05-13 24:00:00", "2011-02-29 10:00",
                "2010-05-13 17:049:28", "2010-05-13 17:49:28.", "2010-05-13 17-49-28", "", None, 1273772968, "2010-05-13 17:49:28+02:00",
                "2010-05-13 17:49:28.0 extra", "２０１０-05-13 17:49:28"):
        assert parse_local_time(bad) is None, bad


@pytest.fixture()
def toc_dataset(tmp_path: Path) -> dict[str, Any]:
    """Images plus records covering every outcome: good (three lookups), bad_time, missing/corrupt, bad_row."""
    images = tmp_path / "images"
    write_image(images / "good1.jpg", (10, 20, 30))
    write_image(images / "nested" / "good2.png", (40, 50, 60), fmt="png")
    write_image(images / "flat3.jpg", (70, 80, 90))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    rows = [
        toc_row("good1.jpg", "2010-05-13 17:49:28.0"),
        toc_row("nested/good2.png", "2014-01-12 00:05:00.0", timezone="Asia/Tokyo"),
        toc_row("some/remote/dir/flat3.jpg", "2011-12-31 23:59:59.9"),  # found by basename
        toc_row("good1.jpg", "2010-13-01 10:00:00.0"),
        toc_row("good1.jpg", "garbage"),
        toc_row("good1.jpg", KeyError),
        toc_row("good1.jpg", ""),
        toc_row("good1.jpg", None),
        toc_row("good1.jpg", "2010-05-13 25:00:00.0"),
        toc_row("absent.jpg"),
        toc_row("broken.jpg"),
        ["not", "an", "object"],
        {"time": "2010-05-13 17:49:28.0"},
    ]
    expected = {"read": 13, "written": 3,
                "skipped": {"bad_row": 2, "bad_time": 6, "corrupt_image": 1, "missing_image": 1}}
    return {"images": images, "rows": rows, "expected": expected}


def check_good_samples(samples: list[dict[str, Any]]) -> None:
    assert [(s["source"], s["hour"], s["minute"], s["month"]) for s in samples] == [
        ("good1.jpg", 17, 49, 5), ("nested/good2.png", 0, 5, 1), ("some/remote/dir/flat3.jpg", 23, 59, 12)]
    first, second = samples[0], samples[1]
    assert first["task"] == "time" and first["label"] == "17h"
    assert first["caption"] == "a photo taken at 17:49 in May"
    assert first["time"] == "2010-05-13 17:49:28.0" and tuple(first["image_size"]) == (16, 12)
    assert (first["latitude"], first["longitude"], first["timezone"]) == (60.14549, 24.9883, "Europe/Helsinki")
    # local time as written: a Tokyo timezone does not move the hour
    assert second["timezone"] == "Asia/Tokyo" and second["label"] == "0h"
    assert second["caption"] == "a photo taken at 00:05 in January"


def test_convert_toc_json_list(tmp_path, toc_dataset):
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps(toc_dataset["rows"], indent=4))
    summary = convert_toc(metadata, toc_dataset["images"], tmp_path / "out", shard_size=2)
    assert summary == toc_dataset["expected"]
    assert json.loads((tmp_path / "out" / records.SUMMARY_FILE).read_text()) == summary
    check_good_samples(read_samples(tmp_path / "out"))
    with pytest.raises(FileExistsError):
        convert_toc(metadata, toc_dataset["images"], tmp_path / "out")
    assert convert_toc(metadata, toc_dataset["images"], tmp_path / "out", overwrite=True) == summary


def test_convert_toc_json_lines(tmp_path, toc_dataset):
    metadata = tmp_path / "meta.jsonl"
    lines = [json.dumps(row) for row in toc_dataset["rows"]]
    metadata.write_text("\n".join(lines[:3] + ["", "{broken json"] + lines[3:]) + "\n")
    summary = convert_toc(metadata, toc_dataset["images"], tmp_path / "out")
    expected = toc_dataset["expected"]
    assert summary == {**expected, "read": 14, "skipped": {**expected["skipped"], "bad_row": 3}}
    check_good_samples(read_samples(tmp_path / "out"))


def test_convert_toc_cli_arguments(tmp_path, toc_dataset):
    """add_toc_arguments + the common arguments give exactly convert_toc's keywords, as shards.convert.main passes."""
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps(toc_dataset["rows"][:3]))
    parser = argparse.ArgumentParser()
    add_toc_arguments(parser)
    convert.add_common_arguments(parser)
    args = parser.parse_args(["--metadata", str(metadata), "--images", str(toc_dataset["images"]),
                              "--out", str(tmp_path / "out"), "--shard-size", "5"])
    assert convert_toc(**vars(args)) == {"read": 3, "written": 3, "skipped": {}}


def test_convert_toc_errors(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError):
        convert_toc(tmp_path / "nope.json", tmp_path / "images", tmp_path / "out")
    (tmp_path / "bad.json").write_text('[{"ground_path": "a.jpg",')
    with pytest.raises(FileNotFoundError):
        convert_toc(tmp_path / "bad.json", tmp_path / "no-images", tmp_path / "out")
    with pytest.raises(ValueError, match="JSON list"):
        convert_toc(tmp_path / "bad.json", tmp_path / "images", tmp_path / "out")


def test_convert_toc_many_records_in_one_shard(tmp_path):
    """Volume, not speed (speed belongs to benchmarks/, never to a timed test): every record lands once."""
    images = tmp_path / "images"
    write_image(images / "one.jpg")
    rng = random.Random(0)
    rows = [toc_row("one.jpg" if i % 2 else f"remote/{i}/one.jpg",
                    f"20{rng.randint(6, 14):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                    f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.0")
            for i in range(2_000)]
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps(rows))
    summary = convert_toc(metadata, images, tmp_path / "out", shard_size=2_000)
    assert summary == {"read": 2_000, "written": 2_000, "skipped": {}}
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes["total"] == 2_000 and list(sizes["shards"].values()) == [2_000]


def test_convert_toc_odd_times_land_in_the_right_bins(tmp_path):
    """Unpadded and padded times: hour, minute and month as written, no timezone conversion."""
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    rows = [toc_row("a.jpg", "2010-5-3 7:05:09"), toc_row("a.jpg", "  2013-12-31 23:59:59.999  "),
            toc_row("a.jpg", "2014-01-01T00:00:00"), toc_row("a.jpg", "2012-2-29 0:7")]
    (tmp_path / "meta.json").write_text(json.dumps(rows))
    assert convert_toc(tmp_path / "meta.json", images, tmp_path / "out")["written"] == 4
    got = [(s["hour"], s["minute"], s["month"], s["label"], s["time"]) for s in read_samples(tmp_path / "out")]
    assert got == [(7, 5, 5, "7h", "2010-5-3 7:05:09"), (23, 59, 12, "23h", "  2013-12-31 23:59:59.999  "),
                   (0, 0, 1, "0h", "2014-01-01T00:00:00"), (0, 7, 2, "0h", "2012-2-29 0:7")]
    assert all("retrieval_role" not in s for s in read_samples(tmp_path / "out"))


def test_convert_toc_query_database_split(tmp_path):
    """--queries: TICL's query file and database file into one shard set, each sample marked with its side;
    a database record that is a query's image is skipped, so no query retrieves itself."""
    images = tmp_path / "images"
    for name in ("q1.jpg", "q2.jpg", "d1.jpg", "d2.jpg"):
        write_image(images / name)
    queries = tmp_path / "query_toc.json"
    queries.write_text(json.dumps([toc_row("q1.jpg", "2010-05-13 23:50:00.0"), toc_row("q2.jpg", "2011-01-01 12:00:00.0"),
                                   toc_row("q3-missing.jpg")]))
    database = tmp_path / "test_database.json"
    database.write_text(json.dumps([toc_row("d1.jpg", "2012-03-04 00:15:00.0"), toc_row("remote/q1.jpg"),
                                    toc_row("d2.jpg", "bad time"), toc_row("d2.jpg", "2012-03-04 11:45:00.0")]))
    summary = convert_toc(database, images, tmp_path / "out", queries=queries)
    assert summary == {"read": 7, "written": 4,
                       "skipped": {"bad_time": 1, "missing_image": 1, "query_in_database": 1}}
    samples = read_samples(tmp_path / "out")
    assert [(s["source"], s["retrieval_role"], s["row"]) for s in samples] == [
        ("q1.jpg", "query", 1), ("q2.jpg", "query", 2), ("d1.jpg", "database", 1), ("d2.jpg", "database", 4)]
    # through the CLI's arguments too
    parser = argparse.ArgumentParser()
    add_toc_arguments(parser)
    convert.add_common_arguments(parser)
    args = parser.parse_args(["--metadata", str(database), "--queries", str(queries), "--images", str(images),
                              "--out", str(tmp_path / "cli")])
    assert convert_toc(**vars(args)) == summary
    with pytest.raises(FileNotFoundError, match="queries"):
        convert_toc(database, images, tmp_path / "x", queries=tmp_path / "nope.json")

