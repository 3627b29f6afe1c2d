"""Converters read images only inside their images root (issue #18), and a bad record is a counted skip.

Every converter is given, in records shaped like its published dataset's, a good image path, a ``../``
path and an absolute path: the good one is written with a relative ``json.source``, the other two are
counted as ``outside_images_root`` (logged with their record's number) and are written only with
``allow_outside_images``. Then, per converter: a record that is JSON but not an object, a line that is
not UTF-8, a directory named like an image, a broken symlink and a symlink loop are each counted by
reason, with the record's number in the log, and the rest of the set is still written.
"""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from shards import convert
from shards.convert.captions import convert_captions
from shards.convert.folder import convert_folder
from shards.convert.imagecode import convert_imagecode
from shards.convert.meme import convert_meme
from shards.convert.tara import convert_tara
from shards.convert.toc import convert_toc
from shards.records import SUMMARY_FILE

Convert = Callable[[Path, bool], dict[str, Any]]  # (out, allow_outside_images) -> summary


def save_jpeg(path: Path, shade: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (shade, 40, 200)).save(path, format="JPEG")
    return path


def written(out: Path) -> list[dict[str, Any]]:
    """The json of every sample of a converted set, in order."""
    metas = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


def skip_logs(caplog: pytest.LogCaptureFixture, reason: str) -> list[str]:
    return [m for m in caplog.messages if reason in m]


def bad_utf8(text: str) -> bytes:
    """``text`` encoded, with each ``CAFE`` replaced by Latin-1 bytes that are not UTF-8."""
    return text.encode().replace(b"CAFE", b"caf\xe9")


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Any]:
    """images/good.jpg inside the root; secret.jpg one level up and elsewhere/abs_secret.jpg outside it."""
    images = tmp_path / "images"
    save_jpeg(images / "good.jpg")
    up = save_jpeg(tmp_path / "secret.jpg", 10)
    absolute = save_jpeg(tmp_path / "elsewhere" / "abs_secret.jpg", 20)
    return {"tmp": tmp_path, "images": images, "up": up, "absolute": absolute,
            "names": ["good.jpg", "../secret.jpg", str(absolute)]}


def bad_entries(images: Path) -> None:
    """A directory named like an image, a broken symlink and a symlink loop in the images root."""
    (images / "folder.jpg").mkdir()
    (images / "gone.jpg").symlink_to(images / "does-not-exist.jpg")
    (images / "loop.jpg").symlink_to(images / "loop2.jpg")
    (images / "loop2.jpg").symlink_to(images / "loop.jpg")


# --------------------------------------------------------------------------- records per converter


def tara_row(image_path: str, **fields: Any) -> dict[str, Any]:
    return {"image_path": image_path, "gold_location": "Paris, Ile-de-France, France",
            "gold_location_suggest": "Ile-de-France, France", "gold_time": "2001-02-03",
            "gold_time_suggest": "2001-2", "abstract": "A street in spring.", **fields}


def toc_row(ground_path: str, **fields: Any) -> dict[str, Any]:
    return {"ground_path": ground_path, "latitude": 60.14549, "longitude": 24.9883,
            "time": "2010-05-13 17:49:28.0", "timezone": "Europe/Helsinki", **fields}


def meme_files(tmp: Path, ids: list[Any], sentences: list[Any] | None = None) -> tuple[Path, Path]:
    """CLIP4Meme's training layout and emotions file for these meme ids (one sentence each by default)."""
    train, emotions = tmp / "train.json", tmp / "emotions.json"
    if sentences is None:
        sentences = [{"video_id": video_id, "caption": f"query {i}"} for i, video_id in enumerate(ids)]
    train.write_text(json.dumps({"sentences": sentences, "titles": {str(i): ["a caption"] for i in ids}}))
    emotions.write_text(json.dumps([{"video_id": i, "emotion": [{"person_1": "happy"}]} for i in ids]))
    return train, emotions


