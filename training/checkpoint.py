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
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

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


def check_resumable(state: dict[str, Any], config: dict[str, Any], ckpt_dir: Path) -> None:
    """Refuse to resume a checkpoint of another model or task set, before DeepSpeed loads it."""
    saved = state["config"]
    for section in ("model", "tasks"):
        if section == "tasks":
            mine, theirs = [t["name"] for t in config["tasks"]], [t["name"] for t in saved["tasks"]]
        else:
            mine, theirs = config[section], saved[section]
        if mine != theirs:
            raise ConfigError(f"--resume: checkpoint {ckpt_dir / state['tag']} was trained with "
                              f"{section} = {theirs}, but this config has {section} = {mine}")


def save_checkpoint(engine, ckpt_dir: Path, step: int, run_state: dict[str, Any], dist_info: DistInfo,
                    keep: int) -> str:
    """Save a DeepSpeed checkpoint on every rank (DeepSpeed requires it), then prune old ones."""
    tag = f"step{step:08d}"
    if dist_info.is_main:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        (ckpt_dir / tag / RUN_STATE).write_text(json.dumps({**run_state, "tag": tag}, indent=1))
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    barrier()
    if dist_info.is_main:
        _prune(ckpt_dir, keep)
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
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
    save_file(full, str(final_dir / "model.safetensors"), metadata={"format": "pt"})
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    save_file(backbone, str(final_dir / "open_clip.safetensors"), metadata={"format": "pt"})
    (final_dir / "config.json").write_text(json.dumps(config, indent=1))
