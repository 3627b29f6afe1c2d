"""End to end: the real deepspeed launcher and engine on CPU, from synthetic shards to final weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, _records, _run, _train, _write_config, tiny_config

def test_two_ranks_identical_weights_disjoint_samples(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    # a time-based checkpoint after every step (1e-6 min): both ranks must agree each time, or the job hangs
    raw = tiny_config(retrieval_shards, run, run={"audit": True}, optim={"max_steps": 6, "micro_batch_size": 16},
                      schedule={"checkpoint_every_minutes": 1e-6})
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = _train(_write_config(tmp_path, raw), ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (RAM-backed, 69 MB per rank) are removed when the ranks exit
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    digests = {json.loads(p.read_text())["sha256"] for p in (run / "audit").glob("weights-rank*.json")}
    assert len(list((run / "audit").glob("weights-rank*.json"))) == 2
    assert len(digests) == 1, "ranks disagree on the weights after optimizer steps"
    keys = {}
    for rank in (0, 1):
        lines = (run / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
        keys[rank] = [k for line in lines for k in json.loads(line)["keys"]]
        assert len(keys[rank]) == 6 * 16 and len(set(keys[rank])) == len(keys[rank])
    assert not set(keys[0]) & set(keys[1]), "the two ranks read the same samples"
    # the weights really changed and the final folder is complete
    final = load_file(str(run / "final" / "model.safetensors"))
    assert "heads.retrieval.logit_scale" in final
    assert (run / "final" / "config.json").is_file() and (run / "curves.png").is_file()
    assert (run / "tensorboard").is_dir() and _records(run, "train")
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000005", "step00000006"]


def test_final_backbone_loads_in_open_clip(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 2})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    open_clip.add_model_config(ROOT / "configs" / "models")
    model = open_clip.create_model("tiny-vit", pretrained=str(run / "final" / "open_clip.safetensors"))
    full = load_file(str(run / "final" / "model.safetensors"))
    assert torch.equal(model.visual.conv1.weight, full["backbone.visual.conv1.weight"])
    # launch/evaluate.py scores the same weights to the same numbers as the end of training
    out = tmp_path / "eval.json"
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(tmp_path / "config.yaml"),
                 "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())["after"]
    evaluated = json.loads(out.read_text())
    assert evaluated["retrieval/t2i_R@1"] == pytest.approx(after["retrieval/t2i_R@1"], abs=1e-6)
    # --zero-shot scores the configured backbone as built (same seed): the run's own "before" figures
    out = tmp_path / "zero_shot.json"
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(tmp_path / "config.yaml"), "--zero-shot",
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, zero_shot = json.loads((run / "metrics.json").read_text())["before"], json.loads(out.read_text())
    for key in ("retrieval/t2i_R@1", "retrieval/i2t_R@1", "retrieval/zeroshot_top1"):
        assert zero_shot[key] == pytest.approx(before[key], abs=1e-6), key
    numbers = {k: v for k, v in evaluated.items() if isinstance(v, float) and not k.endswith(("_chance", "_baseline"))}
    assert any(zero_shot[k] != pytest.approx(v, abs=1e-6) for k, v in numbers.items()), "--zero-shot loaded the run"


def test_resume_continues_at_the_same_step(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 4},
                      schedule={"checkpoint_every": 2, "log_every": 1})
    config = _write_config(tmp_path, raw)
    assert _train(config).returncode == 0
    proc = _train(config, "--resume", "optim.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in _records(run, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    lrs = [r["lr_heads/no_decay"] for r in _records(run, "train") if "lr_heads/no_decay" in r]
    assert lrs, "learning rates are logged"
    assert "resumed from" in proc.stdout + proc.stderr
    # keep_checkpoints=2 (the default): the step-2 checkpoint was pruned once step 6 was complete
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000004", "step00000006"]


def test_evaluation_before_training_can_be_left_out(retrieval_shards, tmp_path):
    """eval.before_training=false: no step-0 evaluation ("before" is null), periodic and final ones stay
    (with the default, every run's metrics.json has "before": the learning tests read it). And how often a
    run evaluates never moves its training: with the crops drawn in the main process (no loader workers),
    the training losses are the same whatever the evaluation schedule."""
    runs = {"sparse": tmp_path / "sparse" / "run", "every_step": tmp_path / "every_step" / "run"}
    schedules = {"sparse": ({"eval_every": 2}, False), "every_step": ({"eval_every": 1}, True)}
    for name, run in runs.items():
        schedule, before = schedules[name]
        raw = tiny_config(retrieval_shards, run, optim={"max_steps": 4}, schedule=schedule,
                          data={"num_workers": 0},
                          eval={"max_samples": 20, "batch_size": 20, "before_training": before})
        (tmp_path / name).mkdir()
        proc = _train(_write_config(tmp_path / name, raw))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _records(runs["sparse"], "eval")] == [2, 4]
    assert [r["step"] for r in _records(runs["every_step"], "eval")] == [0, 1, 2, 3, 4]
    metrics = json.loads((runs["sparse"] / "metrics.json").read_text())
    assert metrics["before"] is None and metrics["after"]
    losses = {name: [r["loss"] for r in _records(run, "train")] for name, run in runs.items()}
    assert len(losses["sparse"]) == 4 and losses["sparse"] == losses["every_step"]


def test_resume_with_another_model_is_refused(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 2}, schedule={"checkpoint_every": 2})
    assert _train(_write_config(tmp_path, raw)).returncode == 0
    other = ROOT / "configs" / "models"
    raw["model"] = {"name": "tiny-vit-wide", "model_config_dir": str(other)}
    proc = _train(_write_config(tmp_path, raw), "--resume")
    assert proc.returncode != 0
    assert "was trained with model" in proc.stderr


class _Planted:
    """Unpickling this runs code (touches a file): what a tampered checkpoint could carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_runs_a_payload_planted_in_a_checkpoint(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 2}, schedule={"checkpoint_every": 2})
    config = _write_config(tmp_path, raw)
    assert _train(config).returncode == 0
    states = run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "payload_ran"
    checkpoint = torch.load(states, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "planted": _Planted(str(marker))}, states)
    proc = _train(config, "--resume", "optim.max_steps=3")
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists(), "the planted payload ran on --resume"


