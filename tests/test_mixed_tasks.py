"""One job, several heads: per-task shards, sampling weights, per-task data positions."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import tiny_config
from conftest import _train, _write_config
from training.config import ConfigError
from training.validation import config_from_dict
from training.trainer import _pick_task, _task_batches


def test_task_choice_is_weighted_and_reproducible():
    names, weights = ["retrieval", "time"], [3.0, 1.0]
    picks = [_pick_task(0, step, micro, names, weights) for step in range(500) for micro in range(2)]
    assert picks == [_pick_task(0, step, micro, names, weights) for step in range(500) for micro in range(2)]
    share = Counter(picks)["retrieval"] / len(picks)
    assert 0.70 < share < 0.80  # 3:1
    assert _pick_task(0, 0, 0, ["time"], [1.0]) == "time"
    # each micro batch of a step draws its own task (with grad_accum > 1 a step mixes tasks)
    mixed_steps = sum(_pick_task(0, s, 0, names, [1.0, 1.0]) != _pick_task(0, s, 1, names, [1.0, 1.0]) for s in range(200))
    assert 70 < mixed_steps < 130  # half of the steps, for equal weights
    assert _pick_task(0, 7, 0, names, weights) == _pick_task(0, 7, 0, names, weights)
    assert len({_pick_task(seed, 0, 0, names, [1.0, 1.0]) for seed in range(20)}) == 2  # the seed matters


def test_task_batches_from_checkpoint_or_step():
    assert _task_batches(None, ["retrieval"], 12) == {"retrieval": 12}
    assert _task_batches({"task_batches": {"retrieval": 7}}, ["retrieval", "time"], 12) == {"retrieval": 7, "time": 0}


def test_every_task_needs_shards(retrieval_shards, tmp_path):
    raw = tiny_config(retrieval_shards, tmp_path)
    raw["data"] = {"num_workers": 1}
    raw["tasks"] = [{"name": "retrieval", "train": "x", "val": "y"}, {"name": "time", "train": "z"}]
    with pytest.raises(ConfigError, match=r"data.val or tasks\[\].val is required .*'time'"):
        config_from_dict(raw)


def test_two_heads_train_in_one_job(retrieval_shards, time_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 12, "micro_batch_size": 16},
                      schedule={"checkpoint_every": 6, "log_every": 6})
    raw["data"] = {"num_workers": 1, "shuffle_buffer": 50}
    raw["tasks"] = [
        {"name": "retrieval", "sampling_weight": 3.0,
         "train": str(retrieval_shards / "train"), "val": str(retrieval_shards / "val")},
        {"name": "time", "sampling_weight": 1.0, "loss_weight": 0.5,
         "train": str(time_shards / "train"), "val": str(time_shards / "val")},
    ]
    proc = _train(_write_config(tmp_path, raw), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert "retrieval/t2i_R@1" in after and "time/hour_top1" in after
    state = json.loads((run / "checkpoints" / "step00000012" / "run_state.json").read_text())
    taken = state["task_batches"]
    assert sum(taken.values()) == 12 and taken["retrieval"] > taken["time"] > 0
    expected = Counter(_pick_task(0, s, 0, ["retrieval", "time"], [3.0, 1.0]) for s in range(12))
    assert taken == dict(expected)