def image_set(folder: Path, frames: int = 10) -> None:
    for frame in range(frames):
        save_jpeg(folder / f"img{frame}.jpg", frame * 20)


def tara_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    records = layout["tmp"] / "tara.jsonl"
    records.write_text("".join(json.dumps(tara_row(name)) + "\n" for name in layout["names"]))
    return (lambda out, allow: convert_tara(records, layout["images"], out, allow_outside_images=allow),
            layout["names"], ["row 2", "row 3"])


def toc_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    metadata = layout["tmp"] / "train_metadata.json"
    metadata.write_text(json.dumps([toc_row(name) for name in layout["names"]], indent=4))
    return (lambda out, allow: convert_toc(metadata, layout["images"], out, allow_outside_images=allow),
            layout["names"], ["record 2", "record 3"])


def meme_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    ids = [name.removesuffix(".jpg") for name in layout["names"]]  # images/{id}.jpg
    train, emotions = meme_files(layout["tmp"], ids)
    return (lambda out, allow: convert_meme(train, emotions, layout["images"], out, allow_outside_images=allow),
            layout["names"], ["sentence 2", "sentence 3"])


def imagecode_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    tmp, images = layout["tmp"], layout["images"]
    image_set(images / "open-images-good")
    image_set(tmp / "up-set")
    image_set(tmp / "elsewhere" / "abs-set")
    sets = ["open-images-good", "../up-set", str(tmp / "elsewhere" / "abs-set")]
    descriptions = tmp / "train_data.json"
    descriptions.write_text(json.dumps({name: {"3": "the dog looks left"} for name in sets}))
    return (lambda out, allow: convert_imagecode(descriptions, images, out, allow_outside_images=allow),
            [f"{name}/3" for name in sets], ["set 2", "set 3"])


def folder_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    """No metadata: the way out of a class folder is a symlink (one relative through ../, one absolute)."""
    root = layout["images"]
    save_jpeg(root / "cat" / "good.jpg")
    (root / "cat" / "up.jpg").symlink_to(Path("..") / ".." / "secret.jpg")
    (root / "cat" / "zabs.jpg").symlink_to(layout["absolute"])
    return (lambda out, allow: convert_folder(root, out, allow_outside_images=allow),
            ["cat/good.jpg", "cat/up.jpg", "cat/zabs.jpg"], ["cat/up.jpg", "cat/zabs.jpg"])


def captions_case(layout: dict[str, Any]) -> tuple[Convert, list[str], list[str]]:
    table = layout["tmp"] / "pairs.jsonl"
    table.write_text("".join(json.dumps({"image": name, "caption": "a photo"}) + "\n" for name in layout["names"]))
    return (lambda out, allow: convert_captions(table, out, images_root=layout["images"], allow_outside_images=allow),
            layout["names"], ["line 2", "line 3"])


CASES = {"tara": tara_case, "toc": toc_case, "meme": meme_case, "imagecode": imagecode_case,
         "folder": folder_case, "captions": captions_case}


@pytest.mark.parametrize("name", sorted(CASES))
def test_image_paths_outside_the_root_are_refused_unless_allowed(name, layout, caplog):
    convert_set, sources, refused_at = CASES[name](layout)
    out = layout["tmp"] / "out"
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_set(out, False)
    assert (summary["read"], summary["written"], summary["skipped"]) == (3, 1, {"outside_images_root": 2})
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert [meta["source"] for meta in written(out)] == [sources[0]]  # relative to the root
    assert not Path(sources[0]).is_absolute()
    logged = skip_logs(caplog, "outside_images_root")
    assert all(any(where in message for message in logged) for where in refused_at), logged

    allowed = convert_set(layout["tmp"] / "allowed", True)
    assert (allowed["written"], allowed["skipped"]) == (3, {})
    assert sorted(meta["source"] for meta in written(layout["tmp"] / "allowed")) == sorted(sources)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_converter_takes_the_allow_outside_images_flag(name):
    args = vars(convert.build_parser().parse_args(
        [name, "--out", "o", "--allow-outside-images", *{
            "tara": ["--records", "r", "--images", "i"], "toc": ["--metadata", "m", "--images", "i"],
            "meme": ["--annotations", "a", "--emotions", "e", "--images", "i"],
            "imagecode": ["--descriptions", "d", "--images", "i"], "folder": ["--root", "r"],
            "captions": ["--file", "f.csv"]}[name]]))
    assert args["allow_outside_images"] is True


