"""Tests of the shards package: writing, URL expansion, synthetic data, loaders, bad-data handling, converters."""
from __future__ import annotations

import ast
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from PIL import Image

from shards import convert, synth
from shards.convert.captions import convert_captions
from shards.reader import make_eval_loader, make_loader
from shards.samples import (
    SkipLog,
    count_samples,
    epoch_shard_order,
    expand_urls,
    read_shard,
    read_skip_logs,
    summarize_skips,
)
from shards.writer import ShardSetWriter, encode_image

# --------------------------------------------------------------------------- helpers


def tiny_image(index: int, fmt: str = "png") -> bytes:
    return encode_image(Image.new("RGB", (8, 8), (index % 256, 40, 90)), fmt)


def write_shard_set(out: Path, n_shards: int, per_shard: int, prefix: str = "s", n_samples: int | None = None) -> list[str]:
    """Shards of tiny PNG samples (n_shards full ones unless n_samples says otherwise); returns the keys."""
    keys = [f"{prefix}{i:04d}" for i in range(n_samples if n_samples is not None else n_shards * per_shard)]
    with ShardSetWriter(out, shard_size=per_shard) as writer:
        for i, key in enumerate(keys):
            writer.write(key, {"png": tiny_image(i)}, {"task": "retrieval", "caption": f"c{i}", "label": "x",
                                                      "source": f"src/{i}"})
    return keys


def key_and_width(sample: dict[str, Any]) -> dict[str, Any]:
    """A map_fn that checks the decoded types and keeps what the tests compare."""
    image = sample["png"]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert isinstance(sample["json"], dict) and sample["__url__"].endswith(".tar")
    return {"key": sample["__key__"], "width": image.width}


def fail_on_key(bad_key: str):
    def map_fn(sample: dict[str, Any]) -> dict[str, Any]:
        if sample["__key__"] == bad_key:
            raise RuntimeError("map_fn exploded")
        return key_and_width(sample)

    return map_fn


def loader_keys(loader, max_batches: int | None = None) -> list[str]:
    keys: list[str] = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        keys.extend(batch["key"])
    return keys


def batches_of_keys(loader, count: int) -> list[list[str]]:
    batches = []
    for batch in loader:
        batches.append(list(batch["key"]))
        if len(batches) == count:
            break
    return batches


def read_all_samples(directory: Path) -> list[dict[str, Any]]:
    return list(wds.WebDataset(expand_urls(str(directory)), shardshuffle=False))


# --------------------------------------------------------------------------- writer


def test_writer_splits_into_shards_and_indexes_sizes(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=2, per_shard=10)
    with ShardSetWriter(tmp_path / "odd", shard_size=10) as writer:
        for i in range(25):
            writer.write(f"k{i}", {"png": tiny_image(i)}, {"caption": "é"})
    sizes = json.loads((tmp_path / "odd" / "sizes.json").read_text())
    assert sizes == {"shards": {"shard-000000.tar": 10, "shard-000001.tar": 10, "shard-000002.tar": 5}, "total": 25}
    samples = read_all_samples(tmp_path / "odd")
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(25)]
    assert json.loads(samples[0]["json"]) == {"caption": "é"}
    assert Image.open(io.BytesIO(samples[3]["png"])).getpixel((0, 0)) == (3, 40, 90)
    assert count_samples(str(tmp_path)) == len(keys)


def test_writer_validates_samples_and_output_dir(tmp_path: Path) -> None:
    with ShardSetWriter(tmp_path / "a", shard_size=5) as writer:
        for bad_key in ("with.dot", "", "a/b"):
            with pytest.raises(ValueError, match="invalid sample key"):
                writer.write(bad_key, {"png": tiny_image(0)}, {})
        with pytest.raises(ValueError, match="invalid image member"):
            writer.write("k", {"gif": b"x"}, {})
        with pytest.raises(ValueError, match="at least one image"):
            writer.write("k", {}, {})
        writer.write("k", {"0.jpg": tiny_image(0, "jpg"), "1.jpg": tiny_image(1, "jpg")}, {})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("k", {"png": tiny_image(0)}, {})
    assert set(read_all_samples(tmp_path / "a")[0]) >= {"0.jpg", "1.jpg", "json"}
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardSetWriter(tmp_path / "a")
    with ShardSetWriter(tmp_path / "a", overwrite=True):
        pass
    assert list((tmp_path / "a").glob("*.tar")) == []
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"shards": {}, "total": 0}


