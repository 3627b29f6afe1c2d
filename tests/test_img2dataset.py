"""Issue #19: shard sets in img2dataset's output layout are read unchanged, by training and by launch/infer.py.

img2dataset (``--output_format webdataset``) writes, per shard, ``00000.tar`` (webdataset's TarWriter:
``<key>.jpg``, ``<key>.txt`` the caption, ``<key>.json`` its metadata), ``00000_stats.json`` (``count``,
``successes``, ``failed_to_download``...) and ``00000.parquet`` (one row per input url, failed ones too),
and no sizes.json. The set here is written the same way: the tar holds only the successes.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from conftest import _records, _run, _train, _write_config, run_infer_cli, tiny_config
from shards.reader import make_eval_loader
from shards.samples import ShardSizes, SkipLog, count_samples, expand_urls, read_shard

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")
SPLITS = {"train": (4, 12), "val": (1, 12)}  # shards, successes per shard (plus 3 failed urls each)
FAILED = 3


def _image(colour: str, shape: str, index: int) -> bytes:
    img = Image.new("RGB", (80, 64), (20 + index % 7 * 5, 20, 30))
    box = (16 + index % 5, 12, 56 + index % 5, 52)
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_img2dataset_split(folder: Path, shards: int, successes: int) -> list[tuple[str, str]]:
    """img2dataset's files for one output folder; returns (key, caption) of every sample in the tars."""
    folder.mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []
    for shard in range(shards):
        name, rows = f"{shard:05d}", []
        with wds.TarWriter(str(folder / f"{name}.tar")) as tar:
            for i in range(successes + FAILED):
                key = f"{shard:05d}{i:04d}"  # img2dataset's key: shard id, then the index in the shard
                colour, shape = list(COLOURS)[(shard + i) % 4], SHAPES[i % 2]
                caption, url = f"a {colour} {shape}", f"https://example.org/{key}.jpg"
                meta = {"url": url, "key": key, "status": "success", "error_message": None, "width": 80, "height": 64,
                        "original_width": 160, "original_height": 128, "exif": "{}"}
                if i >= successes:  # failed downloads: a parquet row, nothing in the tar
                    meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found", width=None,
                                height=None, original_width=None, original_height=None, exif=None, sha256=None)
                    rows.append(meta)
                    continue
                image = _image(colour, shape, i)
                meta["sha256"] = hashlib.sha256(image).hexdigest()
                tar.write({"__key__": key, "jpg": image, "txt": caption, "json": json.dumps(meta, indent=4)})
                rows.append(meta)
                written.append((key, caption))
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
        stats = {"count": successes + FAILED, "successes": successes, "failed_to_download": FAILED,
                 "failed_to_resize": 0, "duration": 1.5, "bytes_downloaded": 12345, "start_time": 1.0,
                 "end_time": 2.5, "status_dict": {"success": successes, "HTTP Error 404: Not Found": FAILED}}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return written


@pytest.fixture(scope="module")
def img2dataset_set(tmp_path_factory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    root = tmp_path_factory.mktemp("img2dataset")
    return root, {split: write_img2dataset_split(root / split, *sizes) for split, sizes in SPLITS.items()}


def caption_and_meta(sample):
    return {"key": sample["__key__"], "caption": sample["json"]["caption"], "width": sample["json"]["width"],
            "status": sample["json"]["status"], "size": sample["jpg"].size}


# --------------------------------------------------------------------------- reading the layout


def test_the_tars_are_the_shards_and_their_stats_give_the_counts(img2dataset_set):
    root, written = img2dataset_set
    urls = expand_urls(str(root / "train"))
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]  # no parquet, no json
    assert not (root / "train" / "sizes.json").exists()
    sizes = ShardSizes()
    assert [sizes.listed(u) for u in urls] == [12] * 4
    assert count_samples(str(root / "train")) == len(written["train"]) == 48


