"""The one training loop for every task, on DeepSpeed. Read it top to bottom:

setup (process group, model, engine, data) -> resume -> evaluate -> loop (pick task, forward,
engine.backward, engine.step, log, evaluate, checkpoint) -> final evaluation -> final weights.

DeepSpeed owns gradient accumulation, clipping, the optimizer and the scheduler step; the batch
sizes come from the typed config only (``train_batch_size`` is derived, never asked for).
"""
from __future__ import annotations

import json
import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from shards.atomic import write_json, write_text
from shards.samples import read_skip_logs, summarize_skips
from training import checkpoint as ckpt
from training import feature_cache
from training.config import Config, load_deepspeed_overrides
from training import accelerator
from training.data import device_image_norm, steps_per_epoch, to_device, train_loader
from training.evaluation import HELD_OUT_SKIPS, evaluate_model, held_out_skips, load_weights
from training.distributed import DistInfo, barrier, init_distributed, rank0_decides
from training.logging_utils import RunLogger, check_log_backends, plot_curves, setup_console_logging
from training import elastic, wise_ft
from training.model import build_model
from training.params import adamw_kernel, build_optimizer, freeze_first_blocks, param_groups
from training.remote_runs import RunMirror
from training.zero3 import promote_scalar_parameters, register_zero3_external_parameters, restore_scalar_shapes
from training.schedule import CheckpointTimer, lr_multiplier