def test_encode_image_round_trips() -> None:
    image = Image.new("RGB", (16, 12), (200, 10, 10))
    assert Image.open(io.BytesIO(encode_image(image, "png"))).getpixel((3, 3)) == (200, 10, 10)
    decoded = Image.open(io.BytesIO(encode_image(image, "jpg")))
    assert decoded.format == "JPEG" and decoded.size == (16, 12)
    with pytest.raises(ValueError):
        encode_image(image, "bmp")


# --------------------------------------------------------------------------- expand_urls and counting


def test_expand_urls_brace_glob_dir_and_list(tmp_path: Path) -> None:
    write_shard_set(tmp_path / "a", n_shards=3, per_shard=2)
    write_shard_set(tmp_path / "b", n_shards=2, per_shard=2)
    a = [str(tmp_path / "a" / f"shard-00000{i}.tar") for i in range(3)]
    b = [str(tmp_path / "b" / f"shard-00000{i}.tar") for i in range(2)]
    assert expand_urls(str(tmp_path / "a" / "shard-{000000..000002}.tar")) == a
    assert expand_urls(str(tmp_path / "a" / "*.tar")) == a
    assert expand_urls(tmp_path / "a") == a
    assert expand_urls([str(tmp_path / "a"), str(tmp_path / "b" / "shard-*.tar")]) == a + b
    assert count_samples(a + b) == 10


