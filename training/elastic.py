"""Resume a run on another number of ranks (docs/checkpoints.md, "Elastic resume").

A ZeRO-1/2 checkpoint holds one optimizer partition per rank, so it only loads on the world size that
wrote it. On another world size ``--resume`` converts the checkpoint once into DeepSpeed's *universal*
format (one folder per parameter: fp32 weights, Adam moments, step; world-size free) with
:mod:`deepspeed.checkpoint.ds_to_universal`, into ``checkpoints/universal/<tag>`` (built under a
temporary name, renamed when complete; the original tag is only read), and the engine loads it with
``"checkpoint": {"load_universal": true}``. A ZeRO-0 checkpoint holds the whole optimizer in its one
model-states file: it loads on any world size as it is. ZeRO-3 is refused (:data:`ZERO3_REASON`).

The data streams cannot continue at the same samples: each rank reads another share of the shards on
another world size. :func:`repositioned_task_batches` keeps the *epoch* and the *fraction of it* consumed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.atomic import write_json

from training.config import ConfigError
from training.distributed import DistInfo

log = logging.getLogger("multiclip.elastic")

UNIVERSAL = "universal"  # sub-folder of <run>/checkpoints holding converted checkpoints
CONVERTED_FROM = "converted_from.json"  # written last inside a converted folder, before its rename
ELASTIC_STAGES = (0, 1, 2)
# Why not ZeRO-3 (DeepSpeed 0.19.8, checked): its universal loading
# (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3) gives every parameter group the first
# group's hyperparameters, so the no-decay groups get weight decay and the heads the backbone's rate; and
# after a 2-rank checkpoint of step 2 and one step on 1 rank, Adam counted step 5, not 3.
ZERO3_REASON = ("DeepSpeed 0.19.8 loads a ZeRO-3 universal checkpoint with the first parameter group's "
                "lr and weight_decay in every group (ours differ) and a wrong Adam step count")


@dataclass(frozen=True)
class ResumeSource:
    """Where the engine loads a resumed run from, and how."""

    load_dir: Path  # what engine.load_checkpoint reads (<run>/checkpoints, or its universal/ folder)
    saved_world_size: int | None  # the world size that wrote the checkpoint (None: not recorded)
    world_size: int  # this job's
    universal: bool  # load with "checkpoint": {"load_universal": true}

    @property
    def elastic(self) -> bool:
        return self.saved_world_size is not None and self.saved_world_size != self.world_size


def saved_world_size(state: dict[str, Any]) -> int | None:
    """The world size a checkpoint was written on (from its recorded stream layout)."""
    return state.get("layout", {}).get("world_size")


def saved_zero_stage(state: dict[str, Any]) -> int:
    return int(state["config"].get("deepspeed", {}).get("zero_stage", 0))


def check_elastic(state: dict[str, Any], config: dict[str, Any], world_size: int) -> None:
    """Refuse an elastic resume that cannot be done: another ZeRO stage than the checkpoint's (its files
    would be of another kind), or a stage the conversion does not handle."""
    old = saved_world_size(state)
    if old is None or old == world_size:
        return
    saved, mine = saved_zero_stage(state), int(config["deepspeed"]["zero_stage"])
    where = f"--resume on {world_size} rank(s) of checkpoint {state['tag']} written on {old}"
    if saved != mine:
        raise ConfigError(f"{where}: it was trained with deepspeed.zero_stage = {saved}, this config has {mine}; "
                          "an elastic resume keeps the ZeRO stage")
    if saved not in ELASTIC_STAGES:
        raise ConfigError(f"{where}: not with ZeRO-3: {ZERO3_REASON}. Resume it on {old} rank(s) (the checkpoint's "
                          "world size), or train with deepspeed.zero_stage 0, 1 or 2 to change the world size")


def resume_source(state: dict[str, Any], ckpt_dir: Path, dist_info: DistInfo) -> ResumeSource:
    """Where to load ``state``'s checkpoint from on this world size; on another world size with ZeRO
    1-2, rank 0 converts it to a universal checkpoint first (the others wait, and fail with it)."""
    from training.distributed import rank0_decides

    old = saved_world_size(state)
    plain = ResumeSource(ckpt_dir, old, dist_info.world_size, universal=False)
    if not plain.elastic or saved_zero_stage(state) == 0:
        return plain
    root, error = ckpt_dir / UNIVERSAL, None
    if dist_info.is_main:
        try:
            convert_to_universal(ckpt_dir, state["tag"], root)
        except Exception as err:  # noqa: BLE001  (re-raised below, after the other ranks heard of it)
            error = err
    if not rank0_decides(error is None, dist_info.device):
        if error is not None:
            raise error
        raise ConfigError(f"--resume: rank 0 could not convert {ckpt_dir / state['tag']} to a universal checkpoint "
                          "(its error is in rank 0's log)")
    return ResumeSource(root, old, dist_info.world_size, universal=True)


def convert_to_universal(ckpt_dir: Path, tag: str, root: Path) -> Path:
    """``root/<tag>``: the universal form of checkpoint ``ckpt_dir/<tag>``, converted unless a complete one
    is there already. Built in ``root/.partial-<tag>-<pid>`` and renamed, so a kill mid-conversion never
    leaves a folder that looks complete; older conversions this module wrote are removed after."""
    from deepspeed.checkpoint import ds_to_universal

    from training.checkpoint import weights_only_loading

    target = root / tag
    if (target / CONVERTED_FROM).is_file():
        return target
    if target.exists():
        raise ConfigError(f"--resume: {target} exists but was not written by an elastic resume (no {CONVERTED_FROM}); "
                          "move it away to convert the checkpoint there")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".partial-{tag}-*"):  # ours, from a conversion that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = root / f".partial-{tag}-{os.getpid()}"
    args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(staging / tag),
                              num_extract_workers=1, num_merge_workers=1,  # in this process: loads stay weights-only
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    log.info("converting checkpoint %s to a universal checkpoint in %s", ckpt_dir / tag, target)
    with weights_only_loading():
        ds_to_universal.main(args)
    write_json(staging / tag / CONVERTED_FROM, {"source": str(ckpt_dir / tag), "tag": tag})
    os.rename(staging / tag, target)
    shutil.rmtree(staging, ignore_errors=True)
    _remove_older_conversions(root, keep=tag)
    return target


def _remove_older_conversions(root: Path, keep: str) -> None:
    """Only folders holding this module's marker are removed: anything else there is left alone."""
    for folder in root.iterdir():
        if folder.name != keep and (folder / CONVERTED_FROM).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def tolerate_empty_partitions(optimizer, source: ResumeSource | None) -> None:
    """Let a rank load a universal checkpoint when its ZeRO partition holds no element of some parameter
    group: a group smaller than the ranks' alignment, e.g. a head's two no-decay scalars on 2 ranks, at
    any model size. DeepSpeed 0.19.8's loader (base_optimizer.py,
    ``load_hp_checkpoint_state_from_checkpoint_dir``) takes ``steps[0]`` of such a group's empty list and
    fails with IndexError; on such a rank this module's loader runs instead (:func:`_load_universal_state`).
    Other ranks keep DeepSpeed's own."""
    import types

    if source is None or not source.universal or not _empty_groups(optimizer):
        return
    optimizer.load_hp_checkpoint_state_from_checkpoint_dir = types.MethodType(_load_universal_state, optimizer)