def test_tara_percent_encoded_climb_in_a_url_is_refused(layout):
    records = layout["tmp"] / "tara.jsonl"
    rows = [tara_row("good.jpg"), {**tara_row(""), "image_url": "https://example.org/img/..%2Fsecret.jpg?w=640"}]
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = convert_tara(records, layout["images"], layout["tmp"] / "out")
    assert (summary["written"], summary["skipped"]) == (1, {"outside_images_root": 1})


def test_a_path_that_leaves_is_still_found_by_its_file_name_inside_the_root(layout):
    """TARA and TOC look an image up by its file name too: an absolute path from the authors' machine whose
    file is in the images root is read there (never at the path given), under a relative source."""
    tmp, images = layout["tmp"], layout["images"]
    records, metadata = tmp / "tara.jsonl", tmp / "toc.json"
    records.write_text(json.dumps(tara_row("/home/author/tara/good.jpg")) + "\n")
    metadata.write_text(json.dumps([toc_row("/home/author/toc/good.jpg"), toc_row("../../good.jpg")]))
    assert convert_tara(records, images, tmp / "tara")["written"] == 1
    assert [m["source"] for m in written(tmp / "tara")] == ["good.jpg"]
    assert convert_toc(metadata, images, tmp / "toc")["written"] == 2
    assert [m["source"] for m in written(tmp / "toc")] == ["good.jpg", "good.jpg"]


# --------------------------------------------------------------------------- bad records, per converter


BAD_IMAGES = {"unreadable_image": 2, "missing_image": 1}  # folder.jpg and loop.jpg; gone.jpg


def check_bad_records(summary: dict[str, Any], out: Path, caplog, expected: dict[str, int], written_count: int,
                      logged: dict[str, list[str]]) -> None:
    """The set finished with the good records written and each bad one counted, its place in the log."""
    assert summary["written"] == written_count and summary["skipped"] == expected
    assert summary["read"] == written_count + sum(expected.values())
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert len(written(out)) == written_count
    for reason, places in logged.items():
        messages = skip_logs(caplog, reason)
        for where in places:
            assert any(where in m for m in messages), (reason, where, messages)