log = logging.getLogger("multiclip.train")


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON, built from the typed config (plus the user's ds_config overrides).

    The engine is always fp32 (no DeepSpeed ``bf16``/``fp16`` section): bf16 compute is the towers'
    autocast (:mod:`training.accelerator`), so masters, gradients and checkpoints stay fp32.
    """
    ds = {
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    for key, value in load_deepspeed_overrides(cfg).items():  # sections merge key by key
        ds[key] = {**ds[key], **value} if isinstance(value, dict) and isinstance(ds.get(key), dict) else value
    return ds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run one training job as configured; returns the final metrics (on every rank)."""
    import deepspeed

    dist_info: DistInfo = init_distributed()
    setup_console_logging(dist_info.is_main)
    check_log_backends(cfg.log)  # e.g. log.wandb without wandb installed: a ConfigError before any work
    mirror = RunMirror.for_config(cfg, dist_info)  # an fsspec URL: a local staging folder, mirrored there
    run_dir, ckpt_dir = mirror.local_dir, mirror.local_dir / "checkpoints"
    lock = ckpt.RunLock(run_dir) if dist_info.is_main else None  # one job per run folder
    if resume:
        mirror.pull_latest_checkpoint()
    run_state = ckpt.read_run_state(ckpt_dir) if resume else None
    if run_state is not None:
        ckpt.check_resumable(run_state, cfg.to_dict(), ckpt_dir, dist_info.world_size)
    source = elastic.resume_source(run_state, ckpt_dir, dist_info) if run_state is not None else None
    if dist_info.is_main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.run.seed)

    # model, optimizer, schedule, engine
    model, backbone = build_model(cfg)
    if cfg.model.init_weights and run_state is None:  # e.g. stage 2 from stage 1's final weights
        load_weights(model, cfg.model.init_weights, allow_missing_heads=True)
        log.info("initialised from %s", cfg.model.init_weights)
    freeze_first_blocks(model.backbone, cfg.optim.freeze_vision_blocks, cfg.optim.freeze_text_blocks)
    if cfg.optim.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    initial_backbone = wise_ft.snapshot(model.backbone) if cfg.eval.wise_ft_alphas or cfg.eval.general else None
    scalar_names = promote_scalar_parameters(model)
    precision = accelerator.resolve_precision(cfg.deepspeed.precision)
    groups = param_groups(model, cfg.optim.lr_backbone, cfg.optim.lr_head, cfg.optim.weight_decay,
                          cfg.optim.freeze_backbone)
    optimizer = build_optimizer(groups, cfg.optim.betas, cfg.optim.eps, cfg.optim.fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=elastic.with_universal_loading(deepspeed_config(cfg), source))
    if dist_info.world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # no peers: skip the bucketed all-reduce of every gradient. Only without ZeRO, whose
        # optimizer moves gradients into its partitions during that same epilogue.
        engine.enable_backward_allreduce = False
    if cfg.deepspeed.zero_stage == 3:
        register_zero3_external_parameters(engine.module)
    accelerator.apply_precision(engine.module, precision)
    log.info("device %s, backend %s, precision %s, ZeRO %d, world %d, AdamW %s", dist_info.device,
             accelerator.backend(), precision, cfg.deepspeed.zero_stage, dist_info.world_size, adamw_kernel(optimizer))

    step = 0
    if run_state is not None:
        elastic.tolerate_empty_partitions(engine.optimizer, source)
        with ckpt.weights_only_loading():  # a pickled payload in a checkpoint must not run
            engine.load_checkpoint(str(source.load_dir), tag=run_state["tag"])
        if source.universal:
            elastic.place_adam_steps(optimizer)
        step = run_state["step"]
        log.info("resumed from %s at step %d", ckpt_dir / run_state["tag"], step)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)

    # data: one endless stream per task, positioned where the checkpoint left it
    task_names = list(model.heads)
    task_weights = [cfg.task(name).sampling_weight for name in task_names]
    taken = _task_batches(run_state, task_names, step * cfg.optim.grad_accum)
    if source is not None and source.elastic:  # another world size: same epoch, same fraction of it
        taken = elastic.reposition(taken, run_state["layout"], cfg, source)
    layout = ckpt.stream_layout(cfg.to_dict(), dist_info.world_size)
    streams = {name: _positioned_stream(cfg, model.heads[name], backbone, dist_info, run_dir, taken[name])
               for name in task_names}
    epoch_steps = steps_per_epoch(cfg, dist_info.world_size)

    for head in model.heads.values():
        head.prepare(engine.module.backbone)
    logger = RunLogger(run_dir, dist_info.is_main, cfg.log, cfg.to_dict())
    held_out_dir = run_dir / "skipped" / HELD_OUT_SKIPS  # one folder per task, one file per rank

    def evaluate() -> dict[str, Any]:
        return evaluate_model(engine.module, backbone, cfg, skip_dir=held_out_dir, rank=dist_info.rank)

    baseline = evaluate() if run_state is None and cfg.eval.before_training else None
    if baseline is not None:
        logger.log({"kind": "eval", "step": step, **baseline})
        log.info("before training: %s", json.dumps(baseline))

    image_norm = device_image_norm(cfg, backbone)  # (mean, std) for uint8 batches, else None
    progress = _progress_bar(dist_info.is_main, cfg.optim.max_steps, step)
    tick, window_samples, reports = time.time(), 0, []
    timer = CheckpointTimer(cfg.schedule.checkpoint_every_minutes, partial(rank0_decides, device=dist_info.device))
    while step < cfg.optim.max_steps:
        lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}

        def draw(micro: int, step: int = step) -> dict[str, Any]:
            name = _pick_task(cfg.run.seed, step, micro, task_names, task_weights)
            taken[name] += 1
            batch = to_device(next(streams[name]), dist_info.device, image_norm)
            if cfg.run.audit:
                _audit_keys(run_dir, dist_info.rank, step, batch["key"])
            return batch

        # forward, engine.backward, engine.step per micro batch (accum_mode features: all embedded first)
        for batch, loss, report in feature_cache.accumulate(engine, draw, cfg.optim.grad_accum, cfg.optim.accum_mode,
                                                            dist_info.device):
            reports.append({"loss": loss.detach(), **report})  # tensors: no host sync per micro step
            window_samples += cfg.micro_batch_size(batch["task"]) * dist_info.world_size
        step += 1
        progress.update(1)
        if step % cfg.schedule.log_every == 0 or step == cfg.optim.max_steps:
            record = _train_record(step, epoch_steps, reports, window_samples, time.time() - tick, lrs)
            if accelerator.on_gpu():
                record["peak_memory_gib"] = accelerator.peak_memory_gib()
            logger.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
            tick, window_samples, reports = time.time(), 0, []
        if cfg.schedule.eval_every and step % cfg.schedule.eval_every == 0 and step < cfg.optim.max_steps:
            logger.log({"kind": "eval", "step": step, **evaluate()})
        if (cfg.schedule.checkpoint_every and step % cfg.schedule.checkpoint_every == 0) or timer.due():
            timer.saved()
            ckpt.save_checkpoint(engine, ckpt_dir, step, {"step": step, "config": cfg.to_dict(),
                                                          "task_batches": taken, "layout": layout},
                                 dist_info, cfg.schedule.keep_checkpoints, mirror)
    progress.close()

    final = evaluate()
    logger.log({"kind": "eval", "step": step, **final})
    tag = ckpt.save_checkpoint(engine, ckpt_dir, step, {"step": step, "config": cfg.to_dict(),
                                                        "task_batches": taken, "layout": layout},
                               dist_info, cfg.schedule.keep_checkpoints, mirror)
    result = {"step": step, "before": baseline, "after": final,
              "headline": {name: list(head.headline_metrics) for name, head in model.heads.items()},
              "skipped_samples": skipped_samples(run_dir / "skipped")}
    if dist_info.is_main:
        state = restore_scalar_shapes(ckpt.final_state_dict(engine, ckpt_dir, tag, cfg.deepspeed.zero_stage),
                                      scalar_names)
        ckpt.write_final(state, run_dir / "final", cfg.to_dict())
        if initial_backbone is not None:
            result["wise_ft"] = wise_ft.evaluate_interpolations(cfg, initial_backbone, state)
            logger.log({"kind": "wise_ft", "step": step, **wise_ft.flatten(result["wise_ft"])})
        write_json(run_dir / "metrics.json", result)
        plot_curves(logger.path, run_dir / "curves.png",
                    [f"{task}/{name}" for task, names in result["headline"].items() for name in names])
        log.info("after training: %s", json.dumps(final))
        log.info("skipped samples: %s", json.dumps(result["skipped_samples"]))
    if cfg.run.audit:
        _audit_weights(run_dir, dist_info.rank, engine.module, cfg.deepspeed.zero_stage)
    logger.close()
    mirror.push_outputs()
    barrier()
    if lock is not None:
        lock.release()
    return result