def _empty_groups(optimizer) -> list[int]:
    """Indices of the parameter groups this rank's ZeRO-1/2 partition holds no element of."""
    groups = getattr(optimizer, "bit16_groups", [])
    return [i for i, lps in enumerate(groups) if all(getattr(lp, "_hp_mapping", None) is None for lp in lps)]


def _load_universal_state(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed's universal loading of a ZeRO-1/2 optimizer (``self``), for a rank that holds nothing of some
    group. Every group takes its hyperparameters from the checkpoint, as in DeepSpeed; the groups this rank
    holds elements of load their fp32 fragments and Adam moments (``load_hp_checkpoint_state``); a group it
    holds nothing of gets the checkpoint's step count (its parameters' ``step.pt``) and zero moments: its
    partition is only padding, which no weight reads. Tensor parallelism and experts are not used here."""
    import torch
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    if self.mpu is not None:
        raise ConfigError("elastic resume: the universal loader for empty ZeRO partitions supports no model parallelism")
    zero_dir = os.path.join(checkpoint_dir, "zero")
    saved = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), weights_only=True)
    self._load_global_state(saved)
    lp_groups, state = getattr(self, lp_groups_name), self.optimizer.state
    moment_keys: set[str] = set()
    padding_only = []
    for i, (group, saved_group) in enumerate(zip(self.optimizer.param_groups, saved["param_groups"])):
        hp_param = group["params"][0]
        held = [lp for lp in lp_groups[i] if lp._hp_mapping is not None]
        steps = [lp.load_hp_checkpoint_state(os.path.join(zero_dir, self.param_names[lp]), 0, 1) for lp in held]
        keys = {key for lp in held for key in lp._hp_mapping.get_optim_state_keys()}
        moment_keys |= keys
        if held:
            if any(not _same_step(s, steps[0]) for s in steps):
                raise ConfigError(f"elastic resume: parameter group {i} has unequal Adam steps {steps} in {checkpoint_dir}")
            if steps[0] is not None:
                state[hp_param]["step"] = steps[0]
            map_to_flat_opt_states(hp_param, lp_groups[i], state, keys)
        else:
            padding_only.append(i)
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for i in padding_only if moment_keys else ():  # no moments known: AdamW starts this padding afresh
        hp_param = self.optimizer.param_groups[i]["params"][0]
        step_file = os.path.join(zero_dir, self.param_names[lp_groups[i][0]], "step.pt")
        if os.path.isfile(step_file):
            state[hp_param]["step"] = torch.load(step_file, weights_only=True)
        for key in moment_keys:
            state[hp_param][key] = torch.zeros_like(hp_param)


def _same_step(a: Any, b: Any) -> bool:
    return float(a) == float(b) if a is not None and b is not None else a is b


def place_adam_steps(optimizer) -> None:
    """Put every Adam ``step`` a universal load set where torch's AdamW expects it. DeepSpeed assigns the
    tensors as ``torch.load`` gives them (saved device and dtype) instead of going through
    ``load_state_dict``, which would place them: the fused kernel needs float32 steps on the parameters'
    device, the for-loop one a CPU step."""
    import torch

    for group in optimizer.param_groups:
        on_param_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                device = param.device if on_param_device else torch.device("cpu")
                optimizer.state[param]["step"] = step.to(device=device, dtype=torch.float32)


def with_universal_loading(ds_config: dict[str, Any], source: ResumeSource | None) -> dict[str, Any]:
    """The DeepSpeed config, with ``checkpoint.load_universal`` on when ``source`` is universal."""
    if source is None or not source.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def repositioned_batches(taken: int, per_epoch_before: int, per_epoch_now: int) -> int:
    """Micro batches per rank to skip on the new world size: the same epoch, and the same fraction of it,
    rounded down to a whole micro batch.

    ``per_epoch_*``: a rank's micro batches in one epoch before and now. Within that epoch the new ranks
    split the shards differently, so the rest of it is read in another order: a sample of it may be seen
    twice or not at all; from the next epoch on every sample is read once per epoch again.
    """
    epoch, into = divmod(taken, per_epoch_before)
    return epoch * per_epoch_now + into * per_epoch_now // per_epoch_before


def micro_batches_per_epoch(samples: int, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    """A rank's micro batches in one epoch (whole optimizer steps, as training.data.steps_per_epoch)."""
    return max(1, samples // (micro_batch_size * grad_accum * world_size)) * grad_accum


def reposition(taken: dict[str, int], saved_layout: dict[str, Any], cfg, source: ResumeSource) -> dict[str, int]:
    """Each task's micro batches per rank on this world size (and batch layout) after an elastic resume:
    :func:`repositioned_batches` of the saved counts, with the saved layout's batch sizes per epoch."""
    from shards.samples import count_samples, expand_urls

    out = {}
    for name, n in taken.items():
        samples = count_samples(expand_urls(cfg.train_shards(name)))
        saved_task = saved_layout["tasks"].get(name, {})
        before = micro_batches_per_epoch(samples, saved_task.get("micro_batch_size", cfg.micro_batch_size(name)),
                                         saved_layout.get("grad_accum", 1), source.saved_world_size)
        now = micro_batches_per_epoch(samples, cfg.micro_batch_size(name), cfg.optim.grad_accum, source.world_size)
        out[name] = repositioned_batches(n, before, now)
    log.info("elastic resume: checkpoint written on %d rank(s), resumed on %d%s; micro batches per rank %s -> %s",
             source.saved_world_size, source.world_size, " from a universal checkpoint" if source.universal else "",
             json.dumps(taken), json.dumps(out))
    return out