def test_expand_urls_missing_names_pattern_and_files(tmp_path: Path) -> None:
    write_shard_set(tmp_path, n_shards=2, per_shard=2)
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls(pattern)
    with pytest.raises(FileNotFoundError, match="shard-000004.tar"):
        expand_urls(str(tmp_path / "shard-{000000..000004}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        expand_urls(str(tmp_path / "missing.tar"))


def test_count_samples_reads_unlisted_shards(tmp_path: Path) -> None:
    write_shard_set(tmp_path, n_shards=2, per_shard=7)
    (tmp_path / "sizes.json").write_text(json.dumps({"shards": {"shard-000000.tar": 7}, "total": 7}))
    assert count_samples(str(tmp_path)) == 14
    (tmp_path / "sizes.json").unlink()
    assert count_samples(str(tmp_path)) == 14


# --------------------------------------------------------------------------- synthetic data


def small_synth(out: Path, seed: int = 0, n_train: int = 60, n_val: int = 20) -> dict[str, Any]:
    return synth.generate(out, task="retrieval", n_train=n_train, n_val=n_val, seed=seed, shard_size=25, image_size=32)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synth_is_byte_identical_per_seed(tmp_path: Path) -> None:
    small_synth(tmp_path / "one")
    small_synth(tmp_path / "two")
    small_synth(tmp_path / "other", seed=1)
    one, two, other = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two"), tree_bytes(tmp_path / "other")
    assert set(one) == {"meta.json", "train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                        "train/sizes.json", "val/shard-000000.tar", "val/sizes.json"}
    assert one == two
    assert one["train/shard-000000.tar"] != other["train/shard-000000.tar"]


def test_synth_samples_follow_the_layout_and_hold_out_triples(tmp_path: Path) -> None:
    meta = synth.generate(tmp_path, task="retrieval", n_train=600, n_val=300, seed=3, shard_size=200, image_size=48)
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["counts"] == {"train": 600, "val": 300} and len(meta["classes"]) == 32
    held_out = {tuple(t) for t in meta["held_out"]}
    assert len(held_out) == 32  # 20% of 8 colours x 4 shapes x 5 positions
    train = [json.loads(s["json"]) for s in read_all_samples(tmp_path / "train")]
    val_samples = read_all_samples(tmp_path / "val")
    val = [json.loads(s["json"]) for s in val_samples]
    assert len(train) == 600 and len(val) == 300
    for sample in train:
        assert all((o["colour"], o["shape"], o["position"]) not in held_out for o in sample["objects"])
    val_main = [(s["objects"][0]["colour"], s["objects"][0]["shape"], s["objects"][0]["position"]) for s in val]
    assert any(triple in held_out for triple in val_main)
    assert [s["held_out"] for s in val] == [triple in held_out for triple in val_main]
    for sample in train + val:
        main = sample["objects"][0]
        assert sample["task"] == "retrieval" and sample["label"] == f"{main['colour']} {main['shape']}"
        assert main["colour"] in sample["caption"] and sample["source"].startswith("synth/retrieval/seed3/")
        positions = [o["position"] for o in sample["objects"]]
        assert 1 <= len(positions) <= 3 and len(set(positions)) == len(positions)
    assert any(s["caption"].count(" ") > 8 for s in train)  # multi-object captions exist
    assert any(s["caption"].startswith(("two ", "a picture of two", "an image of two")) for s in train + val)
    image = Image.open(io.BytesIO(val_samples[0]["png"]))
    assert image.size == (48, 48) and image.mode == "RGB"


def test_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.main(["--out", str(tmp_path), "--task", "retrieval", "--train", "10", "--val", "4", "--shard-size", "5",
                "--image-size", "32"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"train": 10, "val": 4}
    assert count_samples(str(tmp_path / "train")) == 10
    with pytest.raises(FileExistsError):
        synth.main(["--out", str(tmp_path), "--task", "retrieval", "--train", "10", "--val", "4"])


# --------------------------------------------------------------------------- loaders


def test_ranks_and_workers_read_disjoint_shards_covering_the_epoch(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=8, per_shard=10)
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(str(tmp_path), map_fn=key_and_width, batch_size=5, rank=rank, world_size=2,
                             num_workers=2, seed=7, shuffle_buffer=16, infinite=False)
        per_rank.append(loader_keys(loader))
    assert len(per_rank[0]) == len(per_rank[1]) == 40
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == keys


def test_too_few_shards_is_a_clear_error(tmp_path: Path) -> None:
    write_shard_set(tmp_path, n_shards=3, per_shard=2)
    with pytest.raises(ValueError, match=r"3 shard\(s\).*2 rank\(s\) x 2 worker\(s\).*resample"):
        make_loader(str(tmp_path), map_fn=key_and_width, batch_size=2, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="rank"):
        make_loader(str(tmp_path), map_fn=key_and_width, batch_size=2, rank=2, world_size=2, num_workers=0)


def test_resample_serves_two_ranks_from_one_shard(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=1, per_shard=6)
    for rank in (0, 1):
        one_pass = make_loader(str(tmp_path), map_fn=key_and_width, batch_size=3, rank=rank, world_size=2,
                               num_workers=2, resample=True, infinite=False)
        assert sorted(loader_keys(one_pass)) == sorted(keys + keys)  # each of 2 workers draws the only shard
        endless = make_loader(str(tmp_path), map_fn=key_and_width, batch_size=4, rank=rank, world_size=2,
                              num_workers=0, resample=True, shuffle_buffer=4)
        streamed = loader_keys(endless, max_batches=9)
        assert len(streamed) == 36 and set(streamed) == set(keys)


def test_infinite_stream_reshuffles_each_epoch_deterministically(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=4, per_shard=5)
    common = dict(map_fn=key_and_width, batch_size=5, num_workers=0, seed=11, shuffle_buffer=8)
    first = batches_of_keys(make_loader(str(tmp_path), **common), 8)
    again = batches_of_keys(make_loader(str(tmp_path), **common), 8)
    resumed = batches_of_keys(make_loader(str(tmp_path), start_epoch=1, **common), 4)
    epoch0 = sum(first[:4], [])
    epoch1 = sum(first[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == keys
    assert epoch0 != epoch1
    assert first == again
    assert resumed == first[4:]


def test_every_epoch_of_an_endless_stream_is_split_disjointly_across_ranks(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=4, per_shard=5)
    common = dict(map_fn=key_and_width, batch_size=5, world_size=2, num_workers=0, seed=5, shuffle_buffer=4)
    rank0 = batches_of_keys(make_loader(str(tmp_path), rank=0, **common), 6)
    rank1 = batches_of_keys(make_loader(str(tmp_path), rank=1, **common), 6)
    for epoch in range(3):
        ours, theirs = sum(rank0[2 * epoch: 2 * epoch + 2], []), sum(rank1[2 * epoch: 2 * epoch + 2], [])
        assert sorted(ours + theirs) == keys
    assert epoch_shard_order(expand_urls(str(tmp_path)), 5, 0) != epoch_shard_order(expand_urls(str(tmp_path)), 5, 1)


def test_eval_loader_reads_everything_in_order_with_partial_batch(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, n_shards=3, per_shard=8, n_samples=23)
    urls = expand_urls(str(tmp_path))
    batches = batches_of_keys(make_eval_loader(urls, map_fn=key_and_width, batch_size=5), 100)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sum(batches, []) == keys
    parallel = loader_keys(make_eval_loader(urls, map_fn=key_and_width, batch_size=5, num_workers=2))
    assert sorted(parallel) == keys


def test_opening_and_reading_loaders_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Every evaluation opens a loader: drawing its workers' seed from torch's global RNG would move the
    training's dropout masks and main-process augmentations with the evaluation schedule."""
    write_shard_set(tmp_path, n_shards=2, per_shard=4)
    urls = expand_urls(str(tmp_path))
    torch.manual_seed(0)
    expected = torch.get_rng_state()
    loader_keys(make_eval_loader(urls, map_fn=key_and_width, batch_size=3))
    loader_keys(make_eval_loader(urls, map_fn=key_and_width, batch_size=3, num_workers=1))
    batches_of_keys(make_loader(urls, map_fn=key_and_width, batch_size=2, num_workers=1, shuffle_buffer=2), 2)
    assert torch.equal(torch.get_rng_state(), expected)


def worker_draw(sample: dict[str, Any]) -> dict[str, Any]:
    """A map_fn drawing from the worker's torch RNG, as a random augmentation does."""
    return {"key": sample["__key__"], "draw": int(torch.randint(10**9, ()))}


def test_worker_seeds_follow_seed_and_shards_not_the_global_rng(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_shard_set(tmp_path / name, n_shards=2, per_shard=4, prefix=name)

    def draws(name: str, global_seed: int, rank: int = 0) -> list[int]:
        torch.manual_seed(global_seed)
        loader = make_loader(str(tmp_path / name), map_fn=worker_draw, batch_size=2, rank=rank, world_size=2,
                             num_workers=1, seed=3, shuffle_buffer=1)
        return [int(d) for batch in itertools.islice(loader, 2) for d in batch["draw"]]

    assert draws("a", global_seed=1) == draws("a", global_seed=2)  # reproducible, whatever ran before
    assert draws("a", global_seed=1) != draws("b", global_seed=1)  # each task's loader its own stream
    assert draws("a", global_seed=1) == draws("a", global_seed=1, rank=1)  # ranks share it, as before


# --------------------------------------------------------------------------- bad data


def truncate_inside_member(shard: Path, member_name: str) -> None:
    """Cut the file in the middle of one member's data, as an interrupted copy would."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(member_name)
    with open(shard, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)


def write_raw_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    """Samples the ShardSetWriter would refuse (bad json, missing members), written with plain webdataset."""
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def build_broken_shard_set(root: Path) -> dict[str, Any]:
    """Shard 0: a truncated JPEG and a non-image member; shard 1: cut inside b0005.png; shard 2: raw bad samples."""
    with ShardSetWriter(root, shard_size=10) as writer:
        for i in range(10):
            image = tiny_image(i, "jpg")[:60] if i == 3 else b"not an image" if i == 7 else tiny_image(i)
            writer.write(f"a{i:04d}", {"png": image}, {"caption": "c"})
        for i in range(10):
            writer.write(f"b{i:04d}", {"png": tiny_image(i)}, {"caption": "c"})
    truncate_inside_member(root / "shard-000001.tar", "b0005.png")
    write_raw_shard(root / "shard-000002.tar", [
        {"__key__": "c0000", "png": tiny_image(0), "json": b'{"caption": "ok"}'},
        {"__key__": "c0001", "png": tiny_image(1), "json": b'{"caption": '},
        {"__key__": "c0002", "png": tiny_image(2)},
        {"__key__": "c0003", "json": b'{"caption": "no image"}'},
        {"__key__": "c0004", "png": tiny_image(4), "json": b'["not", "an", "object"]'},
        {"__key__": "c0005", "png": tiny_image(5), "json": b'{"caption": "ok"}'},
        {"__key__": "c0006", "png": tiny_image(6), "json": b'{"caption": "map fails"}'},
    ])
    shard = [str(root / f"shard-00000{i}.tar") for i in range(3)]
    expected_skips = {
        (shard[0], "a0003", "bad_image"), (shard[0], "a0007", "bad_image"),
        (shard[1], "b0005", "corrupt_tar"), (shard[1], None, "corrupt_tar"),
        (shard[2], "c0001", "bad_json"), (shard[2], "c0002", "missing_json"), (shard[2], "c0003", "missing_image"),
        (shard[2], "c0004", "bad_json"), (shard[2], "c0006", "map_error"),
    }
    good = [f"a{i:04d}" for i in range(10) if i not in (3, 7)] + [f"b{i:04d}" for i in range(5)] + ["c0000", "c0005"]
    return {"urls": shard, "skips": expected_skips, "good": good}


def test_bad_samples_are_skipped_and_logged_per_worker(tmp_path: Path) -> None:
    broken = build_broken_shard_set(tmp_path / "data")
    log_dir = tmp_path / "skipped"
    loader = make_loader(broken["urls"], map_fn=fail_on_key("c0006"), batch_size=1, num_workers=2,
                         error_log_dir=log_dir, infinite=False)
    assert sorted(loader_keys(loader)) == broken["good"]
    records = read_skip_logs(log_dir)
    assert {(r["shard"], r["key"], r["reason"]) for r in records} == broken["skips"]
    assert len(records) == len(broken["skips"])
    assert all(r["error"] for r in records)
    assert "map_fn exploded" in next(r["error"] for r in records if r["reason"] == "map_error")
    assert {p.name for p in log_dir.iterdir()} == {"skipped-rank0-worker0.jsonl", "skipped-rank0-worker1.jsonl"}
    assert summarize_skips(records) == {"count": 9, "by_reason": {
        "bad_image": 2, "bad_json": 2, "corrupt_tar": 2, "map_error": 1, "missing_image": 1, "missing_json": 1}}


def test_eval_loader_shares_bad_data_handling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = build_broken_shard_set(tmp_path / "data")
    loader = make_eval_loader(broken["urls"], map_fn=fail_on_key("c0006"), batch_size=4,
                              error_log_dir=tmp_path / "log", rank=3)
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        keys = loader_keys(loader)
    assert keys == sorted(broken["good"])
    assert {(r["shard"], r["key"], r["reason"]) for r in read_skip_logs(tmp_path / "log")} == broken["skips"]
    assert (tmp_path / "log" / "skipped-rank3-worker0.jsonl").exists()
    assert any("shard-000000.tar" in m and "a0003" in m and "bad_image" in m for m in caplog.messages)


def test_stream_with_no_usable_sample_raises_instead_of_hanging(tmp_path: Path) -> None:
    write_raw_shard(tmp_path / "shard-000000.tar", [{"__key__": "x", "json": b"{}"}])
    loader = make_loader(str(tmp_path), map_fn=key_and_width, batch_size=1, num_workers=0)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


# --------------------------------------------------------------------------- converters


def save_image(path: Path, colour: tuple[int, int, int], fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10), colour).save(path, format=fmt)
    return path.read_bytes()


def corrupt_jpeg(path: Path) -> None:
    save_image(path, (1, 2, 3), "JPEG")
    path.write_bytes(path.read_bytes()[:80])


def converted(out: Path) -> dict[str, dict[str, Any]]:
    """Samples of a converted set by source: meta plus the image member name and bytes."""
    result = {}
    for sample in read_all_samples(out):
        meta = json.loads(sample["json"])
        (image_name,) = [k for k in sample if k in ("jpg", "png", "webp")]
        result[meta["source"]] = {**meta, "member": image_name, "bytes": sample[image_name]}
    return result


def test_convert_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cifar"
    cat_png = save_image(root / "cat" / "a.png", (255, 0, 0), "PNG")
    cat_jpeg = save_image(root / "cat" / "b.JPEG", (0, 255, 0), "JPEG")
    dog_webp = save_image(root / "dog" / "nested" / "c.webp", (0, 0, 255), "WEBP")
    corrupt_jpeg(root / "dog" / "broken.jpg")
    (root / "dog" / "gone.png").symlink_to(root / "dog" / "does-not-exist.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored")
    summary = convert.main(["folder", "--root", str(root), "--out", str(tmp_path / "out"), "--shard-size", "2",
                            "--caption-template", "a photo of a {label}."])
    assert summary == {"read": 5, "written": 3, "skipped": {"corrupt_image": 1, "missing_image": 1}}
    assert json.loads(capsys.readouterr().out) == summary
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    samples = converted(tmp_path / "out")
    assert set(samples) == {"cat/a.png", "cat/b.JPEG", "dog/nested/c.webp"}
    assert (samples["cat/b.JPEG"]["member"], samples["cat/b.JPEG"]["bytes"]) == ("jpg", cat_jpeg)
    assert (samples["cat/a.png"]["member"], samples["cat/a.png"]["bytes"]) == ("png", cat_png)
    assert (samples["dog/nested/c.webp"]["member"], samples["dog/nested/c.webp"]["bytes"]) == ("webp", dog_webp)
    assert samples["dog/nested/c.webp"]["label"] == "dog"
    assert samples["cat/a.png"]["caption"] == "a photo of a cat." and samples["cat/a.png"]["task"] == "retrieval"
    assert count_samples(str(tmp_path / "out")) == 3


def caption_images(images: Path) -> None:
    save_image(images / "one.jpg", (10, 10, 10), "JPEG")
    save_image(images / "sub" / "two.png", (20, 20, 20), "PNG")
    save_image(images / "three.png", (30, 30, 30), "PNG")
    corrupt_jpeg(images / "bad.jpg")


def test_convert_captions_csv(tmp_path: Path) -> None:
    caption_images(tmp_path)
    (tmp_path / "data.csv").write_text(
        "image,caption,label\n"
        "one.jpg,a dark square,square\n"
        "sub/two.png,another square,\n"
        "bad.jpg,corrupt,x\n"
        "missing.jpg,nowhere,x\n"
        "three.png,,x\n"
        "one.jpg,too,many,fields\n"
        ",no image,x\n"
    )
    summary = convert_captions(tmp_path / "data.csv", tmp_path / "out")
    assert summary == {"read": 7, "written": 2,
                       "skipped": {"bad_row": 2, "corrupt_image": 1, "missing_caption": 1, "missing_image": 1}}
    samples = converted(tmp_path / "out")
    assert set(samples) == {"one.jpg", "sub/two.png"}
    assert samples["one.jpg"]["label"] == "square" and samples["one.jpg"]["row"] == 2
    assert samples["sub/two.png"]["label"] == "another square"  # no label: the caption


def test_convert_captions_jsonl_with_images_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    caption_images(tmp_path / "images")
    rows = [
        json.dumps({"img": "one.jpg", "text": "first", "cls": "a"}),
        json.dumps({"img": "sub/two.png", "text": "second"}),
        json.dumps({"img": "bad.jpg", "text": "corrupt"}),
        json.dumps({"img": "missing.png", "text": "gone"}),
        json.dumps({"img": "three.png", "text": "   "}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
    ]
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "data.jsonl").write_text("\n".join(rows) + "\n")
    summary = convert.main(["captions", "--file", str(tmp_path / "meta" / "data.jsonl"), "--out",
                            str(tmp_path / "out"), "--images-root", str(tmp_path / "images"),
                            "--image-column", "img", "--caption-column", "text", "--label-column", "cls"])
    assert summary == {"read": 7, "written": 2,
                       "skipped": {"bad_row": 2, "corrupt_image": 1, "missing_caption": 1, "missing_image": 1}}
    assert json.loads(capsys.readouterr().out) == summary
    samples = converted(tmp_path / "out")
    assert {source: (s["caption"], s["label"]) for source, s in samples.items()} == {
        "one.jpg": ("first", "a"), "sub/two.png": ("second", "second")}


def test_converted_shards_load(tmp_path: Path) -> None:
    caption_images(tmp_path)
    (tmp_path / "data.csv").write_text("image,caption\none.jpg,a\nsub/two.png,b\nthree.png,c\n")
    convert_captions(tmp_path / "data.csv", tmp_path / "out", shard_size=1)

    def caption_of(sample: dict[str, Any]) -> dict[str, Any]:
        image = sample.get("jpg") or sample.get("png")
        return {"caption": sample["json"]["caption"], "pixels": torch.tensor(image.getpixel((0, 0)))}

    batches = list(make_eval_loader(str(tmp_path / "out"), map_fn=caption_of, batch_size=2))
    assert [c for b in batches for c in b["caption"]] == ["a", "b", "c"]
    assert batches[0]["pixels"].shape == (2, 3)


# --------------------------------------------------------------------------- torch-free reading, registries


def test_samples_imports_neither_torch_nor_webdataset() -> None:
    """Serving reads shards through shards.samples, so it must stay torch-free (checked in a fresh interpreter)."""
    code = ("import sys, shards.samples; "
            "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_shards_imports_nothing_from_training() -> None:
    """The data layer sits below the training package: no module of shards/ imports it."""
    root = Path(__file__).resolve().parents[1] / "shards"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "training" or n.startswith("training.")]
    assert offenders == []


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_shard_groups_members_as_webdataset_does(tmp_path: Path) -> None:
    """Keys up to the first dot of the file name, extensions lower-cased, metadata and dot-less names skipped."""
    members = [("__index__", b"meta"), ("dir/a0.JSON", b"{}"), ("dir/a0.0.png", b"p0"), ("dir/a0.1.PNG", b"p1"),
               ("README", b"x"), ("b.c/d.tar.gz", b"g"), ("e.txt", b"t"), ("e.json", b"{}")]
    raw_tar(tmp_path / "one.tar", members)
    url = str(tmp_path / "one.tar")
    ours = list(read_shard(url, SkipLog()))
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"}
              for s in wds.tarfile_to_samples()([{"url": url}])]
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["dir/a0", "b.c/d", "e"]
    assert ours[0] == {"__key__": "dir/a0", "__url__": url, "json": b"{}", "0.png": b"p0", "1.png": b"p1"}


def test_read_shard_reports_unreadable_and_repeated_members(tmp_path: Path) -> None:
    raw_tar(tmp_path / "dup.tar", [("a.json", b"{}"), ("b.json", b"{}"), ("b.JSON", b"{}"), ("c.json", b"{}")])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    log = SkipLog(tmp_path / "log")
    assert [s["__key__"] for s in read_shard(str(tmp_path / "dup.tar"), log)] == ["a"]
    assert list(read_shard(str(tmp_path / "junk.tar"), log)) == []
    assert list(read_shard(str(tmp_path / "gone.tar"), log)) == []
    records = {(Path(r["shard"]).name, r["key"], r["reason"]) for r in read_skip_logs(tmp_path / "log")}
    assert records == {("dup.tar", "b", "corrupt_tar"), ("junk.tar", None, "corrupt_tar"),
                       ("gone.tar", None, "corrupt_tar")}


def test_synth_registry_rejects_duplicates_and_names_the_known_tasks() -> None:
    known = synth.list_synth()
    assert known == ["contextual", "geo_time", "meme", "retrieval", "time"]
    with pytest.raises(ValueError, match="already registered"):
        synth.register_synth("retrieval", synth.get_synth("time"))
    with pytest.raises(KeyError, match=r"unknown synthetic task 'nope'.*geo_time"):
        synth.get_synth("nope")
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        synth.generate("unused", task="nope")
    with pytest.raises(TypeError, match="SynthTask"):
        synth.register_synth("not_a_task", object())
    assert synth.list_synth() == known
    assert synth.get_synth("meme").run_options(Path("d")) == {"bert": str(Path("d") / "bert-tiny")}
    assert synth.get_synth("retrieval").run_options(Path("d"))["classnames"]  # zero-shot classes: every label it draws
    with pytest.raises(SystemExit):  # the CLI names no default task
        synth.parse_args(["--out", "unused"])


def test_convert_registry_rejects_duplicates_and_names_the_known_formats() -> None:
    known = convert.list_converters()
    assert known == ["captions", "folder", "imagecode", "meme", "tara", "toc"]
    with pytest.raises(ValueError, match="already registered"):
        convert.register_converter("folder", convert.get_converter("captions"))
    with pytest.raises(KeyError, match=r"unknown converter 'nope'.*imagecode"):
        convert.get_converter("nope")
    with pytest.raises(TypeError, match="Converter"):
        convert.register_converter("not_a_converter", object())
    assert convert.list_converters() == known


def test_plugins_register_synth_tasks_and_converters(tmp_path: Path) -> None:
    """An out-of-tree module named in MULTICLIP_PLUGINS registers a generator and a converter (fresh process)."""
    (tmp_path / "my_plugin.py").write_text(
        "from shards.convert import Converter, register_converter\n"
        "from shards.synth import SynthTask, get_synth, register_synth\n"
        "register_synth('my_task', get_synth('retrieval'))\n"
        "register_converter('my_format', Converter('mine', lambda parser: None, lambda **kw: kw))\n"
    )
    code = "from shards import convert, synth; print(synth.list_synth(), convert.list_converters())"
    env = {**os.environ, "MULTICLIP_PLUGINS": "my_plugin",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "'my_task'" in result.stdout and "'my_format'" in result.stdout


def test_an_interrupted_write_leaves_a_set_every_reader_refuses(tmp_path):
    """Ctrl-C (or any failure) while writing: the tars are closed, but no sizes.json or summary.json is
    written and the INCOMPLETE marker stays, so the readers refuse the folder by name."""
    from shards.records import SourceRecord, write_records
    from shards.samples import INCOMPLETE_FILE, UnfinishedShardSet, expand_urls
    from shards.writer import ShardSetWriter
    from serving.items import shard_items

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)

    def records():
        for i in range(5):
            yield SourceRecord(image, f"a{i}.png", "a square", "square", task="retrieval")
        raise KeyboardInterrupt("Ctrl-C")

    out = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        write_records(records(), out, shard_size=2, overwrite=False)
    assert (out / INCOMPLETE_FILE).is_file() and "KeyboardInterrupt" in (out / INCOMPLETE_FILE).read_text()
    assert not (out / "sizes.json").exists() and not (out / "summary.json").exists()
    assert len(list(out.glob("*.tar"))) == 3  # what was written stays, for inspection
    for read in (lambda: expand_urls(str(out)), lambda: list(shard_items(str(out))),
                 lambda: expand_urls(str(out / "shard-{000000..000002}.tar"))):
        with pytest.raises(UnfinishedShardSet, match=f"{out}: an unfinished shard set"):
            read()
    with ShardSetWriter(out, 2, overwrite=True) as writer:  # rewritten: whole again
        writer.write("k0", {"png": image.read_bytes()}, {"caption": "a square"})
    assert not (out / INCOMPLETE_FILE).exists() and expand_urls(str(out))


def test_captions_bad_rows_are_counted_by_reason_never_a_traceback(tmp_path):
    """A non-UTF-8 row, a directory named like an image, and paths that leave --images-root are counted
    (with their line) and skipped; the rest of the table is written and summary.json says so."""
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "ok.png")
    (root / "folder.jpg").mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"image,caption\n"
                      b"ok.png,a red square\n"
                      b"ok.png,caf\xe9 latin-1\n"           # not UTF-8
                      b"folder.jpg,a directory\n"
                      b"../secret.png,climbs out\n"
                      + f"{secret},absolute\n".encode()
                      + b"ok.png,again\n")
    summary = convert_captions(table, tmp_path / "out", images_root=root)
    assert summary["written"] == 2 and summary["read"] == 6
    assert summary["skipped"] == {"bad_row": 1, "unreadable_image": 1, "outside_images_root": 2}
    sources = [json.loads(s["json"])["source"] for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"),
                                                                       shardshuffle=False)]
    assert sources == ["ok.png", "ok.png"]  # relative, never an absolute path
    allowed = convert_captions(table, tmp_path / "out2", images_root=root, allow_outside_images=True)
    assert allowed["written"] == 4


def test_a_tiny_file_with_an_extreme_aspect_ratio_is_skipped_before_any_work():
    """A 1 x 100000 PNG (a few hundred bytes) would become 224 x 22 million pixels once its short side is
    resized: the loaders and inference skip it as bad_image from its header, before decoding."""
    import resource

    from serving.items import Item, load_pixels
    from serving.preprocess import Preprocess
    from shards.samples import SampleError, decode_sample, image_shape_problem

    buffer = io.BytesIO()
    Image.new("L", (1, 100_000)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) < 2000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SampleError, match="aspect ratio 100000:1") as err:
        decode_sample({"__key__": "thin", "__url__": "x.tar", "png": data, "json": b"{}"})
    assert err.value.reason == "bad_image"
    preprocess = Preprocess.from_dict({"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                       "resize_mode": "shortest"})
    assert load_pixels(Item("thin", "x.tar", data), preprocess).startswith("bad_image: aspect ratio")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no gigabyte allocation
    assert image_shape_problem(224, 224) is None and image_shape_problem(4000, 200) is None  # 20:1 still fine
    assert "pixels" in image_shape_problem(9000, 9000)
