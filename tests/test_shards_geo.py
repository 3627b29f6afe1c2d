"""Tests of geo_time data: the synthetic world and its knowledge corpus, and the TARA converter."""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards import convert
from shards.convert.tara import add_tara_arguments, convert_tara, normalise_time
from shards.samples import expand_urls
from shards.synth import geo_time as synth_geo
from shards.synth.geo_time import (
    choose_layout,
    choose_scene,
    describe_geo,
    labels_of,
    make_geo_sample,
    render_geo,
    write_knowledge_corpus,
)
from shards.writer import ShardSetWriter

# --------------------------------------------------------------------------- synthetic world


def samples(meta: dict[str, Any], count: int, seed: str = "s", size: int = 64) -> list[tuple[dict, dict]]:
    return [make_geo_sample(random.Random(f"{seed}/{i}"), "train", size, meta) for i in range(count)]


def test_world_is_deterministic_and_complete() -> None:
    meta = describe_geo(0)
    assert meta == describe_geo(0) and meta != describe_geo(1)
    assert json.loads(json.dumps(meta)) == meta  # meta.json-ready
    labels = labels_of(meta)
    assert len(labels["location"]) == len(set(labels["location"])) == 18  # 12 seen + 6 knowledge-only cities
    assert len(labels["time"]) == len(set(labels["time"])) == 10 * 13
    assert meta["classes"] == labels["location"]
    names = [part for label in labels["location"] for part in label.split(", ")]
    assert len(set(names)) == 18 + 6 + 3  # no name is shared between cities, countries and regions
    unseen = synth_geo.unseen_labels(meta)
    assert len(unseen["location"]) == 6 and unseen["time"] == []
    assert [label.split(", ")[0] for label in unseen["location"]] == meta["unseen_cities"]
    assert not set(meta["unseen_cities"]) & set(meta["rare_cities"])
    years = [year["year"] for decade in meta["decades"] for year in decade["years"]]
    assert [y // 10 * 10 for y in years] == [1970, 1970, 1980, 1980, 1990, 1990, 2000, 2000, 2010, 2010]
    cities = [(city["landmark"], city["colour"]) for region in meta["regions"] for country in region["countries"]
              for city in country["cities"]]
    assert len(set(cities)) == 18  # every city has its own landmark
    for region in meta["regions"]:
        for country in region["countries"]:
            assert len({city["landmark"] for city in country["cities"]}) == 3
            assert [bool(city.get("knowledge_only")) for city in country["cities"]] == [False, False, True]


def test_knowledge_only_cities_are_held_out_only(tmp_path: Path) -> None:
    """Training photos never show a knowledge-only city (and are those of the 12-city world: zero weights
    change no draw); held-out photos do, at ``unseen_val_weight``; labels.json marks them unseen."""
    meta = describe_geo(0)
    unseen = set(synth_geo.unseen_labels(meta)["location"])
    train = [make_geo_sample(random.Random(f"t/{i}"), "train", 24, meta)[1]["gold_location"] for i in range(600)]
    assert not unseen & set(train) and len(set(train)) == 12
    closed = json.loads(json.dumps(meta))
    for region in closed["regions"]:
        for country in region["countries"]:
            country["cities"] = country["cities"][:2]
    assert train == [make_geo_sample(random.Random(f"t/{i}"), "train", 24, closed)[1]["gold_location"]
                     for i in range(600)]
    many = {**meta, "unseen_val_weight": 1.0}
    val = [make_geo_sample(random.Random(f"v/{i}"), "val", 24, many)[1]["gold_location"] for i in range(300)]
    assert set(val) >= unseen and 0.35 < sum(v in unseen for v in val) / len(val) < 0.65  # 6 / 12.3 expected
    synth_geo.write_geo_extras(tmp_path, meta, 0)
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels["unseen"] == {"location": sorted(unseen, key=labels["location"].index), "time": []}
    corpus = (tmp_path / "knowledge.txt").read_text()
    for name in meta["unseen_cities"]:
        assert corpus.count(name) >= 3  # described like every other city
    flags = [json.dumps(country["flag"]) for region in meta["regions"] for country in region["countries"]]
    cars = [(year["car"], year["colour"]) for decade in meta["decades"] for year in decade["years"]]
    assert len(set(flags)) == 6 and len(set(cars)) == 10


def test_borrowed_landmarks_recombine_cues_that_training_teaches() -> None:
    """``borrowed_landmarks``: each knowledge-only city shows the landmark of a distinct common seen city of
    another region (never a shape of its own country's seen cities), so its photo pairs cues that training
    photos teach; training photos are byte-identical to the default world's; every city gets a signature
    text naming its landmark and its flag, and the default world's corpus is unchanged."""
    default, borrowed = describe_geo(0), describe_geo(0, borrowed_landmarks=True)
    assert describe_geo(0, borrowed_landmarks=False) == default and "knowledge_signature" not in default
    seen = {(city["landmark"], city["colour"]): (r, city["name"]) for r, region in enumerate(borrowed["regions"])
            for country in region["countries"] for city in country["cities"] if not city.get("knowledge_only")}
    lenders = []
    for r, region in enumerate(borrowed["regions"]):
        for country in region["countries"]:
            *own, unseen = country["cities"]
            lender_region, lender = seen[(unseen["landmark"], unseen["colour"])]
            assert lender == unseen["landmark_of"] and lender_region != r and lender not in borrowed["rare_cities"]
            assert unseen["landmark"] not in {city["landmark"] for city in own}
            lenders.append(lender)
    assert len(set(lenders)) == 6
    assert [c["name"] for _, _, c in synth_geo.iter_locations(borrowed)] == \
        [c["name"] for _, _, c in synth_geo.iter_locations(default)]
    for i in range(40):
        assert make_geo_sample(random.Random(f"b/{i}"), "train", 32, borrowed) == \
            make_geo_sample(random.Random(f"b/{i}"), "train", 32, default)
    texts = synth_geo.cue_texts(borrowed)
    name = borrowed["unseen_cities"][0]
    city = next(c for _, _, c in synth_geo.iter_locations(borrowed) if c["name"] == name)
    assert texts[f"city:{name}"][-1].startswith(f"photos of {name} in ")
    assert synth_geo.landmark_phrase(city["landmark"], city["colour"]) in texts[f"city:{name}"][-1]
    assert texts[f"city:{city['landmark_of']}"][0].endswith(synth_geo.landmark_phrase(city["landmark"], city["colour"]))
    assert all(len(v) == 4 for k, v in texts.items() if k.startswith("city:"))
    assert all(len(v) == 3 for k, v in synth_geo.cue_texts(default).items() if k.startswith("city:"))


def test_samples_are_deterministic_and_valid() -> None:
    meta = describe_geo(0)
    first, again = samples(meta, 200), samples(meta, 200)
    assert first == again
    assert samples(meta, 5, seed="other") != first[:5]
    labels = labels_of(meta)
    year_only = 0
    for images, fields in first:
        image = Image.open(io.BytesIO(images["png"]))
        assert set(images) == {"png"} and image.size == (64, 64) and image.mode == "RGB"
        location, time = fields["gold_location"], fields["gold_time"]
        assert fields["label"] == location and location in labels["location"] and time in labels["time"]
        assert fields["caption"] == f"a photo taken in {location} in {time}"
        # the description names three of the drawn cues in the corpus's words, never a label
        cues = fields["description"].removeprefix("a photo with ").split(", a ")
        assert fields["description"].startswith("a photo with ") and len(fields["description"]) < 160
        assert not any(part in fields["description"] for part in location.split(", ") + [time.split("-")[0]])
        assert sum(phrase in fields["description"] for phrase in synth_geo.cue_phrases(
            synth_geo.GeoScene(**scene_indices(meta, fields["scene"])), meta)) == 3, cues
        assert (fields["gold_location_suggest"], fields["gold_time_suggest"]) == (location, time)
        scene = fields["scene"]
        assert fields["location_parts"] == location.split(", ") == [scene["city"], scene["country"], scene["region"]]
        assert time in (str(scene["year"]), f"{scene['year']}-{scene['month']}")
        assert scene["decade"] == f"{scene['year'] // 10 * 10}s"
        assert normalise_time(time) == time
        year_only += "-" not in time
    assert 20 <= year_only <= 60  # about a fifth
    assert len({fields["gold_location"] for _, fields in first}) == 12  # training photos: the 12 seen cities


def scene_indices(meta: dict, scene: dict) -> dict:
    """The GeoScene indices of a sample's json ``scene`` (names back to positions in the world)."""
    for r, region in enumerate(meta["regions"]):
        for c, country in enumerate(region["countries"]):
            for i, city in enumerate(country["cities"]):
                if (region["name"], country["name"], city["name"]) == (scene["region"], scene["country"], scene["city"]):
                    where = {"region": r, "country": c, "city": i}
    for d, decade in enumerate(meta["decades"]):
        for y, year in enumerate(decade["years"]):
            if year["year"] == scene["year"]:
                where.update(decade=d, year=y)
    return {**where, "month": scene["month"], "year_only": False}


def changed_mask(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=-1)


def changed_pixels(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.argwhere(changed_mask(a, b))  # (row, column) pairs


def inside(points: np.ndarray, box: tuple[float, float, float, float], margin: float = 2.0) -> bool:
    x0, y0, x1, y1 = box
    rows, cols = points[:, 0], points[:, 1]
    return bool(np.all((cols >= x0 - margin) & (cols <= x1 + margin) & (rows >= y0 - margin) & (rows <= y1 + margin)))


def test_each_cue_is_drawn_only_where_it_belongs() -> None:
    """Same layout and noise, one label level changed: only that level's cue moves in the picture."""
    meta = describe_geo(0)
    size = 64
    for index in range(12):
        rng = random.Random(f"cue/{index}")
        scene = dataclasses.replace(choose_scene(rng, meta), decade=4)  # the vivid decade: no blur to spread pixels
        layout = choose_layout(rng, size)
        base = render_geo(scene, layout, meta, size)
        assert np.array_equal(np.asarray(base), np.asarray(render_geo(scene, layout, meta, size)))
        other_city = dataclasses.replace(scene, city=1 - scene.city)
        other_country = dataclasses.replace(scene, country=1 - scene.country)
        other_year = dataclasses.replace(scene, year=1 - scene.year)
        other_month = dataclasses.replace(scene, month=scene.month % 12 + 1)
        assert inside(changed_pixels(base, render_geo(other_city, layout, meta, size)), synth_geo.landmark_box(layout))
        assert inside(changed_pixels(base, render_geo(other_year, layout, meta, size)),
                      synth_geo.car_box(layout, size))
        country_changes = changed_pixels(base, render_geo(other_country, layout, meta, size))
        in_flag = [inside(point[None], synth_geo.flag_box(layout, size)) for point in country_changes]
        in_landmark = [inside(point[None], synth_geo.landmark_box(layout)) for point in country_changes]
        assert any(in_flag) and all(f or m for f, m in zip(in_flag, in_landmark))  # its flag and its city's landmark
        month_changes = changed_pixels(base, render_geo(other_month, layout, meta, size))
        assert len(month_changes) > size and month_changes[:, 0].min() >= int(round(layout.horizon)) - 2
        region_changes = changed_pixels(base, render_geo(dataclasses.replace(scene, region=(scene.region + 1) % 3),
                                                         layout, meta, size))
        assert (region_changes[:, 0] < layout.horizon).sum() > size * 10  # the sky changes colour
        decade_changes = changed_pixels(base, render_geo(dataclasses.replace(scene, decade=0), layout, meta, size))
        assert len(decade_changes) > size * size * 0.9  # the tint covers the whole photo


def test_flag_cue_is_local_and_same_city_shares_its_landmark() -> None:
    meta = describe_geo(0)
    rng = random.Random("flag")
    scene = dataclasses.replace(choose_scene(rng, meta), decade=4)
    layout = choose_layout(rng, 64)
    swapped = json.loads(json.dumps(meta))  # the same world with the two sibling countries' flags swapped
    countries = swapped["regions"][scene.region]["countries"]
    countries[0]["flag"], countries[1]["flag"] = countries[1]["flag"], countries[0]["flag"]
    changes = changed_pixels(render_geo(scene, layout, meta, 64), render_geo(scene, layout, swapped, 64))
    assert len(changes) and inside(changes, synth_geo.flag_box(layout, 64))

    # Two photos of each city with the landmark elsewhere: its footprint (the pixels that change with the
    # landmark colour) is the same shape, shifted.
    recoloured = json.loads(json.dumps(meta))
    for region in recoloured["regions"]:
        for country in region["countries"]:
            for city in country["cities"]:
                city["colour"] = "white" if city["colour"] != "white" else "red"
    for city in range(2):
        scene = dataclasses.replace(scene, city=city)
        footprints = []
        for index, (x, base) in enumerate(((34.0, 40.0), (45.0, 43.0))):
            lay = dataclasses.replace(choose_layout(random.Random(f"l{index}"), 64), landmark_x=x, landmark_base=base,
                                      landmark_height=24.0, pole_x=1.0, clouds=(), trees=())  # flag clear of it
            diff = changed_mask(render_geo(scene, lay, meta, 64), render_geo(scene, lay, recoloured, 64))
            x0, y0 = int(x) - 12, int(base) - 24
            footprints.append(diff[y0:y0 + 25, x0:x0 + 25])
        assert footprints[0].sum() > 20 and np.array_equal(footprints[0], footprints[1])


def test_other_image_sizes_and_shard_writing(tmp_path: Path) -> None:
    meta = describe_geo(3)
    with ShardSetWriter(tmp_path, shard_size=10) as writer:
        for index, (images, fields) in enumerate(samples(meta, 15, size=32)):
            writer.write(f"{index:06d}", images, {"task": "geo_time", **fields})
    read = list(wds.WebDataset(expand_urls(str(tmp_path)), shardshuffle=False))
    assert len(read) == 15 and Image.open(io.BytesIO(read[0]["png"])).size == (32, 32)
    assert json.loads(read[0]["json"])["caption"] == read[0]["txt"].decode()
    image, _ = make_geo_sample(random.Random(0), "val", 128, meta)
    assert Image.open(io.BytesIO(image["png"])).size == (128, 128)


# --------------------------------------------------------------------------- knowledge corpus


def test_knowledge_corpus_describes_every_cue_among_distractors(tmp_path: Path) -> None:
    meta = describe_geo(0)
    count = write_knowledge_corpus(meta, tmp_path / "knowledge.txt", n_distractors=500, seed=0)
    lines = (tmp_path / "knowledge.txt").read_text(encoding="utf-8").splitlines()
    assert count == len(lines) == len(set(lines)) and all(lines)
    write_knowledge_corpus(meta, tmp_path / "again.txt", n_distractors=500, seed=0)
    write_knowledge_corpus(meta, tmp_path / "other.txt", n_distractors=500, seed=1)
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "knowledge.txt").read_bytes()
    assert (tmp_path / "other.txt").read_bytes() != (tmp_path / "knowledge.txt").read_bytes()

    def described(*words: str) -> bool:
        return any(all(word in line for word in words) for line in lines)

    for region in meta["regions"]:
        assert described(region["name"], region["sky"]) and described(region["name"], region["terrain"])
        for country in region["countries"]:
            assert described(country["name"], *country["flag"]["colours"], "stripes")
            for city in country["cities"]:
                noun = synth_geo.LANDMARK_NOUNS.get(city["landmark"], city["landmark"])
                assert described(city["name"], city["colour"], noun)
    for index, decade in enumerate(meta["decades"]):
        assert described(decade["name"], synth_geo.DECADE_STYLES[index].description)
        for year in decade["years"]:
            assert described(str(year["year"]), year["colour"], year["car"])
    for name, ground, _ in synth_geo.MONTHS.values():
        assert described(name, ground)
    cue_lines = {text for texts in synth_geo.cue_texts(meta).values() for text in texts}
    assert cue_lines <= set(lines)
    distractors = [line for line in lines if line not in cue_lines]
    assert len(distractors) == 500
    world_names = {part for label in labels_of(meta)["location"] for part in label.split(", ")}
    world_years = {str(year["year"]) for decade in meta["decades"] for year in decade["years"]}
    for line in distractors:
        words = set(line.replace(",", " ").split())
        assert not words & world_names and not words & world_years, line
    assert write_knowledge_corpus(meta, tmp_path / "default.txt") == len(cue_lines) + 2000
    # the prompt-form option adds, per city, a text that opens with the label prompt's own words
    prompted = synth_geo.cue_texts({**meta, "knowledge_prompt_form": True})
    for region, country, city in synth_geo.iter_locations(meta):
        texts = prompted[f"city:{city['name']}"]
        assert len(texts) == 4 and texts[:3] == synth_geo.cue_texts(meta)[f"city:{city['name']}"]
        assert texts[3].startswith(f"a photo taken in {synth_geo.location_label(city, country, region)} shows its ")


# --------------------------------------------------------------------------- TARA converter


def save_image(path: Path, colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path, format=fmt)
    return path.read_bytes()


def tara_fixture(root: Path) -> tuple[Path, list[dict[str, Any]], dict[str, bytes]]:
    """An images dir and records covering every outcome: 3 written, one skip for each reason."""
    images = root / "images"
    kept = {"a.jpg": save_image(images / "a.jpg", (200, 10, 10)),
            "b photo.png": save_image(images / "b photo.png", (10, 200, 10), "PNG"),
            "sub/c.jpg": save_image(images / "sub" / "c.jpg", (10, 10, 200))}
    save_image(images / "good.jpg", (90, 90, 90))
    (images / "corrupt.jpg").write_bytes(kept["a.jpg"][:60])
    records = [
        {"image_path": "/elsewhere/photos/a.jpg", "gold_location": "Brooklyn, New York, United States",
         "gold_location_suggest": "New York, United States", "gold_time": "2017-05-23",
         "gold_time_suggest": "2017-5", "abstract": "A street fair."},
        {"image_url": "https://upload.example.org/wiki/b%20photo.png?width=640&x=1", "gold_location": "Kenya",
         "gold_time": "1998"},
        {"image": "sub/c.jpg", "gold_location": "Paris ,France", "gold_location_suggest": "",
         "gold_time": 2001, "gold_time_suggest": "2001-2-30"},
        {"image_url": "https://example.org/img/missing.jpg", "gold_location": "Oslo, Norway", "gold_time": "2000"},
        {"image_url": "https://example.org/img/corrupt.jpg?v=2", "gold_location": "Lima, Peru", "gold_time": "2010-1"},
        {"image_url": "https://example.org/img/good.jpg", "gold_location": "Rome, Italy", "gold_time": "2017-13"},
        {"image_url": "https://example.org/img/good.jpg", "gold_location": "  ", "gold_time": "2017"},
        {"image_url": "https://example.org/img/good.jpg", "gold_location": None, "gold_time": "2017"},
    ]
    return images, records, kept


# label_fields="gold": the gold fields are needed; the suggest fields are written when usable, else null
EXPECTED_SUMMARY = {"read": 8, "written": 3,
                    "skipped": {"bad_location": 2, "bad_time": 1, "corrupt_image": 1, "missing_image": 1},
                    "label_fields": "gold",
                    "unusable_labels": {"gold_location_suggest": {"null": 2, "invalid": 0},
                                        "gold_time_suggest": {"null": 1, "invalid": 1}}}
EXPECTED_LABELS = {"location": ["Brooklyn, New York, United States", "Kenya", "Paris, France"],
                   "time": ["1998", "2001", "2017-5-23"],
                   "gold_location": ["Brooklyn, New York, United States", "Kenya", "Paris, France"],
                   "gold_location_suggest": ["New York, United States"],
                   "gold_time": ["1998", "2001", "2017-5-23"],
                   "gold_time_suggest": ["2017-5"]}


def converted(out: Path) -> dict[str, dict[str, Any]]:
    """Written samples by source: json plus the image member name and bytes."""
    result = {}
    for sample in wds.WebDataset(expand_urls(str(out)), shardshuffle=False):
        meta = json.loads(sample["json"])
        (member,) = [name for name in sample if name in ("jpg", "png", "webp")]
        result[meta["source"]] = {**meta, "member": member, "bytes": sample[member], "txt": sample["txt"].decode()}
    return result


def check_converted(out: Path, kept: dict[str, bytes], summary: dict[str, Any], references: list[dict]) -> None:
    assert summary == EXPECTED_SUMMARY
    assert json.loads((out / "summary.json").read_text()) == EXPECTED_SUMMARY
    assert json.loads((out / "labels.json").read_text()) == EXPECTED_LABELS
    samples = converted(out)
    assert set(samples) == {"a.jpg", "b photo.png", "sub/c.jpg"}
    for source, data in kept.items():
        assert samples[source]["bytes"] == data
    a, b, c = samples["a.jpg"], samples["b photo.png"], samples["sub/c.jpg"]
    assert a["member"] == "jpg" and b["member"] == "png"
    assert {key: a[key] for key in ("task", "caption", "label", "gold_location", "gold_location_suggest",
                                    "gold_time", "gold_time_suggest", "location_parts", "abstract")} == {
        "task": "geo_time",
        "caption": "a photo taken in Brooklyn, New York, United States in 2017-5-23",
        "label": "Brooklyn, New York, United States",
        "gold_location": "Brooklyn, New York, United States",
        "gold_location_suggest": "New York, United States",
        "gold_time": "2017-5-23",
        "gold_time_suggest": "2017-5",
        "location_parts": ["Brooklyn", "New York", "United States"],
        "abstract": "A street fair.",
    }
    assert a["txt"] == a["caption"]
    assert (b["caption"], b["gold_location_suggest"], b["gold_time_suggest"], b["abstract"]) == (
        "a photo taken in Kenya in 1998", None, None, "")
    # Empty or invalid suggestions are written as null, never replaced by the gold label, and counted;
    # locations are re-spaced.
    assert (c["label"], c["gold_time"], c["gold_location_suggest"], c["gold_time_suggest"]) == (
        "Paris, France", "2001", None, None)
    assert c["label_problems"] == {"gold_time_suggest": "'2001-2-30'"} and "label_problems" not in a
    assert [{k: s[k] for k in ("row", "id") if k in s} for s in (a, b, c)] == references


def test_convert_tara_json_list(tmp_path: Path) -> None:
    images, records, kept = tara_fixture(tmp_path)
    (tmp_path / "tara.json").write_text(json.dumps(records))
    summary = convert_tara(tmp_path / "tara.json", images, tmp_path / "out", shard_size=2, label_fields="gold")
    check_converted(tmp_path / "out", kept, summary, [{"row": 1}, {"row": 2}, {"row": 3}])
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 2
    with pytest.raises(FileExistsError):
        convert_tara(tmp_path / "tara.json", images, tmp_path / "out", label_fields="gold")
    assert convert_tara(tmp_path / "tara.json", images, tmp_path / "out", overwrite=True,
                        label_fields="gold") == EXPECTED_SUMMARY
    with pytest.raises(ValueError):
        convert_tara(tmp_path / "tara.json", images, tmp_path / "bad", label_fields="suggested")


def test_convert_tara_dict_of_ids(tmp_path: Path) -> None:
    images, records, kept = tara_fixture(tmp_path)
    (tmp_path / "tara.json").write_text(json.dumps({f"id{i}": record for i, record in enumerate(records)}))
    summary = convert_tara(tmp_path / "tara.json", images, tmp_path / "out", label_fields="gold")
    check_converted(tmp_path / "out", kept, summary, [{"id": "id0"}, {"id": "id1"}, {"id": "id2"}])


def test_convert_tara_json_lines_through_the_cli_arguments(tmp_path: Path) -> None:
    """add_tara_arguments + convert's common arguments, as shards.convert.build_parser wires them."""
    images, records, kept = tara_fixture(tmp_path)
    lines = [json.dumps(records[0]), "", json.dumps(records[1]), "{broken", json.dumps(["not", "a", "row"])]
    lines += [json.dumps(record) for record in records[2:]]
    (tmp_path / "tara.jsonl").write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    add_tara_arguments(parser)
    convert.add_common_arguments(parser)
    args = parser.parse_args(["--records", str(tmp_path / "tara.jsonl"), "--images", str(images),
                              "--out", str(tmp_path / "out"), "--shard-size", "5", "--label-fields", "gold"])
    summary = convert_tara(**vars(args))
    expected = {**EXPECTED_SUMMARY, "read": 10,
                "skipped": dict(sorted({**EXPECTED_SUMMARY["skipped"], "bad_row": 2}.items()))}
    assert summary == {**expected, "skipped": dict(sorted(expected["skipped"].items()))}
    samples = converted(tmp_path / "out")
    assert [samples[s]["row"] for s in ("a.jpg", "b photo.png", "sub/c.jpg")] == [1, 3, 6]
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == EXPECTED_LABELS


def test_convert_tara_errors_and_time_parsing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        convert_tara(tmp_path / "none.json", tmp_path, tmp_path / "out")
    (tmp_path / "tara.json").write_text("[]")
    with pytest.raises(FileNotFoundError):
        convert_tara(tmp_path / "tara.json", tmp_path / "no-images", tmp_path / "out")
    assert convert_tara(tmp_path / "tara.json", tmp_path, tmp_path / "out") == {
        "read": 0, "written": 0, "skipped": {}, "label_fields": "suggest", "unusable_labels": {}}
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {
        "location": [], "time": [], "gold_location": [], "gold_location_suggest": [], "gold_time": [],
        "gold_time_suggest": []}
    good = {"2017": "2017", "2017-5": "2017-5", "2017-05-23": "2017-5-23", "2016-2-29": "2016-2-29", 1999: "1999",
            "1990s": "1990s", "20 century": "20 century", "1st century": "1st century", " 21  century": "21 century"}
    for value, expected in good.items():
        assert normalise_time(value) == expected
    for value in ("2017-13", "2017-0", "2017-2-30", "2017-5-0", "17", "2017/5", "May 2017", "", None, True, 2.5,
                  "1995s", "90s", "century", "20th century"):
        assert normalise_time(value) is None, value


def test_convert_tara_suggest_fields_by_default(tmp_path: Path) -> None:
    """Records shaped like TARA's published ones: the suggest fields are the labels (TARA's experiments);
    a record whose suggestion is null or unusable is skipped and counted, never given the gold label."""
    images = tmp_path / "images"
    for name in ("n1.jpg", "n2.jpg", "n3.jpg", "n4.jpg", "n5.jpg", "n6.jpg"):
        save_image(images / name, (120, 60, 30))
    base = "https://static01.nyt.com/images/2017/05/23/"
    records = [
        {"image_url": base + "n1.jpg", "gold_location": "Brooklyn, New York, United States",
         "gold_location_suggest": "New York, United States", "gold_time": "1970-1-1", "gold_time_suggest": "1970s",
         "abstract": "x"},
        {"image_url": base + "n2.jpg", "gold_location": "Tbilisi, Georgia", "gold_location_suggest": "Georgia",
         "gold_time": "1905-03-02", "gold_time_suggest": "20 century"},
        {"image_url": base + "n3.jpg", "gold_location": "Oslo, Norway", "gold_location_suggest": "Oslo, Norway",
         "gold_time": "2010-2-3", "gold_time_suggest": None},  # null suggestion: skipped, not the gold date
        {"image_url": base + "n4.jpg", "gold_location": "Lima, Peru", "gold_location_suggest": None,
         "gold_time": "2010", "gold_time_suggest": "2010"},
        {"image_url": base + "n5.jpg", "gold_location": "Rome, Italy", "gold_location_suggest": "Rome, Italy",
         "gold_time": "2011", "gold_time_suggest": "sometime in the 2010s"},  # invalid suggestion
        {"image_url": base + "n6.jpg", "gold_location": None, "gold_location_suggest": "Kenya",
         "gold_time": "not a date", "gold_time_suggest": "2001-05-03"},  # gold unusable, suggest fine
    ]
    (tmp_path / "tara.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = convert_tara(tmp_path / "tara.jsonl", images, tmp_path / "out")
    assert summary == {"read": 6, "written": 3,
                       "skipped": {"bad_time_suggest": 1, "no_location_suggest": 1, "no_time_suggest": 1},
                       "label_fields": "suggest",
                       "unusable_labels": {"gold_location": {"null": 1, "invalid": 0},
                                           "gold_time": {"null": 0, "invalid": 1}}}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    samples = converted(tmp_path / "out")
    assert (samples["n1.jpg"]["gold_time_suggest"], samples["n1.jpg"]["gold_time"]) == ("1970s", "1970-1-1")
    assert samples["n1.jpg"]["label"] == "New York, United States"
    assert samples["n1.jpg"]["caption"] == "a photo taken in New York, United States in 1970s"
    assert samples["n2.jpg"]["gold_time_suggest"] == "20 century" and samples["n2.jpg"]["gold_time"] == "1905-3-2"
    assert samples["n6.jpg"]["gold_location"] is None and samples["n6.jpg"]["gold_time_suggest"] == "2001-5-3"
    assert samples["n6.jpg"]["label_problems"] == {"gold_time": "'not a date'"}
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels["location"] == labels["gold_location_suggest"] == ["Georgia", "Kenya", "New York, United States"]
    assert labels["time"] == ["1970s", "20 century", "2001-5-3"]
    assert labels["gold_time"] == ["1905-3-2", "1970-1-1"]
