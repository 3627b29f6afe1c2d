"""Elastic resume: a ZeRO run checkpointed on 2 ranks resumes on 1 and the other way round (the real
deepspeed launcher, DeepSpeed's universal checkpoint conversion, real shards)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import _records, _train, _write_config, tiny_config
from training.checkpoint import check_resumable, stream_layout, weights_only_loading
from training.config import ConfigError
from training.elastic import CONVERTED_FROM, convert_to_universal, repositioned_batches

STEPS, MORE = 8, 10  # steps before the checkpoint, steps after the resume


def _raw(shards: Path, run: Path, stage: int) -> dict:
    """A constant learning rate after one warm-up step, so the loss falls steadily and the resume's
    first step is comparable with the checkpoint's last."""
    return tiny_config(shards, run, run={"audit": True}, deepspeed={"zero_stage": stage},
                       optim={"max_steps": STEPS, "lr_backbone": 2e-3, "lr_head": 2e-3, "min_lr_ratio": 1.0},
                       eval={"max_samples": 20, "batch_size": 20})


def _by_step(run: Path) -> dict[int, dict]:
    """The last train record of every step (a resumed run appends)."""
    return {r["step"]: r for r in _records(run, "train")}


def _adam_steps(tag_dir: Path) -> dict[str, set[float]]:
    """Adam's step counts per parameter group name, over every rank's optimizer file (ZeRO-0 keeps the
    whole optimizer in the model-states file)."""
    with weights_only_loading():
        files = sorted(tag_dir.glob("*_optim_states.pt"))
        states = ([torch.load(f, map_location="cpu")["optimizer_state_dict"]["base_optimizer_state"] for f in files]
                  or [torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")["optimizer"]])
    out: dict[str, set[float]] = {}
    for state in states:
        for group in state["param_groups"]:
            steps = {float(state["state"][p]["step"]) for p in group["params"] if p in state["state"]}
            out.setdefault(group["name"], set()).update(steps)
    return out


def _stream_keys(raw: dict, world_size: int, rank: int, skip: int, run: Path) -> list[str]:
    """The keys of the micro batch after ``skip`` ones of the real training stream of ``rank``."""
    from training.data import train_loader
    from training.distributed import DistInfo
    from training.model import build_model
    from training.validation import config_from_dict

    cfg = config_from_dict(raw)
    model, backbone = build_model(cfg)
    info = DistInfo(rank, world_size, rank, world_size, torch.device("cpu"))
    stream = iter(train_loader(cfg, model.heads["retrieval"], backbone, info, run / "expected", 0))
    for _ in range(skip):
        next(stream)
    return list(next(stream)["key"])


def _audit_keys(run: Path, rank: int, step: int) -> list[str]:
    lines = (run / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
    return [r["keys"] for r in map(json.loads, lines) if r["step"] == step][-1]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _check_continued(run: Path) -> None:
    """The trained weights carried over (logit_scale, a scalar parameter, continues from where it was),
    and so did the optimizer (Adam's step count counts the steps before the resume too)."""
    steps = _by_step(run)
    start, last, first = steps[1], steps[STEPS], steps[STEPS + 1]
    moved = abs(last["retrieval/logit_scale"] - start["retrieval/logit_scale"])
    assert moved > 0.05, "the test needs a run whose logit_scale moves"
    assert abs(first["retrieval/logit_scale"] - last["retrieval/logit_scale"]) < moved / 4
    adam = _adam_steps(run / "checkpoints" / f"step{MORE:08d}")
    assert set(adam) == {"backbone/decay", "backbone/no_decay", "heads/no_decay"}  # every param group survived
    # a fresh optimizer would count MORE - STEPS. (min differs: on 1 rank without ZeRO, a parameter no loss
    # uses, the backbone's own logit_scale, gets no gradient and so no Adam step; on 2 ranks a zero one)
    assert all(max(s) == MORE for s in adam.values()), adam


def test_two_ranks_to_one_continues_loss_optimizer_and_data(retrieval_shards, tmp_path):
    """ZeRO-1 on 2 ranks x 16, resumed on 1 rank x 32 (the same global batch, so the losses compare)."""
    run = tmp_path / "run"
    raw = _raw(retrieval_shards, run, stage=1)
    config = _write_config(tmp_path, raw)
    proc = _train(config, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = run / "checkpoints" / f"step{STEPS:08d}"
    original = _digests(tag)

    proc = _train(config, "--resume", f"optim.max_steps={MORE}", "optim.micro_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "elastic resume: checkpoint written on 2 rank(s), resumed on 1 from a universal checkpoint" in out
    assert f"resumed from {tag} at step {STEPS}" in out
    assert (run / "checkpoints" / "universal" / tag.name / CONVERTED_FROM).is_file()
    assert _digests(tag) == original  # the original checkpoint was only read

    steps = _by_step(run)
    fresh, last, first = steps[1]["loss"], steps[STEPS]["loss"], steps[STEPS + 1]["loss"]
    assert abs(first - last) < 0.1 and first < fresh - 0.15, (fresh, last, first)
    _check_continued(run)
    # data: 8 micro batches of 2 x 16 were 8 / 50 of the epoch; on 1 x 32 that is 8 of 50 again
    assert json.loads((run / "checkpoints" / f"step{MORE:08d}" / "run_state.json").read_text())[
        "task_batches"] == {"retrieval": STEPS + (MORE - STEPS)}
    expected = _stream_keys({**raw, "optim": {**raw["optim"], "micro_batch_size": 32}}, 1, 0, STEPS, tmp_path)
    assert _audit_keys(run, 0, STEPS) == expected


@pytest.mark.slow
def test_one_rank_to_two_continues_loss_optimizer_and_data(retrieval_shards, tmp_path):
    """ZeRO-2 on 1 rank x 16 with 2 feature-cached micro batches a step (the contrastive batch of 2 ranks x
    16, so the losses compare), resumed on 2 ranks x 16: the 16 micro batches taken were 16 / 100 of the
    epoch, so each rank continues after 8 of its 50. Rank 1's ZeRO partition holds no element of the heads'
    no-decay group (two scalars), which DeepSpeed 0.19.8's own universal loader fails on
    (elastic.tolerate_empty_partitions): that group still counts every step on both ranks."""
    run = tmp_path / "run"
    raw = _raw(retrieval_shards, run, stage=2)
    raw["optim"].update(grad_accum=2, accum_mode="features", fused=True)  # the kernel a GPU user would pick
    config = _write_config(tmp_path, raw)
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(config, "--resume", f"optim.max_steps={MORE}", "optim.grad_accum=1", "optim.accum_mode=gradients",
                  ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "elastic resume: checkpoint written on 1 rank(s), resumed on 2 from a universal checkpoint" in (
        proc.stdout + proc.stderr)

    steps = _by_step(run)
    fresh, last, first = steps[1]["loss"], steps[STEPS]["loss"], steps[STEPS + 1]["loss"]
    assert abs(first - last) < 0.1 and first < fresh - 0.15, (fresh, last, first)
    _check_continued(run)
    # with ZeRO every rank's partition of every group takes every step, padding-only ones included
    adam = _adam_steps(run / "checkpoints" / f"step{MORE:08d}")
    assert all(s == {MORE} for s in adam.values()), adam
    state = json.loads((run / "checkpoints" / f"step{MORE:08d}" / "run_state.json").read_text())
    assert state["task_batches"] == {"retrieval": 8 + (MORE - STEPS)} and state["layout"]["world_size"] == 2
    resumed = {**raw, "optim": {**raw["optim"], "grad_accum": 1, "accum_mode": "gradients"}}
    for rank in (0, 1):
        assert _audit_keys(run, rank, STEPS) == _stream_keys(resumed, 2, rank, 8, tmp_path)


def test_repositioning_keeps_the_epoch_and_its_fraction():
    assert repositioned_batches(8, 100, 50) == 4
    assert repositioned_batches(4, 50, 100) == 8
    assert repositioned_batches(130, 100, 50) == 65  # epoch 1, 30 % into it
    assert repositioned_batches(49, 50, 33) == 32  # rounded down to a whole micro batch
    assert repositioned_batches(50, 50, 33) == 33  # an epoch boundary stays one


def _state(config: dict, world_size: int) -> dict:
    return {"tag": "step00000004", "step": 4, "config": config, "layout": stream_layout(config, world_size)}


def test_another_world_size_may_change_batch_sizes_but_not_the_data_or_the_zero_stage(tmp_path):
    from training.validation import config_from_dict

    config = config_from_dict(_raw(tmp_path / "shards", tmp_path, stage=1)).to_dict()
    state = _state(config, 2)
    bigger = {**config, "optim": {**config["optim"], "micro_batch_size": 32}}
    check_resumable(state, bigger, tmp_path, world_size=1)  # elastic: allowed
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_resumable(state, bigger, tmp_path, world_size=2)  # same world size: the position would lie
    other_stage = {**config, "deepspeed": {**config["deepspeed"], "zero_stage": 2}}
    with pytest.raises(ConfigError, match="zero_stage = 1, this config has 2"):
        check_resumable(state, other_stage, tmp_path, world_size=1)
    zero3 = {**config, "deepspeed": {**config["deepspeed"], "zero_stage": 3}}
    with pytest.raises(ConfigError, match="not with ZeRO-3.*Resume it on 2 rank"):
        check_resumable(_state(zero3, 2), zero3, tmp_path, world_size=1)
    check_resumable(_state(zero3, 2), zero3, tmp_path, world_size=2)  # the same world size: as before
    other_data = {**config, "data": {**config["data"], "shuffle_buffer": 7}}
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        check_resumable(state, other_data, tmp_path, world_size=1)


def test_a_folder_there_that_no_conversion_wrote_is_never_replaced(tmp_path):
    root = tmp_path / "checkpoints" / "universal"
    (root / "step00000004").mkdir(parents=True)
    (root / "step00000004" / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not written by an elastic resume"):
        convert_to_universal(tmp_path / "checkpoints", "step00000004", root)
    assert (root / "step00000004" / "mine.txt").read_text() == "a user's file"
