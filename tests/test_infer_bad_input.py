"""Issue #18: bad input is named, never fatal, and never costs the outputs of an earlier run.

One fresh (untrained) tiny model with the retrieval and contextual heads is exported once for the
module (as tests/test_task_round_trip.py does); the rest needs no model.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import export_untrained, tiny_config


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """(task -> synthetic shards, export folder) of a fresh tiny model with retrieval and contextual heads."""
    from shards.synth import generate, get_synth
    from training.validation import config_from_dict

    base = tmp_path_factory.mktemp("bad_input")
    shards, tasks = {}, []
    for task in ("retrieval", "contextual"):
        shards[task] = base / task
        generate(shards[task], task=task, n_train=4, n_val=6, seed=0, shard_size=10, image_size=64)
        options = get_synth(task).run_options(shards[task]) if get_synth(task).run_options else {}
        tasks.append({"name": task, "train": str(shards[task] / "train"), "val": str(shards[task] / "val"),
                      "options": options})
    export_untrained(config_from_dict(tiny_config(shards["retrieval"], base / "run", tasks=tasks)), base / "export")
    return shards, base / "export"


@pytest.fixture(scope="module")
def onnx_model(export):
    from serving.infer import ExportedModel
    from serving.runtime import RuntimeOptions

    return ExportedModel(export[1], RuntimeOptions(providers=("cpu",)))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _raw_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar the ShardSetWriter would refuse to write (its json is dumped from a dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (40 * seed % 256, 100, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_set(folder: Path, n_shards: int = 2, per_shard: int = 2) -> None:
    from shards.writer import ShardSetWriter

    with ShardSetWriter(folder, shard_size=per_shard) as writer:
        for i in range(n_shards * per_shard):
            writer.write(f"k{i:04d}", {"png": _png(i)}, {"caption": f"sample {i}"})


NOT_OBJECTS = {"alist": b'["caption", "context"]', "anumber": b"5", "astring": b'"a caption"'}


# --------------------------------------------------------------------------- 1. json that is not an object


def test_meme_and_contextual_name_json_that_is_not_an_object(tmp_path):
    """Shard items with a list / number / string json become ``bad_json`` items; the predictors refuse them too."""
    from serving.items import Item, shard_items
    from serving.predictors.contextual import ContextualPredictor
    from serving.predictors.meme import MemePredictor
    from serving.preprocess import Preprocess

    shard = _raw_tar(tmp_path / "memes.tar", [(key, {"png": _png(), "json": js}) for key, js in NOT_OBJECTS.items()]
                     + [("good", {"png": _png(), "json": json.dumps({"caption": "c", "context": ""}).encode()})])
    items = {it.key: it for it in shard_items(str(shard))}
    meme, contextual = MemePredictor.__new__(MemePredictor), ContextualPredictor.__new__(ContextualPredictor)
    meme.model = contextual.model = type("Model", (), {"preprocess": Preprocess(32, (0.5,) * 3, (0.5,) * 3)})()
    contextual.meta = {"num_candidates": 2}
    for key in NOT_OBJECTS:
        assert items[key].error.startswith("bad_json") and "not an object" in items[key].error, items[key]
        assert meme.load(items[key]) == items[key].error
    assert not isinstance(meme.load(items["good"]), str)
    # an Item built by other code (a plugin, a caller of infer()) with such a json: named, not a crash
    for meta in ([1, 2], 5, "text"):
        frames = Item("k", "s", meta=meta, frames=[_png(), _png(1)])
        assert meme.load(Item("k", "s", _png(), meta)).startswith("bad_json: json must be an object")
        assert contextual.load(frames).startswith("bad_json: json must be an object")


def test_contextual_run_goes_on_past_json_that_is_not_an_object(export, onnx_model, tmp_path):
    from serving.infer import infer, shard_items
    from shards.samples import tar_samples

    shards, _ = export
    good = str(shards["contextual"] / "val" / "shard-000000.tar")
    frames = next(s for s in tar_samples(good, []))
    frames = {ext: data for ext, data in frames.items() if not ext.startswith("__") and ext != "json"}
    bad = _raw_tar(tmp_path / "bad" / "odd.tar", [(key, {**frames, "json": js}) for key, js in NOT_OBJECTS.items()])
    summary = infer(onnx_model, shard_items([good, str(bad)]), ["contextual"], tmp_path / "out", batch_size=4)
    assert summary == {"items": 9, "predicted": 6, "errors": 3, "tasks": ["contextual"]}
    errors = _jsonl(tmp_path / "out" / "errors.jsonl")
    assert {(e["key"], e["source"]) for e in errors} == {(key, str(bad)) for key in NOT_OBJECTS}
    assert all(e["error"].startswith("bad_json") and e["tasks"] == ["contextual"] for e in errors)
    assert len(_jsonl(tmp_path / "out" / "contextual.jsonl")) == 6


# --------------------------------------------------------------------------- 2. odd names in an image folder


def _photos(folder: Path) -> Path:
    """Two images, a folder named like one (holding a third), and a broken symbolic link."""
    (folder / "album.jpg").mkdir(parents=True)
    for name in ("a.png", "b.png", "album.jpg/inner.png"):
        (folder / name).write_bytes(_png(len(name)))
    os.symlink(folder / "gone.png", folder / "link.jpg")
    return folder


def test_folder_named_like_an_image_and_broken_link_are_skipped_with_a_reason(onnx_model, tmp_path):
    from serving.infer import count_items, folder_items, infer

    photos = _photos(tmp_path / "photos")
    assert count_items(str(photos), "images") == 5
    summary = infer(onnx_model, folder_items(photos), ["retrieval"], tmp_path / "out", batch_size=2)
    assert summary == {"items": 5, "predicted": 3, "errors": 2, "tasks": ["retrieval"]}
    errors = {e["key"]: e["error"] for e in _jsonl(tmp_path / "out" / "errors.jsonl")}
    assert errors.keys() == {"album.jpg", "link.jpg"}
    assert errors["album.jpg"].startswith("missing_image: a folder")
    assert errors["link.jpg"].startswith("missing_image: broken symbolic link") and "gone.png" in errors["link.jpg"]
    assert [r["key"] for r in _jsonl(tmp_path / "out" / "retrieval.jsonl")] == ["a.png", "album.jpg/inner.png", "b.png"]


def test_a_failed_run_leaves_the_previous_outputs_untouched(onnx_model, tmp_path):
    """Outputs go to a hidden folder first and replace the earlier ones only when the run succeeds."""
    from serving.infer import folder_items, infer

    photos, out = _photos(tmp_path / "photos"), tmp_path / "out"
    first = infer(onnx_model, folder_items(photos), ["retrieval"], out, batch_size=2)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert {"retrieval.jsonl", "errors.jsonl", "summary.json", "gallery/embeddings.npy", "gallery/keys.json"} <= set(before)

    def dies_mid_way():
        items = list(folder_items(photos))
        yield from items[:3]  # a whole batch is predicted and written first
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        infer(onnx_model, dies_mid_way(), ["retrieval"], out, batch_size=2)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing truncated, nothing half-written, no temporary folder left
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    (photos / "album.jpg" / "inner.png").unlink()
    assert infer(onnx_model, folder_items(photos), ["retrieval"], out, batch_size=2)["items"] == first["items"] - 1
    assert len(json.loads((out / "gallery" / "keys.json").read_text())) == 2  # a success replaces them


def test_a_query_run_is_staged_too_and_keeps_the_image_runs_counts(onnx_model, tmp_path):
    from serving.infer import Settings, answer_queries, folder_items, infer

    photos, out = _photos(tmp_path / "photos"), tmp_path / "out"
    counts = infer(onnx_model, folder_items(photos), ["retrieval"], out, batch_size=2)
    with pytest.raises(FileNotFoundError, match="no embeddings.npy"):
        answer_queries(onnx_model, ["a photo"], out, ["retrieval"], Settings(options={"gallery": tmp_path / "none"}))
    assert len(_jsonl(out / "retrieval.jsonl")) == 3 and [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    answer_queries(onnx_model, ["a photo", "a dog"], out, ["retrieval"], Settings(options={"gallery": out / "gallery"}))
    assert [len(r["results"]) for r in _jsonl(out / "retrieval.jsonl")] == [3, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in counts} == counts and "providers" in summary


# --------------------------------------------------------------------------- 3. a torn sizes.json


def test_torn_sizes_json_is_an_error_naming_the_file(export, tmp_path, capsys):
    from launch.infer import main
    from serving.items import count_items, shard_items
    from shards.samples import count_samples, expand_urls

    folder = tmp_path / "val"
    _write_set(folder)
    sizes = folder / "sizes.json"
    sizes.write_text(sizes.read_text()[:25])  # torn, as a copy cut short
    for read in (lambda: count_items(str(folder), "shards"), lambda: count_items(str(folder / "shard-000000.tar"), "shards"),
                 lambda: list(shard_items(str(folder))), lambda: expand_urls(str(folder)), lambda: count_samples(str(folder))):
        with pytest.raises(ValueError, match=f"{sizes}: sizes.json is not valid JSON"):
            read()
    assert main(["--model", str(export[1]), "--shards", str(folder), "--out", str(tmp_path / "out"),
                 "--tasks", "retrieval", "--providers", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"infer error: {sizes}: sizes.json is not valid JSON" in err and "delete sizes.json" in err
    assert not (tmp_path / "out" / "retrieval.jsonl").exists()


# --------------------------------------------------------------------------- 4. counts that mean nothing


@pytest.mark.parametrize("option, value", [("--top-k", "0"), ("--top-k", "-1"), ("--batch-size", "0"),
                                           ("--batch-size", "-3"), ("--workers", "-1"), ("--workers", "0"),
                                           ("--threads", "-1"), ("--trt-max-batch", "-1")])
def test_counts_that_mean_nothing_are_refused_before_any_work(option, value, tmp_path, capsys):
    from launch.infer import main

    with pytest.raises(SystemExit) as exit_:  # argparse: before the model is opened or anything is read
        main(["--model", str(tmp_path / "no-model"), "--images", str(tmp_path), "--out", str(tmp_path / "out"),
              option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be an integer of " in err and f"or more, got {int(value)}" in err, err
    assert not (tmp_path / "out").exists()


def test_counts_that_mean_something_still_parse():
    from launch.infer import build_parser

    args = build_parser().parse_args(["--model", "m", "--images", "i", "--out", "o", "--top-k", "1", "--batch-size", "1",
                                      "--workers", "1", "--threads", "0", "--trt-max-batch", "0"])
    assert (args.top_k, args.batch_size, args.workers, args.threads, args.trt_max_batch) == (1, 1, 1, 0, 0)


def test_infer_refuses_a_batch_of_nothing(onnx_model, tmp_path):
    from serving.infer import Settings, infer

    with pytest.raises(ValueError, match="batch_size and top_k must be 1 or more"):
        infer(onnx_model, [], ["retrieval"], tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="1 or more"):
        infer(onnx_model, [], ["retrieval"], tmp_path, Settings(top_k=0))


# --------------------------------------------------------------------------- 5. which *.tar files are shards


def test_a_folder_with_sizes_json_reads_the_shards_it_lists(tmp_path, caplog):
    from serving.items import count_items, shard_items
    from shards.samples import count_samples, expand_urls

    folder = tmp_path / "val"
    _write_set(folder)
    _raw_tar(folder / "backup.tar", [("stray", {"png": _png(), "json": b'{"caption": "not a sample of this set"}'})])
    listed = [str(folder / "shard-000000.tar"), str(folder / "shard-000001.tar")]
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        assert expand_urls(str(folder)) == listed
    assert any("backup.tar" in m and "not read" in m for m in caplog.messages), caplog.messages
    assert [it.key for it in shard_items(str(folder))] == ["k0000", "k0001", "k0002", "k0003"]
    assert count_items(str(folder), "shards") == 4 == count_samples(str(folder))
    assert expand_urls(str(folder / "*.tar")) == [str(folder / "backup.tar"), *listed]  # named explicitly: read

    # a shard named like the writer's but not listed is read, counted by reading (tests/test_shards.py)
    _raw_tar(folder / "shard-000002.tar", [("extra", {"png": _png(), "json": b'{"caption": "added by hand"}'})])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        assert expand_urls(str(folder)) == [*listed, str(folder / "shard-000002.tar")]
    assert any("shard-000002.tar" in m and "not listed" in m for m in caplog.messages), caplog.messages
    assert count_samples(str(folder)) == 5 and count_items(str(folder), "shards") is None

    # listed but missing: an error naming it
    (folder / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) listed in sizes.json missing: shard-000001.tar"):
        expand_urls(str(folder))
    # no sizes.json: every *.tar, as before
    (folder / "sizes.json").unlink()
    assert expand_urls(str(folder)) == [str(folder / n) for n in ("backup.tar", "shard-000000.tar", "shard-000002.tar")]


def test_sizes_json_names_stay_in_their_folder_and_other_layouts_are_ignored(tmp_path):
    from shards.samples import expand_urls

    _write_set(tmp_path / "val")
    sizes = tmp_path / "val" / "sizes.json"
    sizes.write_text(json.dumps({"shards": {"../elsewhere.tar": 3}}))
    with pytest.raises(ValueError, match="not a file name in this folder"):
        expand_urls(str(tmp_path / "val"))
    sizes.write_text(json.dumps({"shards": {"shard-000000.tar": "many"}}))
    with pytest.raises(ValueError, match="not a sample count"):
        expand_urls(str(tmp_path / "val"))
    sizes.write_text(json.dumps({"shard-000000.tar": 2, "shard-000001.tar": 2}))  # open_clip's flat layout
    assert len(expand_urls(str(tmp_path / "val"))) == 2