def test_resume_with_another_batch_layout_or_data_is_refused_naming_both(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 2}, schedule={"checkpoint_every": 2})
    config = _write_config(tmp_path, raw)
    assert _train(config).returncode == 0
    proc = _train(config, "--resume", "optim.max_steps=4", "optim.micro_batch_size=8")
    assert proc.returncode != 0 and "another data stream or batch layout" in proc.stderr, proc.stderr[-2000:]
    assert "'micro_batch_size': 16" in proc.stderr and "'micro_batch_size': 8" in proc.stderr
    proc = _train(config, "--resume", "optim.max_steps=4", f"data.train={retrieval_shards / 'val'}")
    assert proc.returncode != 0 and "another data stream" in proc.stderr


def test_two_jobs_never_share_a_run_folder(retrieval_shards, tmp_path):
    import subprocess
    import time

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from training.checkpoint import RunLock; lock = RunLock(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(120)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        raw = tiny_config(retrieval_shards, run, optim={"max_steps": 2})
        proc = _train(_write_config(tmp_path, raw))
        assert proc.returncode != 0 and "is in use by another training job (pid" in proc.stderr, proc.stderr[-2000:]
        assert not (run / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    from training.checkpoint import RunLock

    RunLock(run).release()  # free again once the holder is gone


def test_a_torn_last_log_line_is_ignored_a_torn_middle_line_is_named(tmp_path):
    from training.logging_utils import read_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 3}\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        read_log(log)


def test_bad_input_stops_before_work(retrieval_shards, tmp_path):
    raw = tiny_config(retrieval_shards, tmp_path / "run", data={"train": str(tmp_path / "none-{000..003}.tar")})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 2 and "none-{000..003}.tar" in proc.stderr
    raw = tiny_config(retrieval_shards, tmp_path / "run", optim={"max_step": 3})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 2 and "optim.max_step" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad config"


def test_training_learns_well_above_chance(retrieval_shards, tmp_path):
    """Held-out text->image R@1 beats chance by a wide margin after a short CPU run."""
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 120, "micro_batch_size": 32, "warmup_steps": 10},
                      schedule={"log_every": 20}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert after["retrieval/t2i_R@1"] >= 5 * after["retrieval/t2i_R@1_chance"]
    assert after["retrieval/i2t_R@1"] >= 5 * after["retrieval/t2i_R@1_chance"]
    assert after["retrieval/zeroshot_top1"] >= 2 * after["retrieval/zeroshot_top1_chance"]


