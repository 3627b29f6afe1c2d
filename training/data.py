"""From the config's shard patterns to DataLoaders of task batches (one stream per task).

What makes the loader fast enough to feed a GPU (``data`` section of the config):

* workers: ``num_workers: auto`` is :func:`auto_num_workers` of this node's cores and ranks, capped at
  the shards each rank reads (so auto never makes a valid config fail ``check_enough_shards``);
* pinned memory (``pin_memory: auto``: on when DeepSpeed's accelerator is CUDA) and ``prefetch_factor``
  batches in flight per worker, with non-blocking copies in :func:`to_device`;
* JPEG draft decoding (``jpeg_draft``): libjpeg decodes straight to 1/2, 1/4 or 1/8 scale when the
  image stays large enough for the model's transform (:func:`decode_size_for`);
* ``uint8_images``: the transform stops at uint8 CHW (:func:`uint8_transform`), batches cross to the
  device 4x smaller, and :func:`to_device` converts and normalises them there.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import default_collate
from torchvision import transforms as T

from shards import members
from shards.reader import make_eval_loader, make_loader
from shards.samples import count_samples, expand_urls
from training import accelerator
from training.config import Config, ConfigError
from training.distributed import DistInfo
from training.backbone import Backbone, SampleContext

MAX_AUTO_WORKERS = 8  # more workers per rank rarely pay: each holds a shuffle buffer and prefetched batches
ImageNorm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel
LOGGER = logging.getLogger("multiclip.data")


def _map(sample: dict[str, Any], task, backbone: SampleContext, train: bool) -> dict[str, Any]:
    """Expose the single image as ``image`` whatever its extension, then apply the task's mapping."""
    image = members.single_image(sample)
    if image is not None:
        sample["image"] = image
    return task.map_sample(sample, backbone, train)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """torch's default collate, with ``task`` kept as one name (a batch never mixes tasks)."""
    tasks = {s.pop("task") for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"a batch mixes tasks {sorted(tasks)}")
    batch = default_collate(samples)
    batch["task"] = tasks.pop()
    return batch


