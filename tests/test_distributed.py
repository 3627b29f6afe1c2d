"""ZeRO stages, two nodes on loopback, kill -9 and resume: the real deepspeed launcher on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEEPSPEED, ROOT, _free_port, _records, _train, _write_config, tiny_config
from training.checkpoint import consolidated_state_dict, latest_tag
from training.trainer import weights_digest


def _start_job(config: Path) -> tuple[subprocess.Popen, int]:
    """The 2-rank job in its own process group, so that it can be killed whole."""
    port = _free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/train.py", "--config", str(config)]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    return job, port


def _kill_job(job: subprocess.Popen, port: int) -> None:
    """kill -9 of the whole job. Its ranks cannot remove their all-reduce buffers then, so the test does."""
    from training.distributed import shm_buffer_path

    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    for rank in (0, 1):
        shm_buffer_path(rank, "127.0.0.1", port).unlink(missing_ok=True)


def _fresh_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    from training.validation import config_from_dict
    from training.model import build_model

    model, _ = build_model(config_from_dict(raw))
    return model.state_dict()


def _bf16_representable(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.float(), t.to(torch.bfloat16).float()))


# every stage on one process (the most common set-up: one GPU) and on two; bf16 at every stage; the fused
# AdamW kernel (optim.fused) under ZeRO's flat partitions and under ZeRO-3's
@pytest.mark.parametrize("stage,ranks,precision,fused", [
    (0, 1, "fp32", False), (1, 1, "bf16", False), (2, 1, "fp32", False), (3, 1, "bf16", True),
    (0, 2, "bf16", False), (1, 2, "bf16", False), (2, 2, "fp32", True), (3, 2, "fp32", False)])
def test_zero_stage_trains_and_writes_the_fp32_masters(retrieval_shards, tmp_path, stage, ranks, precision, fused):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, run={"audit": True},
                      deepspeed={"zero_stage": stage, "precision": precision},
                      optim={"max_steps": 3, "fused": fused}, eval={"max_samples": 20, "batch_size": 20})
    proc = _train(_write_config(tmp_path, raw), ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    kernel = "fused" if fused else "default"
    assert f"precision {precision}, ZeRO {stage}, world {ranks}, AdamW {kernel}" in proc.stdout + proc.stderr
    final = load_file(str(run / "final" / "model.safetensors"))
    fresh = _fresh_state_dict(raw)
    assert set(final) == set(fresh)
    assert all(final[k].shape == fresh[k].shape and final[k].dtype == fresh[k].dtype for k in fresh)
    assert not torch.equal(final["backbone.visual.conv1.weight"], fresh["backbone.visual.conv1.weight"])
    # fp32 masters, not a bf16 copy: trained weights keep bits that bf16 cannot hold
    trained = [k for k in fresh if k.startswith("backbone.") and final[k].is_floating_point() and final[k].numel() > 64]
    assert not any(_bf16_representable(final[k]) for k in trained)
    # final/ is what a --resume would continue from: the last checkpoint's weights, consolidated (ZeRO 0-2
    # write final/ from the live module, ZeRO 3 from the checkpoint)
    ckpt_dir = run / "checkpoints"
    saved = consolidated_state_dict(ckpt_dir, latest_tag(ckpt_dir), stage)
    assert set(saved) == set(final) and weights_digest(saved) == weights_digest(final)
    if stage < 3:  # every rank's module holds the full fp32 weights the engine trained: the final ones
        digests = {json.loads(p.read_text())["sha256"] for p in (run / "audit").glob("weights-rank*.json")}
        assert digests == {weights_digest(final)}
        assert weights_digest(final) != weights_digest(fresh)  # the digest sees the values


def test_two_nodes_on_loopback(retrieval_shards, tmp_path):
    """Node ranks 0 and 1 on 127.0.0.1, one rank each, through a hostfile and --no_ssh."""
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, run={"audit": True}, optim={"max_steps": 4})
    config = _write_config(tmp_path, raw)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py",
                               "--config", str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    digests = [json.loads((run / "audit" / f"weights-rank{r}.json").read_text())["sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]
    keys = [{k for line in (run / "audit" / f"keys-rank{r}.jsonl").read_text().splitlines()
             for k in json.loads(line)["keys"]} for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def _audit_steps(run: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def test_kill_9_then_resume_uses_every_sample_once(retrieval_shards, tmp_path):
    """kill -9 of the whole job mid-epoch, then --resume: same step, same schedule, same data position."""
    run = tmp_path / "run"
    # 1600 samples / (2 ranks x 16) = 50 steps: exactly one epoch
    raw = tiny_config(retrieval_shards, run, run={"audit": True}, optim={"max_steps": 50, "warmup_steps": 5},
                      schedule={"checkpoint_every": 10, "log_every": 1}, data={"shuffle_buffer": 50})
    config = _write_config(tmp_path, raw)
    job, port = _start_job(config)
    keys_file = run / "audit" / "keys-rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        if keys_file.is_file() and max((s for s, _ in _audit_steps(run, 0)), default=0) >= 25:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    _kill_job(job, port)
    killed_at = max(s for s, _ in _audit_steps(run, 0))
    assert 25 <= killed_at < 49
    checkpoint_step = 10 * (killed_at // 10)  # the last checkpoint before the kill
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{checkpoint_step:08d}"

    proc = _train(config, "--resume", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step{checkpoint_step:08d}'} at step {checkpoint_step}" in proc.stdout
    train_steps = [r["step"] for r in _records(run, "train")]
    assert train_steps[-(50 - checkpoint_step):] == list(range(checkpoint_step + 1, 51))
    # learning-rate schedule position: the resumed step's lr equals the uninterrupted schedule's
    from training.schedule import lr_multiplier

    first_resumed = [r for r in _records(run, "train") if r["step"] == checkpoint_step + 1][-1]
    expected = 1e-3 * lr_multiplier(checkpoint_step, 5, 50, 0.0)  # the rate step checkpoint_step+1 uses
    assert first_resumed["lr_heads/no_decay"] == pytest.approx(expected)

    # data position: the last record of each step wins (a resumed run rewrites replayed steps)
    used: dict[str, int] = {}
    for rank in (0, 1):
        by_step = dict(_audit_steps(run, rank))
        assert sorted(by_step) == list(range(50))
        for keys in by_step.values():
            for key in keys:
                used[key] = used.get(key, 0) + 1
    assert len(used) == 1600 and set(used.values()) == {1}
    # what was trained twice is exactly the steps between the checkpoint and the kill
    replayed = [s for s, _ in _audit_steps(run, 0)].count(checkpoint_step)
    assert replayed == 2


def test_kill_during_checkpoint_save_leaves_previous_usable(retrieval_shards, tmp_path):
    """A save cut off mid-write (its folder half written, ``latest`` not yet updated) is ignored."""
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 4}, schedule={"checkpoint_every": 2})
    config = _write_config(tmp_path, raw)
    assert _train(config).returncode == 0
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000004"
    # the on-disk state of a kill during the save of step 6: run_state.json and a truncated model file
    partial = ckpt / "step00000006"
    partial.mkdir()
    (partial / "run_state.json").write_text((ckpt / "step00000004" / "run_state.json").read_text())
    whole = (ckpt / "step00000004" / "mp_rank_00_model_states.pt").read_bytes()
    (partial / "mp_rank_00_model_states.pt").write_bytes(whole[: len(whole) // 2])
    proc = _train(config, "--resume", "optim.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step00000004" in proc.stdout + proc.stderr
    assert (ckpt / "latest").read_text().strip() == "step00000006"


def test_real_kill_while_a_checkpoint_is_being_written(retrieval_shards, tmp_path):
    """kill -9 while a save is in progress (its folder exists, ``latest`` not yet moved), then resume."""
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 16}, schedule={"checkpoint_every": 1},
                      eval={"max_samples": 50, "batch_size": 50})
    config = _write_config(tmp_path, raw)
    job, port = _start_job(config)
    ckpt = run / "checkpoints"
    in_progress = None
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and in_progress is None:
        latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else ""
        newer = sorted(p.name for p in ckpt.glob("step*") if p.name > latest) if latest else []
        if newer:  # a save has started and not finished: kill the whole job now
            _kill_job(job, port)
            in_progress = newer[-1]
        time.sleep(0.001)
    if in_progress is None:
        _kill_job(job, port)
    assert in_progress is not None, "never caught a save in progress"
    previous = (ckpt / "latest").read_text().strip()
    assert previous < in_progress
    proc = _train(config, "--resume", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt / previous}" in proc.stdout