def skipped_samples(skip_dir: Path) -> dict[str, Any]:
    """metrics.json's ``skipped_samples``: ``count`` and ``by_reason`` over training and held-out samples,
    then each part: ``train`` (every skip of the training streams, once per epoch it recurs) and
    ``held_out`` (the samples the last evaluation skipped, each once, with ``by_task``)."""
    train = summarize_skips(read_skip_logs(skip_dir))
    held_out = held_out_skips(skip_dir / HELD_OUT_SKIPS)
    by_reason = dict(train["by_reason"])
    for reason, n in held_out["by_reason"].items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    return {"count": train["count"] + held_out["count"], "by_reason": dict(sorted(by_reason.items())),
            "train": train, "held_out": held_out}


def _pick_task(seed: int, step: int, micro: int, names: list[str], weights: list[float]) -> str:
    """The task of one micro batch: the same on every rank (collectives must match) and after a resume."""
    if len(names) == 1:
        return names[0]
    return random.Random(f"{seed}/{step}/{micro}").choices(names, weights)[0]


def _task_batches(run_state: dict[str, Any] | None, names: list[str], consumed: int) -> dict[str, int]:
    """Micro batches each task has taken so far (checkpoints before mixed jobs only knew the step)."""
    if run_state and "task_batches" in run_state:
        return {name: run_state["task_batches"].get(name, 0) for name in names}
    return {name: consumed if len(names) == 1 else 0 for name in names}


def _positioned_stream(cfg: Config, task, backbone, dist_info: DistInfo, run_dir: Path, taken: int):
    """The task's endless stream, at the epoch and micro batch where ``taken`` batches left it."""
    per_epoch = steps_per_epoch(cfg, dist_info.world_size, task.name) * cfg.optim.grad_accum
    stream = iter(train_loader(cfg, task, backbone, dist_info, run_dir, taken // per_epoch))
    for _ in range(taken % per_epoch):  # replay the part of the epoch that was already consumed
        next(stream)
    return stream


def _audit_keys(run_dir: Path, rank: int, step: int, keys: list[str]) -> None:
    folder = run_dir / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"keys-rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")


def _audit_weights(run_dir: Path, rank: int, module, zero_stage: int) -> None:
    """A hash of this rank's full weights (ZeRO-3 holds only a partition per rank: not comparable)."""
    digest = weights_digest(module.state_dict()) if zero_stage < 3 else weights_digest({})
    (run_dir / "audit").mkdir(parents=True, exist_ok=True)
    (run_dir / "audit" / f"weights-rank{rank}.json").write_text(
        json.dumps({"rank": rank, "zero_stage": zero_stage, "sha256": digest}))


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 values (shape-free: the engine's [1] scalars hash as the final [] ones)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.detach().float().reshape(-1).cpu().numpy().tobytes())
    return digest.hexdigest()


def window_means(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every reported value over a logging window, fetched from the device in one transfer."""
    keys = sorted({k for r in reports for k in r})
    tensors = [v for r in reports for v in r.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.stack([torch.stack([torch.as_tensor(r[k], device=device).float().reshape(()) for r in reports if k in r]).mean()
                        for k in keys]) if keys else torch.zeros(0)
    return dict(zip(keys, sums.cpu().tolist()))


def _train_record(step, epoch_steps, reports, samples, seconds, lrs) -> dict[str, Any]:
    """Mean losses over the logging window; ``lrs`` are the rates the last step used."""
    means = window_means(reports)
    return {"kind": "train", "step": step, "epoch": step / epoch_steps, **means, **lrs,
            "samples_per_s": samples / max(seconds, 1e-9)}


def _progress_bar(enabled: bool, total: int, initial: int):
    """Rank 0's bar, on a terminal only (shards.progress: MULTICLIP_PROGRESS overrides); a silent one elsewhere."""
    from shards.progress import progress_bar

    return progress_bar(total=total, initial=initial, desc="train", unit="step", allowed=enabled)