# --------------------------------------------------------------------------- workers, pinned memory


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and launchers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_num_workers(cores: int, local_ranks: int, shards_per_rank: int | None = None,
                     cap: int = MAX_AUTO_WORKERS) -> int:
    """Workers per rank for ``num_workers: auto``.

    ``max(1, cores // local_ranks - 1)``: each rank's share of the node's cores, less one for the rank's
    own process, at least one; then at most ``cap`` (8) and at most ``shards_per_rank`` (the shards each
    rank reads when not resampling: a worker without a shard of its own would leave a rank idle).
    """
    workers = min(max(1, cores // max(1, local_ranks) - 1), cap)
    if shards_per_rank is not None:
        workers = min(workers, max(1, shards_per_rank))
    return workers


def resolve_num_workers(value: int | str, local_ranks: int, num_shards: int, world_size: int,
                        resample: bool, cores: int | None = None) -> int:
    """The configured worker count, or :func:`auto_num_workers` for this node when it is ``auto``."""
    if value != "auto":
        return int(value)
    shards_per_rank = None if resample else num_shards // max(1, world_size)
    return auto_num_workers(available_cores() if cores is None else cores, local_ranks, shards_per_rank)


def resolve_pin_memory(value: bool | str) -> bool:
    """``auto``: pinned (page-locked) batches when the accelerator is CUDA, where copies can be asynchronous."""
    if value == "auto":
        return accelerator.device_type() == "cuda"
    return bool(value)


# --------------------------------------------------------------------------- transforms: draft size, uint8


def decode_size_for(transform: Callable) -> int | None:
    """The shorter side (px) a decoded image needs so that ``transform`` never upscales more than on the
    full-size image; None when the transform is not recognised (then images are decoded at full size).

    * ``Resize(s)`` / ``CenterCrop``: shorter side >= s (``Resize((h, w))``, open_clip's ``ResizeKeepRatio``:
      >= max(h, w), which covers both sides whatever the aspect);
    * ``RandomResizedCrop(s, scale=(a, b))``: a crop covers >= a of the image's area and is no wider or
      taller than the image, so each of its sides is >= a x the image's side: shorter side >= (s + 1) / a
      (the + 1 absorbs torchvision's rounding of the crop size). open_clip's training default a = 0.9
      gives 250 px for a 224-px model, 73 px for a 64-px one.

    The draft decode then picks the smallest 1/2, 1/4, 1/8 scale that keeps this shorter side
    (:func:`shards.samples.draft_scale`); an image that is already smaller is decoded at full size.
    """
    steps = list(getattr(transform, "transforms", [transform]))
    for step in steps:  # the first geometric step decides how many source pixels the output uses
        if isinstance(step, T.RandomResizedCrop):
            return math.ceil((max(step.size) + 1) / min(step.scale))
        if isinstance(step, T.Resize):
            return max(step.size) if isinstance(step.size, (list, tuple)) else int(step.size)
        if type(step).__name__ == "ResizeKeepRatio":  # open_clip.transform.ResizeKeepRatio
            size = step.size if isinstance(step.size, (list, tuple)) else (step.size,)
            return int(max(size))
        if isinstance(step, (T.CenterCrop, T.RandomCrop)) or not _is_pixel_wise(step):
            return None  # a crop before any resize, or an unknown step: keep every source pixel
    return None


def _is_pixel_wise(step: Callable) -> bool:
    """Steps that do not depend on the image's resolution (mode conversion, colour, tensor conversion)."""
    names = ("MaybeConvertMode", "color_jitter", "gray_scale", "ColorJitter", "Grayscale", "RandomGrayscale",
             "ToTensor", "MaybeToTensor", "PILToTensor", "Normalize")
    return type(step).__name__ in names


def backbone_decode_size(backbone: Backbone, train: bool) -> int | None:
    """Draft decode size for a loader: a training stream may use either transform (contextual frames go
    through ``preprocess_val``), so it takes the larger need; None if either is not recognised."""
    needs = [decode_size_for(backbone.preprocess_val)]
    if train:
        needs.append(decode_size_for(backbone.preprocess_train))
    return None if None in needs else max(needs)


def uint8_transform(transform: Callable) -> tuple[T.Compose, ImageNorm]:
    """The same Compose with its final ``ToTensor + Normalize`` replaced by ``PILToTensor`` (uint8 CHW),
    and the (mean, std) that :func:`to_device` applies on the device instead.

    Raises ValueError for a transform that does not end in ToTensor + Normalize (e.g. timm's).
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        raise ValueError(f"data.uint8_images needs a transform ending in ToTensor + Normalize, got {transform!r}")
    norm = steps[-1]
    mean, std = (tuple(float(x) for x in norm.mean), tuple(float(x) for x in norm.std))
    return T.Compose([*steps[:-2], T.PILToTensor()]), (mean, std)


def uint8_backbone(backbone: Backbone) -> tuple[Backbone, ImageNorm]:
    """A copy of ``backbone`` whose preprocess_train/val stop at uint8 tensors, and their common (mean, std)."""
    train, train_norm = uint8_transform(backbone.preprocess_train)
    val, val_norm = uint8_transform(backbone.preprocess_val)
    if train_norm != val_norm:
        raise ValueError(f"data.uint8_images: train and val transforms normalise differently "
                         f"({train_norm} vs {val_norm})")
    return dataclasses.replace(backbone, preprocess_train=train, preprocess_val=val), train_norm


def device_image_norm(cfg: Config, backbone: Backbone) -> ImageNorm | None:
    """What the trainer passes to :func:`to_device`: (mean, std) with ``data.uint8_images``, else None."""
    return uint8_backbone(backbone)[1] if cfg.data.uint8_images else None


# --------------------------------------------------------------------------- loaders


def train_loader(cfg: Config, task, backbone: Backbone, dist_info: DistInfo, run_dir: Path, start_epoch: int):
    """An endless stream of this rank's training batches for ``task``.

    With ``data.uint8_images`` the images are uint8; give :func:`to_device` ``device_image_norm(cfg, backbone)``.
    """
    urls = expand_urls(cfg.train_shards(task.name))
    data = cfg.data
    workers = resolve_num_workers(data.num_workers, dist_info.local_world_size, len(urls), dist_info.world_size,
                                  data.resample)
    if data.uint8_images:
        backbone = uint8_backbone(backbone)[0]
    decode_size = backbone_decode_size(backbone, True) if data.jpeg_draft else None
    pin_memory = resolve_pin_memory(data.pin_memory)
    if dist_info.is_main:  # auto is resolved per node: a resume elsewhere may get another count (and stream)
        LOGGER.info("%s loader: %d worker(s) per rank (num_workers=%s), pin_memory=%s, prefetch_factor=%d, "
                    "JPEG draft decode to shorter side >= %s, uint8 images=%s", task.name, workers, data.num_workers,
                    pin_memory, data.prefetch_factor, decode_size, data.uint8_images)
    return make_loader(urls, map_fn=partial(_map, task=task, backbone=backbone.sample_context(), train=True),
                       batch_size=cfg.micro_batch_size(task.name), rank=dist_info.rank,
                       world_size=dist_info.world_size, num_workers=workers,
                       seed=cfg.run.seed, shuffle_buffer=data.shuffle_buffer, resample=data.resample,
                       start_epoch=start_epoch, error_log_dir=run_dir / "skipped", collate_fn=collate,
                       infinite=True, decode_size=decode_size, pin_memory=pin_memory, prefetch_factor=data.prefetch_factor,
                       persistent_workers=True)


def eval_loader(urls, task, backbone: Backbone, batch_size: int, error_log_dir: Path | None = None, rank: int = 0):
    """One deterministic pass over every held-out sample (the same on every rank).

    Images are decoded at full size, so held-out metrics see exactly the pixels of ``preprocess_val``
    (and of the exported model's preprocessing). Skipped samples are logged and, with ``error_log_dir``,
    written to ``error_log_dir/skipped-rank<rank>-worker0.jsonl``.
    """
    return make_eval_loader(expand_urls(urls), map_fn=partial(_map, task=task, backbone=backbone.sample_context(), train=False),
                            batch_size=batch_size, num_workers=0, error_log_dir=error_log_dir, collate_fn=collate,
                            rank=rank)


def steps_per_epoch(cfg: Config, world_size: int, task_name: str | None = None) -> int:
    """Optimizer steps that consume a task's training set once across all ranks (default: the first task's)."""
    name = task_name or cfg.tasks[0].name
    total = count_samples(expand_urls(cfg.train_shards(name)))
    per_step = cfg.micro_batch_size(name) * cfg.optim.grad_accum * world_size
    return max(1, total // per_step)


def to_device(batch: dict[str, Any], device: torch.device, image_norm: ImageNorm | None = None) -> dict[str, Any]:
    """Move a batch's tensors to the device with non-blocking copies (asynchronous from pinned memory).

    Dtypes are kept (fp32 inputs: precision is the towers' autocast). With ``image_norm`` (mean, std),
    uint8 image tensors (ndim >= 4, 3 channels at dim -3) become float32 ``(x / 255 - mean) / std`` on
    the device, as ToTensor + Normalize would have made them on the host.
    """
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if image_norm is not None and v.dtype == torch.uint8 and v.ndim >= 4 and v.shape[-3] == 3:
                v = normalize_uint8(v, image_norm)
        out[k] = v
    return out


def normalize_uint8(images: torch.Tensor, image_norm: ImageNorm) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` to float32 ``(x / 255 - mean) / std``, where ``images`` lives."""
    mean, std = _norm_tensors(images.device, *image_norm)
    return images.float().div_(255.0).sub_(mean).div_(std)


@lru_cache(maxsize=16)
def _norm_tensors(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]):
    """(mean, std) as [3, 1, 1] float32 tensors on ``device``, made once rather than every step."""
    as_tensor = partial(torch.tensor, dtype=torch.float32, device=device)
    return as_tensor(mean).view(-1, 1, 1), as_tensor(std).view(-1, 1, 1)


def check_shards(cfg: Config) -> None:
    """Fail before any work when a shard pattern matches nothing (the error shows the task and pattern)."""
    for i, task in enumerate(cfg.tasks):
        for split in ("train", "val"):
            where = f"tasks.{i}.{split}" if getattr(task, split) else f"data.{split}"
            try:
                expand_urls(cfg.train_shards(task.name) if split == "train" else cfg.val_shards(task.name))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{where} ({task.name}): {err}") from None
    check_held_out(cfg)


def held_out_cap(cfg: Config) -> int | None:
    """The most held-out samples one evaluation reads per task: ``eval.max_samples`` rounded up to whole
    batches (as :func:`training.evaluation.evaluate_model` reads them), None for all."""
    if not cfg.eval.max_samples:
        return None
    batch_size = min(cfg.eval.batch_size, cfg.eval.max_samples)
    return -(-cfg.eval.max_samples // batch_size) * batch_size


def check_held_out(cfg: Config, shards=None) -> None:
    """Fail before any work when a task's held-out set (``shards``, default its val set, capped by
    ``eval.max_samples``) holds fewer samples than its evaluation needs, e.g. retrieval's candidate batch
    (``options.candidate_batch_size``). Counts come from sizes.json (shards without one are read)."""
    from training.registry import get_task_class

    cap, problems = held_out_cap(cfg), []
    for i, task in enumerate(cfg.tasks):
        cls = get_task_class(task.name)
        options = task.options if isinstance(task.options, cls.Options) else cls.Options.model_validate(task.options)
        need, option = cls.min_held_out_samples(options)
        where = "--shards" if shards else (f"tasks.{i}.val" if task.val else "data.val")
        spec = shards or cfg.val_shards(task.name)
        total = count_samples(expand_urls(spec))
        have = total if cap is None else min(total, cap)
        if have < need:
            what = f"tasks.{i}.{option} = {need}" if option else f"at least {need}"
            capped = f" (eval.max_samples = {cfg.eval.max_samples} of {total})" if have < total else ""
            problems.append(f"  - {where} ({task.name}): {spec} holds {have} held-out sample(s){capped}, "
                            f"fewer than the evaluation needs: {what}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the held-out sets\n" + "\n".join(problems))