def test_counts_come_from_the_stats_without_reading_the_tars(img2dataset_set, tmp_path):
    """A stats file claiming one sample more than its tar holds is believed for counting, and the
    reader then reports the shard as short (as with sizes.json)."""
    root, _ = img2dataset_set
    copy = shutil.copytree(root / "val", tmp_path / "val")
    stats = json.loads((copy / "00000_stats.json").read_text())
    (copy / "00000_stats.json").write_text(json.dumps({**stats, "successes": 13}))
    assert count_samples(str(copy)) == 13
    log = SkipLog(tmp_path / "skips")
    assert len(list(read_shard(str(copy / "00000.tar"), log, ShardSizes().listed(str(copy / "00000.tar"))))) == 12
    assert log.count == 1


def test_a_stats_file_without_a_sample_count_is_an_error_naming_it(img2dataset_set, tmp_path):
    root, _ = img2dataset_set
    copy = shutil.copytree(root / "val", tmp_path / "val")
    (copy / "00000_stats.json").write_text(json.dumps({"count": 15, "successes": "twelve"}))
    with pytest.raises(ValueError, match=r"00000_stats.json: img2dataset stats without a sample count"):
        count_samples(str(copy))


def test_captions_come_from_txt_and_the_json_fields_stay(img2dataset_set):
    root, written = img2dataset_set
    loader = make_eval_loader(str(root / "train"), map_fn=caption_and_meta, batch_size=10, collate_fn=list)
    read = [s for batch in loader for s in batch]
    assert [(s["key"], s["caption"]) for s in read] == written["train"]
    assert {(s["width"], s["status"], tuple(s["size"])) for s in read} == {(80, "success", (80, 64))}


def test_a_json_caption_wins_over_txt():
    from shards.samples import decode_sample

    image = _image("red", "square", 0)
    sample = {"__key__": "k", "jpg": image, "txt": b"  from txt\n", "json": b'{"url": "u"}'}
    assert decode_sample(sample)["json"] == {"url": "u", "caption": "from txt"}
    sample["json"] = b'{"caption": "from json"}'
    assert decode_sample(sample)["json"]["caption"] == "from json"


def test_a_remote_img2dataset_folder_counts_from_its_stats(img2dataset_set):
    root, written = img2dataset_set
    fs = fsspec.filesystem("memory")
    for path in sorted((root / "train").iterdir()):
        fs.pipe_file(f"/i2d/train/{path.name}", path.read_bytes())
    try:
        urls = expand_urls("memory://i2d/train/*.tar")
        assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
        fs.rm("/i2d/train/00003.tar")  # a count from the stats beside it: the tar is not read
        assert count_samples(urls) == 48
    finally:
        fs.rm("/i2d", recursive=True)


# --------------------------------------------------------------------------- training and inference read it


@pytest.mark.slow
def test_a_tiny_retrieval_run_trains_on_the_layout_and_launch_infer_reads_it(img2dataset_set, tmp_path):
    """The whole way a user's img2dataset download goes: train (steps per epoch from the stats files),
    export, then torch-free batch inference over the same layout."""
    root, written = img2dataset_set
    run, export, out = tmp_path / "run", tmp_path / "export", tmp_path / "out"
    raw = tiny_config(root, run, optim={"max_steps": 4, "micro_batch_size": 8, "warmup_steps": 1},
                      eval={"batch_size": 12, "max_samples": 12})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = _records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["epoch"] == pytest.approx(4 / (48 // 8))  # steps per epoch from the 4 stats files
    final = _records(run, "eval")[-1]
    assert final["retrieval/num_samples"] == 12 and final["retrieval/skipped_samples"] == 0

    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_infer_cli(["--model", str(export), "--shards", str(root / "val"), "--out", str(out), "--tasks", "retrieval"],
                  forbidden=("torch", "webdataset", "open_clip"))
    predictions = [json.loads(line) for line in (out / "retrieval.jsonl").read_text().splitlines()]
    assert [p["key"] for p in predictions] == [key for key, _ in written["val"]]
    assert (out / "errors.jsonl").read_text() == ""