def test_corrupt_samples_are_skipped_and_reported(retrieval_shards, tmp_path):
    """A truncated tar, a corrupt JPEG and a bad json: the run finishes and names each one."""
    from shards.writer import ShardSetWriter, encode_image
    from PIL import Image

    train = tmp_path / "train"
    with ShardSetWriter(train, shard_size=24) as writer:
        for i in range(48):
            image = encode_image(Image.new("RGB", (64, 64), (40 * (i % 6), 80, 120)), "jpg")
            meta = {"task": "retrieval", "caption": f"sample {i % 6}", "label": f"c{i % 6}", "source": f"s{i}"}
            if i == 5:
                image = image[: len(image) // 3]  # corrupt JPEG
            writer.write(f"s{i:04d}", {"jpg": image}, meta)
    bad_json = train / "shard-000002.tar"
    with ShardSetWriter(tmp_path / "extra", shard_size=24) as writer:
        writer.write("badjson", {"jpg": encode_image(Image.new("RGB", (64, 64)), "jpg")}, {"x": 1})
    (tmp_path / "extra" / "shard-000000.tar").rename(bad_json)
    _rewrite_json_member(bad_json, "badjson.json", b"{not json")
    whole = (train / "shard-000001.tar").read_bytes()
    (train / "shard-000001.tar").write_bytes(whole[: len(whole) * 2 // 3])  # truncated tar
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, data={"train": str(train), "num_workers": 1, "shuffle_buffer": 0},
                      optim={"max_steps": 8, "micro_batch_size": 8})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = json.loads((run / "metrics.json").read_text())["skipped_samples"]
    assert {"bad_image", "bad_json", "corrupt_tar"} <= set(skipped["by_reason"])
    records = [json.loads(line) for p in (run / "skipped").glob("*.jsonl") for line in p.read_text().splitlines()]
    named = {(Path(r["shard"]).name, r["key"], r["reason"]) for r in records}
    assert ("shard-000000.tar", "s0005", "bad_image") in named
    assert ("shard-000002.tar", "badjson", "bad_json") in named
    assert any(shard == "shard-000001.tar" and reason == "corrupt_tar" for shard, _, reason in named)
    assert "s0005" in proc.stdout + proc.stderr  # logged as it happens, too


def _rewrite_json_member(shard: Path, member: str, payload: bytes) -> None:
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            if info.name == member:
                content = payload
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(content))


def test_frozen_blocks_grad_checkpointing_and_wise_ft(retrieval_shards, tmp_path):
    from training.validation import config_from_dict
    from training.model import build_model
    from training.trainer import seed_everything

    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 3, "freeze_vision_blocks": 1,
                                                     "freeze_text_blocks": 1, "grad_checkpointing": True},
                      eval={"max_samples": 100, "batch_size": 100, "wise_ft_alphas": [0.5],
                            "general": str(retrieval_shards / "val")})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed_everything(0)
    initial = build_model(config_from_dict(raw))[0].state_dict()
    final = load_file(str(run / "final" / "model.safetensors"))
    for frozen in ("backbone.visual.conv1.weight", "backbone.visual.transformer.resblocks.0.mlp.c_fc.weight",
                   "backbone.token_embedding.weight", "backbone.transformer.resblocks.0.attn.in_proj_weight"):
        assert torch.equal(final[frozen], initial[frozen]), frozen
    for trained in ("backbone.visual.transformer.resblocks.1.mlp.c_fc.weight",
                    "backbone.transformer.resblocks.1.attn.in_proj_weight"):
        assert not torch.equal(final[trained], initial[trained]), trained
    result = json.loads((run / "metrics.json").read_text())
    wise = result["wise_ft"]
    assert set(wise) == {"0", "0.5", "1"} and set(wise["0.5"]) == {"val", "general"}
    assert wise["1"]["val"]["retrieval/t2i_R@1"] == pytest.approx(result["after"]["retrieval/t2i_R@1"])
    assert wise["0"]["val"]["retrieval/t2i_R@1"] == pytest.approx(result["before"]["retrieval/t2i_R@1"])


def test_resume_with_another_task_set_is_refused_naming_both(tmp_path):
    from training.checkpoint import check_resumable
    from training.config import ConfigError

    saved = {"model": {"name": "tiny-vit"}, "tasks": [{"name": "retrieval"}, {"name": "time"}]}
    state = {"tag": "step00000002", "config": saved}
    check_resumable(state, {**saved, "tasks": [{"name": "retrieval", "options": {}}, {"name": "time"}]}, tmp_path)
    for tasks in ([{"name": "retrieval"}], [{"name": "time"}, {"name": "retrieval"}]):
        with pytest.raises(ConfigError, match="was trained with tasks") as err:
            check_resumable(state, {**saved, "tasks": tasks}, tmp_path)
        assert "['retrieval', 'time']" in str(err.value) and str([t["name"] for t in tasks]) in str(err.value)


def test_pruning_keeps_the_last_complete_checkpoints_and_foreign_folders(tmp_path):
    """keep_checkpoints=2: of this trainer's tags up to ``latest``, the last two stay; a newer tag still
    being written, and folders it did not write (no run_state.json, or another name), are never deleted."""
    from training.checkpoint import RUN_STATE, _prune

    for step in (2, 4, 6, 8):
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / RUN_STATE).write_text("{}")
    (tmp_path / "step00000001").mkdir()  # the user's, no run_state.json
    (tmp_path / "step_notes").mkdir()
    (tmp_path / "latest").write_text("step00000006")  # step 8 is not complete yet
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step00000001", "step00000004", "step00000006", "step00000008", "step_notes"]


def test_time_based_checkpoints_follow_rank_zeros_clock():
    from training.schedule import CheckpointTimer

    now, asked = [0.0], []

    def agree(flag: bool) -> bool:
        asked.append(flag)
        return flag

    timer = CheckpointTimer(2.0, agree, clock=lambda: now[0])
    now[0] = 119.0
    assert not timer.due()
    now[0] = 120.0
    assert timer.due()
    timer.saved()
    now[0] = 200.0
    assert not timer.due() and asked == [False, True, False]
    assert CheckpointTimer(2.0, lambda flag: True, clock=lambda: 0.0).due()  # rank 0's answer wins
    off = CheckpointTimer(0, agree, clock=lambda: 1e9)
    assert not off.due() and len(asked) == 3  # off: no collective at all
