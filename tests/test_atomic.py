"""Whole-or-absent writes (shards/atomic.py) and final/'s streamed safetensors files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shards.atomic import atomic_path, write_bytes


def test_atomic_path_replaces_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "weights.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]  # no temporary sibling left
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target  # same folder: one rename, same file system
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_write_final_streams_both_files_and_a_failure_keeps_the_old_ones(tmp_path, monkeypatch):
    from training import checkpoint

    state = {"backbone.w": torch.randn(4, 3), "heads.time.b": torch.randn(2), "backbone.logit_scale": torch.tensor(2.0)}
    checkpoint.write_final(state, tmp_path / "final", {"name": "first"})
    model, backbone = load_file(tmp_path / "final" / "model.safetensors"), load_file(tmp_path / "final" / "open_clip.safetensors")
    assert set(model) == set(state) and all(torch.equal(model[k], v) for k, v in state.items())
    assert set(backbone) == {"w", "logit_scale"} and torch.equal(backbone["w"], state["backbone.w"])

    def dies(tensors, filename, metadata=None):
        open(filename, "wb").write(b"torn")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", dies)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_final({k: v + 1 for k, v in state.items()}, tmp_path / "final", {"name": "second"})
    kept = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in state.items())  # the earlier weights, whole
    assert not (tmp_path / "final" / "config.json").exists()  # load_run refuses the folder until a full write
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["model.safetensors", "open_clip.safetensors"]


def test_two_writers_of_one_path_at_once_both_finish(tmp_path):
    """Two ranks writing one cache file (geo_time's knowledge embeddings) at the same time: each writes its
    own temporary, so neither rename finds its file taken by the other (a shared name failed the demo)."""
    target = tmp_path / "corpus.npy"
    with atomic_path(target) as first:
        first.write_bytes(b"rank 0")
        with atomic_path(target) as second:
            second.write_bytes(b"rank 1")
        assert target.read_bytes() == b"rank 1"
    assert target.read_bytes() == b"rank 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.npy"]
