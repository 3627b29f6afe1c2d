"""Issue #19: shards behind URLs (a loopback HTTP server, ``pipe:cat``, fsspec's ``memory://`` and ``file://``)
are read with the guarantees of local shards: the same keys per rank and worker, exact resume positions,
counts from sizes.json, and every failure a clear error or a skip record naming the URL.

The HTTP server is python's http.server in a thread on a free loopback port, serving real shards written by
``shards.synth``; the tests stop it.
"""
from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pytest
import torch

from shards.reader import make_eval_loader, make_loader
from shards.samples import (UnfinishedShardSet, count_samples, expand_urls, read_shard, read_skip_logs, SkipLog)

SHARDS = 8  # 8 shards of 8 samples: 2 ranks x 2 workers read 2 shards each
STALL = threading.Event()  # set at teardown: ends the stalling handler at once


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the served folder; ``/stall/<shard>`` sends the start of ``train/<shard>``, then nothing;
    ``/broken/...`` and ``*status500*`` answer 500, ``/signed/...`` 403."""

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/broken/") or "status500" in self.path:
            self.send_error(500, "Internal Server Error")
            return
        if self.path.startswith("/signed/"):  # a server that refuses what it was not asked to sign
            self.send_error(403, "Forbidden")
            return
        if self.path.startswith("/stall/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write((Path(self.directory) / "train" / Path(self.path).name).read_bytes()[:1500])
            self.wfile.flush()
            STALL.wait(20)
            return
        super().do_GET()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The served folder: ``train/`` (8 shards + sizes.json), plus copies the failure tests break."""
    from shards.synth import generate

    root = tmp_path_factory.mktemp("remote")
    generate(root / "set", task="retrieval", n_train=SHARDS * 8, n_val=8, seed=0, shard_size=8, image_size=24)
    shutil.move(root / "set" / "train", root / "train")
    cut = shutil.copytree(root / "train", root / "cut")  # its shard 2 loses the second half of its bytes
    data = (cut / "shard-000002.tar").read_bytes()
    (cut / "shard-000002.tar").write_bytes(data[: len(data) // 2 + 700])
    (root / "torn").mkdir()
    (root / "torn" / "sizes.json").write_text('{"shards": {"shard-0000')
    (root / "torn" / "shard-000000.tar").write_bytes((root / "train" / "shard-000000.tar").read_bytes())
    return root


@pytest.fixture(scope="module")
def http_base(local) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(local)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    STALL.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        STALL.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def memory_set(local) -> Iterator[str]:
    """The train shards (and sizes.json) in fsspec's in-memory filesystem (DataLoader workers fork: they see it)."""
    fs = fsspec.filesystem("memory")
    for path in sorted((local / "train").iterdir()):
        fs.pipe_file(f"/remote-test/train/{path.name}", path.read_bytes())
    yield "memory://remote-test/train/"
    fs.rm("/remote-test", recursive=True)


def _specs(local: Path, http_base: str, memory_set: str) -> dict[str, str]:
    last = f"{SHARDS - 1:06d}"
    return {
        "http brace": f"{http_base}/train/shard-{{000000..{last}}}.tar",
        "http folder": f"{http_base}/train/",  # the shards its sizes.json lists
        "pipe:cat": f"pipe:cat {local}/train/shard-{{000000..{last}}}.tar",
        "memory folder": memory_set,
        "file glob": f"file://{local}/train/*.tar",
    }


KINDS = ("http brace", "http folder", "pipe:cat", "memory folder", "file glob")


@pytest.fixture
def specs(local, http_base, memory_set) -> dict[str, str]:
    return _specs(local, http_base, memory_set)


def key_and_worker(sample: dict[str, Any]) -> dict[str, Any]:
    info = torch.utils.data.get_worker_info()
    return {"key": sample["__key__"], "worker": info.id if info else 0}


def keys_of(batch: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """(the worker that made the batch, its keys): a batch never mixes workers."""
    assert len({s["worker"] for s in batch}) == 1
    return batch[0]["worker"], [s["key"] for s in batch]


def _rank_batches(spec: str, rank: int, **options: Any) -> list[tuple[int, list[str]]]:
    loader = make_loader(spec, map_fn=key_and_worker, batch_size=4, rank=rank, world_size=2, num_workers=2, seed=3,
                         shuffle_buffer=10, collate_fn=list, infinite=False, persistent_workers=False, **options)
    return [keys_of(batch) for batch in loader]


# --------------------------------------------------------------------------- 1. expansion, counts, keys per rank/worker


@pytest.mark.parametrize("kind", KINDS)
def test_a_remote_spec_names_the_local_shards_in_order_with_their_counts(kind, specs, local):
    urls = expand_urls(specs[kind])
    assert [u.rsplit("/", 1)[-1] for u in urls] == [p.name for p in sorted((local / "train").glob("*.tar"))]
    assert all(u.startswith(("pipe:cat ", "http://", "memory://", "file://")) for u in urls)
    assert count_samples(urls) == count_samples(str(local / "train")) == SHARDS * 8


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_and_worker_reads_the_keys_it_reads_locally(kind, specs, local):
    for rank in (0, 1):
        remote, here = _rank_batches(specs[kind], rank), _rank_batches(str(local / "train"), rank)
        assert remote == here
        assert {worker for worker, _ in remote} == {0, 1}
    both = [key for rank in (0, 1) for _, keys in _rank_batches(specs[kind], rank) for key in keys]
    assert len(both) == len(set(both)) == SHARDS * 8  # disjoint across ranks and workers, the whole epoch


@pytest.mark.parametrize("kind", ["http brace", "pipe:cat"])
def test_a_resume_position_continues_the_stream_exactly(kind, specs, local):
    """As training.trainer._positioned_stream: epoch taken // per_epoch, then replay taken % per_epoch batches."""
    per_epoch = count_samples(specs[kind]) // (4 * 2)  # micro batch 4, 2 ranks
    endless = functools.partial(make_loader, map_fn=key_and_worker, batch_size=4, rank=1, world_size=2, num_workers=2,
                                seed=5, shuffle_buffer=10, collate_fn=list, persistent_workers=False)
    reference = iter(endless(str(local / "train")))
    expected = [keys_of(next(reference)) for _ in range(per_epoch + 5)]
    taken = per_epoch + 2  # a position in the second epoch
    resumed = iter(endless(specs[kind], start_epoch=taken // per_epoch))
    for _ in range(taken % per_epoch):
        next(resumed)
    assert [keys_of(next(resumed)) for _ in range(3)] == expected[taken:]


def test_remote_counts_come_from_the_index_without_reading_the_tars(local):
    """A sizes.json beside remote shards is believed (one listed shard is not even there), as locally."""
    fs = fsspec.filesystem("memory")
    sizes = {f"shard-{i:06d}.tar": 8 for i in range(3)}
    fs.pipe_file("/remote-index/train/sizes.json", json.dumps({"shards": sizes, "total": 24}).encode())
    for name in list(sizes)[:2]:
        fs.pipe_file(f"/remote-index/train/{name}", (local / "train" / name).read_bytes())
    try:
        urls = expand_urls("memory://remote-index/train/")
        assert [u.rsplit("/", 1)[1] for u in urls] == list(sizes)
        assert count_samples(urls) == 24
    finally:
        fs.rm("/remote-index", recursive=True)


def test_steps_per_epoch_counts_remote_shards_from_their_sizes_json(local, http_base, tmp_path):
    from conftest import tiny_config
    from training.data import steps_per_epoch
    from training.validation import config_from_dict

    def steps(train: str) -> int:
        raw = tiny_config(local, tmp_path, data={"train": train, "val": str(local / "train")}, optim={"micro_batch_size": 4})
        return steps_per_epoch(config_from_dict(raw), world_size=2)

    assert steps(f"{http_base}/train/") == steps(str(local / "train")) == SHARDS * 8 // 8


# --------------------------------------------------------------------------- 2. failures name the URL


def _eval_keys_and_skips(spec: str, log_dir: Path) -> tuple[list[str], list[dict]]:
    loader = make_eval_loader(spec, map_fn=key_and_worker, batch_size=8, collate_fn=list, error_log_dir=log_dir)
    return [s["key"] for batch in loader for s in batch], read_skip_logs(log_dir)


def test_http_404_and_500_are_skip_records_naming_the_url(http_base, tmp_path):
    missing, broken = f"{http_base}/train/shard-{SHARDS:06d}.tar", f"{http_base}/train/status500.tar"
    keys, skips = _eval_keys_and_skips([f"{http_base}/train/shard-{{000000..{SHARDS:06d}}}.tar", broken], tmp_path)
    assert len(keys) == SHARDS * 8
    assert [(s["shard"], s["key"], s["reason"]) for s in skips] == [(missing, None, "corrupt_tar"),
                                                                      (broken, None, "corrupt_tar")]
    assert skips[0]["error"] == f"{missing}: not found (HTTP 404, or no such object)"
    assert skips[1]["error"] == f"{broken}: HTTP 500 Internal Server Error"


def test_a_server_refusing_the_files_beside_the_shards_still_serves_them(http_base):
    """Signed URLs (403 for anything else): no sizes.json, stats file or marker can be read, which is no
    error (the shard can't be read either here: a skip record); a 500 on them is an error naming the URL."""
    signed = f"{http_base}/signed/shard-000000.tar"
    assert expand_urls(signed) == [signed]
    log = SkipLog()
    assert list(read_shard(signed, log)) == [] and log.count == 1
    with pytest.raises(Exception, match=f"500.*{http_base}/broken/INCOMPLETE"):
        expand_urls(f"{http_base}/broken/")


def test_a_pipe_command_that_fails_is_a_skip_record_with_its_status(local, tmp_path):
    good = f"pipe:cat {local}/train/shard-000000.tar"
    gone = f"pipe:cat {local}/train/no-such-shard.tar"
    late = f"pipe:cat {local}/train/shard-000001.tar; exit 3"  # the whole tar, then a failure
    keys, skips = _eval_keys_and_skips([good, gone, late], tmp_path)
    by_shard = {s["shard"]: s for s in skips}
    assert set(by_shard) == {gone, late} and all(s["reason"] == "corrupt_tar" for s in skips)
    assert "exited with status 1" in by_shard[gone]["error"] and "No such file" in by_shard[gone]["error"]
    assert "exited with status 3" in by_shard[late]["error"]
    assert len(keys) == 8 + 7 and len(skips) == 2  # the sample being read when the command failed is dropped, named


def test_a_truncated_remote_tar_is_reported_against_its_sizes_json(http_base, tmp_path):
    keys, skips = _eval_keys_and_skips(f"{http_base}/cut/", tmp_path)
    cut = f"{http_base}/cut/shard-000002.tar"
    assert 7 * 8 <= len(keys) < SHARDS * 8
    assert skips and {s["shard"] for s in skips} == {cut} and {s["reason"] for s in skips} == {"corrupt_tar"}
    assert len(keys) + sum(1 for s in skips if s["key"]) < SHARDS * 8  # samples lost to the cut...
    assert any(s["key"] is None and "of the 8 samples" in s["error"] for s in skips)  # ...are counted against the index


def test_a_stalled_http_server_is_an_error_naming_the_url_not_a_hang(http_base, monkeypatch, caplog):
    import shards.samples as samples

    monkeypatch.setattr(samples, "HTTP_READ_TIMEOUT_S", 1.0)
    url = f"{http_base}/stall/shard-000000.tar"
    with caplog.at_level(logging.WARNING, logger="multiclip.shards"):
        assert [s["__key__"] for s in read_shard(url, SkipLog())] == []  # its first sample was being read
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped sample: shard={url} key=train-0000000 reason=corrupt_tar error={caplog.records[0].args[3]}"]
    assert "Timeout" in caplog.records[0].args[3]


def test_an_endless_stream_of_unreadable_urls_fails_clearly(http_base):
    loader = make_loader([f"{http_base}/gone/shard-{i}.tar" for i in range(2)], map_fn=key_and_worker, batch_size=2,
                         num_workers=0, collate_fn=list)
    with pytest.raises(RuntimeError, match="produced no usable sample .*gone/shard-0.tar"):
        next(iter(loader))


def test_remote_folders_refuse_unfinished_sets_and_torn_indexes(http_base, memory_set):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/remote-inc/train/shard-000000.tar", b"")
    fs.pipe_file("/remote-inc/train/INCOMPLETE", b"interrupted: KeyboardInterrupt")
    with pytest.raises(UnfinishedShardSet, match="memory://remote-inc/train.*KeyboardInterrupt"):
        expand_urls("memory://remote-inc/train/")
    with pytest.raises(UnfinishedShardSet, match="remote-inc"):
        expand_urls("memory://remote-inc/train/shard-{000000..000000}.tar")
    fs.rm("/remote-inc", recursive=True)
    with pytest.raises(ValueError, match=f"{http_base}/torn/sizes.json: sizes.json is not valid JSON"):
        expand_urls(f"{http_base}/torn/")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(f"{memory_set}nothing-*.tar")


def test_one_url_rule_for_shards_and_run_folders():
    """shards and run folders (training.remote_runs, training.runs) share shards.samples.is_url: fsspec
    URLs, chained ones too, are remote; local paths and pipe: commands are not."""
    from shards.samples import is_url

    assert all(map(is_url, ["s3://b/train/", "file:///data/x.tar", "simplecache::s3://b/x.tar"]))
    assert not any(map(is_url, ["/data/train", "runs/x", "pipe:cat a.tar", "C::x"]))
