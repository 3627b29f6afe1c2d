"""DeepSpeed checkpoints that survive a kill mid-save, and the consolidated final weights.

Layout of ``<run>/checkpoints``: one folder per tag (``step00000100``) written by
``engine.save_checkpoint`` and DeepSpeed's ``latest`` file, which DeepSpeed rewrites only after
every rank finished writing the tag. So a kill during a save leaves ``latest`` pointing at the
previous, complete tag. Our own ``run_state.json`` (resolved config, step, data position) is
written into the tag folder *before* DeepSpeed writes the tag, so a tag named by ``latest``
always has it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from shards.atomic import atomic_path, write_json

from training.config import ConfigError
from training.distributed import DistInfo, barrier

RUN_STATE = "run_state.json"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag of the last complete checkpoint, or None."""
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def read_run_state(ckpt_dir: Path) -> dict[str, Any] | None:
    """``run_state.json`` of the last complete checkpoint, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return json.loads((ckpt_dir / tag / RUN_STATE).read_text())


def stream_layout(config: dict[str, Any], world_size: int | None) -> dict[str, Any]:
    """What positions the data streams after a resume: shards, batch sizes, sampling, seed, ranks x workers.
    A resume with any of it changed would continue at a position that means something else."""
    data, optim = config["data"], config["optim"]
    tasks = {t["name"]: {"train": t.get("train") or data.get("train"),
                         "micro_batch_size": t.get("micro_batch_size") or optim["micro_batch_size"],
                         "sampling_weight": t.get("sampling_weight", 1.0)} for t in config["tasks"]}
    return {"tasks": tasks, "grad_accum": optim.get("grad_accum", 1), "seed": config["run"]["seed"],
            "num_workers": data.get("num_workers"), "resample": data.get("resample"),
            "shuffle_buffer": data.get("shuffle_buffer"), "world_size": world_size}


def check_resumable(state: dict[str, Any], config: dict[str, Any], ckpt_dir: Path,
                    world_size: int | None = None) -> None:
    """Refuse to resume a checkpoint of another model or task set, or whose data stream or batch layout
    changed (both values named), before DeepSpeed loads it. Another world size alone is allowed (an
    elastic resume, :mod:`training.elastic`) unless the ZeRO stage changed too."""
    saved = state["config"]
    where = f"--resume: checkpoint {ckpt_dir / state['tag']} was trained with"
    for section in ("model", "tasks"):
        if section == "tasks":
            mine, theirs = [t["name"] for t in config["tasks"]], [t["name"] for t in saved["tasks"]]
        else:
            mine, theirs = config[section], saved[section]
        if mine != theirs:
            raise ConfigError(f"{where} {section} = {theirs}, but this config has {section} = {mine}")
    if "layout" not in state:  # a checkpoint from before the layout was recorded: nothing to compare
        return
    mine, theirs = stream_layout(config, world_size), state["layout"]
    if world_size is not None and theirs.get("world_size") not in (None, world_size):
        # an elastic resume (training/elastic.py): the streams are repositioned by rule, so the batch
        # sizes may change with the world size (e.g. to keep the global batch)
        mine, theirs = _without_batch_sizes(mine), _without_batch_sizes(theirs)
    changed = [f"{key}: {theirs.get(key)!r} -> {mine[key]!r}" for key in mine if theirs.get(key) != mine[key]]
    if changed:
        raise ConfigError(f"{where} another data stream or batch layout ({'; '.join(changed)}); the position it "
                          "resumes at would mean other samples. Resume with the same settings, or start a new run")
    if world_size is not None:
        from training.elastic import check_elastic

        check_elastic(state, config, world_size)


def _without_batch_sizes(layout: dict[str, Any]) -> dict[str, Any]:
    """A stream layout less what an elastic resume may change: world size, micro batch sizes, grad_accum."""
    tasks = {name: {k: v for k, v in t.items() if k != "micro_batch_size"} for name, t in layout["tasks"].items()}
    return {**{k: v for k, v in layout.items() if k not in ("world_size", "grad_accum")}, "tasks": tasks}


class RunLock:
    """An exclusive lock on a run folder for the life of a job: two jobs never write one run."""

    def __init__(self, run_dir: Path):
        import fcntl

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(f"{run_dir} is in use by another training job ({holder}); wait for it or choose "
                              "another run.output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor releases the flock


def save_checkpoint(engine, ckpt_dir: Path, step: int, run_state: dict[str, Any], dist_info: DistInfo,
                    keep: int, mirror=None) -> str:
    """Save a DeepSpeed checkpoint on every rank (DeepSpeed requires it), then prune old ones; with a
    :class:`~training.remote_runs.RunMirror` of an fsspec run, mirror the complete checkpoint there."""
    tag = f"step{step:08d}"
    if dist_info.is_main:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        write_json(ckpt_dir / tag / RUN_STATE, {**run_state, "tag": tag})
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    barrier()
    if dist_info.is_main:
        _prune(ckpt_dir, keep)
    if mirror is not None:
        mirror.push_checkpoint(tag)
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the last ``keep`` complete checkpoints up to ``latest``. Only tags this trainer wrote
    (``step<8 digits>`` holding its run_state.json) are candidates: any other folder there is left alone."""
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step" + "[0-9]" * 8) if (p / RUN_STATE).is_file())
    complete_up_to = tags.index(current) if current in tags else -1
    for name in tags[: max(0, complete_up_to + 1 - keep)]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def _deepspeed_safe_globals() -> list[Any]:
    """The few non-tensor types DeepSpeed 0.19 pickles into its optimizer states (found by loading them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's too, which asks for ``weights_only=False``) unpickles
    tensors and the allow-listed types only, so a payload planted in a checkpoint never runs on --resume."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def final_state_dict(engine, ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights for ``final/`` (call on one rank).

    ZeRO 0–2 keep every weight whole on every rank (the engine's weights are always fp32: bf16 is the
    towers' autocast), so they are read from the live module: no second copy of the model and none of
    the optimizer state the checkpoint holds (about +1 GiB at ViT-B-32). ZeRO 1/2's weights are disjoint
    views into DeepSpeed's flat buffers, which safetensors writes as they are. Only ZeRO 3, whose ranks
    hold shards, consolidates the checkpoint just written.
    """
    if zero_stage == 3:
        return consolidated_state_dict(ckpt_dir, tag, zero_stage)
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage (call on one rank); tensors only are unpickled."""
    with weights_only_loading():
        if zero_stage == 0:
            states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def write_final(state_dict: dict[str, torch.Tensor], final_dir: Path, config: dict[str, Any]) -> None:
    """``model.safetensors`` (all weights) and ``open_clip.safetensors`` (backbone alone)."""
    final_dir.mkdir(parents=True, exist_ok=True)
    full = {k: v.contiguous() for k, v in state_dict.items()}
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    # config.json last: load_run needs both files, so a kill in between leaves no half-written final/
    (final_dir / "config.json").unlink(missing_ok=True)
    for name, tensors in (("model.safetensors", full), ("open_clip.safetensors", backbone)):
        with atomic_path(final_dir / name) as tmp:  # streamed from the tensors: no in-memory copy of the file
            save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(final_dir / "config.json", config)