def test_tara_bad_records_are_counted_with_their_row(layout, caplog):
    images, tmp = layout["images"], layout["tmp"]
    bad_entries(images)
    records = tmp / "tara.jsonl"
    records.write_bytes(b"\n".join([
        json.dumps(tara_row("good.jpg")).encode(),
        b"[1, 2]",                                                   # row 2: JSON, not an object
        b"42",                                                       # row 3
        bad_utf8(json.dumps(tara_row("good.jpg", gold_location_suggest="CAFE, France"))),  # row 4: not UTF-8
        json.dumps(tara_row("folder.jpg")).encode(),                 # row 5: a directory
        json.dumps(tara_row("gone.jpg")).encode(),                   # row 6: a broken symlink
        json.dumps(tara_row("loop.jpg")).encode(),                   # row 7: a symlink loop
        json.dumps(tara_row("nul\0.jpg")).encode(),                 # row 8: a NUL byte in the path
        json.dumps(tara_row("good.jpg")).encode(),
    ]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_tara(records, images, tmp / "out")
    check_bad_records(summary, tmp / "out", caplog, {"bad_row": 3, **BAD_IMAGES, "unreadable_image": 3}, 2,
                      {"bad_row": ["row 2", "row 3", "row 4"], "unreadable_image": ["row 5", "row 7", "row 8"],
                       "missing_image": ["row 6"]})
    # a NUL byte is refused the same way when paths outside are allowed (the read, not the check, fails)
    records.write_text(json.dumps(tara_row("nul\0.jpg")) + "\n")
    assert convert_tara(records, images, tmp / "nul", allow_outside_images=True)["skipped"] == {"unreadable_image": 1}
    # the same in one JSON document (a list, and TARA's id -> record object)
    document = tmp / "tara.json"
    document.write_bytes(bad_utf8(json.dumps([tara_row("good.jpg"), 5, ["x"], tara_row("CAFE.jpg")])))
    assert convert_tara(document, images, tmp / "list")["skipped"] == {"bad_row": 3}
    document.write_text(json.dumps({"a": tara_row("good.jpg"), "b": "not a record"}))
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        assert convert_tara(document, images, tmp / "ids")["skipped"] == {"bad_row": 1}
    assert any("id b" in m for m in skip_logs(caplog, "bad_row"))


def test_toc_bad_records_are_counted_with_their_number(layout, caplog):
    images, tmp = layout["images"], layout["tmp"]
    bad_entries(images)
    metadata = tmp / "train_metadata.json"
    metadata.write_bytes(bad_utf8(json.dumps([
        toc_row("good.jpg"),
        ["not", "an", "object"],                 # record 2
        7,                                       # record 3
        toc_row("good.jpg", timezone="CAFE"),    # record 4: not UTF-8
        toc_row("folder.jpg"),                   # record 5
        toc_row("gone.jpg"),                     # record 6
        toc_row("loop.jpg"),                     # record 7
        toc_row("good.jpg"),
    ], indent=4)))
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_toc(metadata, images, tmp / "out")
    check_bad_records(summary, tmp / "out", caplog, {"bad_row": 3, **BAD_IMAGES}, 2,
                      {"bad_row": ["record 2", "record 3", "record 4"], "unreadable_image": ["record 5", "record 7"],
                       "missing_image": ["record 6"]})
    lines = tmp / "meta.jsonl"  # JSON lines: a line that is not UTF-8 outside any string does not parse
    lines.write_bytes(json.dumps(toc_row("good.jpg")).encode() + b"\n\xff\xfe{\n" + b"[3]\n")
    assert convert_toc(lines, images, tmp / "lines")["skipped"] == {"bad_row": 2}


def test_meme_bad_records_are_counted_with_their_sentence(layout, caplog):
    images, tmp = layout["images"], layout["tmp"]
    bad_entries(images)
    save_jpeg(images / "m1.jpg")
    ids = ["m1", "m2", "folder", "gone", "loop"]
    sentences = [{"video_id": "m1", "caption": "when the code works"},
                 5,                                                   # sentence 2: not an object
                 ["a", "list"],                                       # sentence 3
                 {"video_id": "m2", "caption": "CAFE time"},          # sentence 4: not UTF-8
                 {"video_id": ["m1"], "caption": "an id that is a list"},  # sentence 5
                 {"video_id": "folder", "caption": "a directory"},    # sentence 6
                 {"video_id": "gone", "caption": "a broken symlink"},  # sentence 7
                 {"video_id": "loop", "caption": "a symlink loop"}]   # sentence 8
    train, emotions = meme_files(tmp, ids, sentences)
    train.write_bytes(bad_utf8(train.read_text()))
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_meme(train, emotions, images, tmp / "out")
    check_bad_records(summary, tmp / "out", caplog, {"bad_row": 4, **BAD_IMAGES}, 1,
                      {"bad_row": ["sentence 2", "sentence 3", "sentence 4", "sentence 5"],
                       "unreadable_image": ["sentence 6", "sentence 8"], "missing_image": ["sentence 7"]})
    # the test layout: an item that is not an object is one bad row, not a file the converter refuses
    test = tmp / "test.json"
    test.write_text(json.dumps({"m1": {"gt": "when the code works", "titles": ["a cat"]}, "m2": [1, 2], "x": 3}))
    summary = convert_meme(test, emotions, images, tmp / "test-out")
    assert (summary["written"], summary["skipped"]) == (1, {"bad_row": 2})


def test_imagecode_bad_sets_and_descriptions_are_counted_with_their_set(layout, caplog):
    images, tmp = layout["images"], layout["tmp"]
    image_set(images / "open-images-good")
    image_set(images / "video-dir", 9)
    (images / "video-dir" / "img9.jpg").mkdir()                   # a directory named like the 10th image
    image_set(images / "video-gone", 9)
    (images / "video-gone" / "img9.jpg").symlink_to(images / "nowhere.jpg")
    image_set(images / "video-loop", 9)
    (images / "video-loop" / "img9.jpg").symlink_to("img10.jpg")
    (images / "video-loop" / "img10.jpg").symlink_to("img9.jpg")
    image_set(images / "video-link", 9)
    (images / "video-link" / "img9.jpg").symlink_to(layout["up"])  # a symlinked frame that leads out
    sets = {"open-images-good": {"3": "the dog looks left", "4": "CAFE au lait"},  # set 1; "4" is not UTF-8
            "video-list": [1, 2],                                   # set 2: not an object
            "video-number": 5,                                      # set 3
            "video-dir": {"0": "x"}, "video-gone": {"0": "x"}, "video-loop": {"0": "x"},  # sets 4-6
            "video-link": {"0": "x"},                               # set 7
            "CAFE-set": {"0": "x"}}                                 # set 8: its name is not UTF-8
    descriptions = tmp / "train_data.json"
    descriptions.write_bytes(bad_utf8(json.dumps(sets)))
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_imagecode(descriptions, images, tmp / "out")
    assert (summary["read"], summary["written"]) == (9, 1)
    assert summary["skipped"] == {"bad_row": 1, "bad_set": 3, "not_10_images": 3, "outside_images_root": 1}
    assert summary["sets"]["skipped"] == {"bad_set": 3, "not_10_images": 3, "outside_images_root": 1}
    assert json.loads((tmp / "out" / SUMMARY_FILE).read_text()) == summary
    assert [m["source"] for m in written(tmp / "out")] == ["open-images-good/3"]
    logged = {"bad_row": ["set 1"], "bad_set": ["set 2", "set 3", "set 8"],
              "not_10_images": ["set 4", "set 5", "set 6"], "outside_images_root": ["set 7"]}
    for reason, places in logged.items():
        assert all(any(where in m for m in skip_logs(caplog, reason)) for where in places), (reason, caplog.messages)


def test_folder_bad_entries_are_counted_by_name(layout, caplog):
    """A folder has no records but its files: a broken symlink and a loop are counted under their path; a
    directory named like an image is a folder, walked like any other (not a file to read)."""
    root = layout["images"]
    save_jpeg(root / "cat" / "good.jpg")
    bad_entries(root / "cat")
    save_jpeg(root / "cat" / "folder.jpg" / "inside.jpg")
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        summary = convert_folder(root, layout["tmp"] / "out")
    assert (summary["read"], summary["written"]) == (5, 2)
    assert summary["skipped"] == {"missing_image": 1, "unreadable_image": 2}  # gone.jpg; loop.jpg, loop2.jpg
    assert sorted(m["source"] for m in written(layout["tmp"] / "out")) == ["cat/folder.jpg/inside.jpg", "cat/good.jpg"]
    assert any("cat/loop.jpg" in m for m in skip_logs(caplog, "unreadable_image"))


def test_captions_symlink_loop_is_a_counted_skip_not_a_traceback(layout):
    bad_entries(layout["images"])
    table = layout["tmp"] / "pairs.csv"
    table.write_text("image,caption\ngood.jpg,a photo\nloop.jpg,a loop\n")
    summary = convert_captions(table, layout["tmp"] / "out", images_root=layout["images"])
    assert (summary["written"], summary["skipped"]) == (1, {"unreadable_image": 1})

