"""Typed run configuration, loaded from YAML and validated before any work starts.

Every section is a frozen pydantic model with ``extra="forbid"``: a misspelt key or a value of
the wrong type is reported with its dotted path, and all problems are reported at once (one
:class:`ConfigError`) before a process group, a data loader or a model exists. Cross-field checks
(task names, files that must exist) run in :func:`load_config` too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot be run; the message lists every problem with its key."""


# shard pattern(s): a non-empty string, or a non-empty list of them (an empty list would train on nothing)
ShardSpec = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    output_dir: str = "runs/default"  # run folder: checkpoints, logs, final weights
    seed: int = 0  # seeds model init, data order and sampling
    audit: bool = False  # each rank writes the sample keys it trained on and a weight fingerprint
    # local folder a run with an fsspec URL as output_dir is written to before it is mirrored there
    # (default: one per URL under the system's temporary folder); unused for a local output_dir
    staging_dir: str | None = None


class ModelConfig(_Section):
    name: str  # open_clip model name, e.g. ViT-B-32, or a JSON stem in configs/models
    pretrained: str | None = None  # open_clip tag (e.g. laion2b_s34b_b79k) or a local checkpoint path
    model_config_dir: str = "configs/models"  # JSON model configs registered with open_clip
    init_weights: str | None = None  # final/model.safetensors of an earlier run (backbone + heads) to start from
    compile: bool = False  # torch.compile the towers (measured in docs/benchmarks.md before turning it on)
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager traces without generating code


class DataConfig(_Section):
    train: ShardSpec | None = None  # shard pattern(s): brace pattern, glob or directory
    val: ShardSpec | None = None  # held-out shards used for periodic and final evaluation
    # DataLoader workers per rank; auto = min(max(1, cores // local ranks - 1), 8, shards per rank), where
    # cores is this process's CPU affinity and "shards per rank" (shards // world size) applies without resample
    num_workers: NonNegativeInt | Literal["auto"] = "auto"
    pin_memory: bool | Literal["auto"] = "auto"  # page-locked batches for async copies; auto: on when the device is CUDA
    prefetch_factor: int = Field(4, ge=1)  # batches in flight per worker (only when workers > 0)
    uint8_images: bool = False  # images cross to the device as uint8 and are converted + normalised there
    jpeg_draft: bool = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when still >= what the model's transform needs
    shuffle_buffer: int = Field(1000, ge=0)  # samples held for shuffling inside each worker
    resample: bool = False  # draw shards with replacement (when shards < ranks x workers)


class TaskConfig(_Section):
    name: str  # registry key, see training.registry.list_tasks()
    loss_weight: float = Field(1.0, gt=0)  # multiplier of this task's losses in the total
    options: Any = Field(default_factory=dict)  # a dict in; the task's own typed Options object once validated
    sampling_weight: float = Field(1.0, gt=0)  # share of micro batches drawn for this task in a mixed job
    micro_batch_size: int | None = Field(None, ge=1)  # this task's samples per rank per forward (default: optim's)
    train: ShardSpec | None = None  # this task's training shards (default: data.train)
    val: ShardSpec | None = None  # this task's held-out shards (default: data.val)


class OptimConfig(_Section):
    micro_batch_size: int = Field(32, ge=1)  # samples per rank per forward
    grad_accum: int = Field(1, ge=1)  # micro batches per optimizer step
    # gradients: DeepSpeed's accumulation (the contrastive batch stays micro batch x ranks); features: cache
    # every micro batch's embeddings, take the loss over all of them, then recompute each micro batch with
    # gradients (open_clip's --accum-freq, GradCache), so the negatives grow with grad_accum
    accum_mode: Literal["gradients", "features"] = "gradients"
    max_steps: int = Field(100, ge=1)  # optimizer steps in the whole run
    lr_backbone: float = Field(1e-5, ge=0)  # learning rate of the open_clip backbone
    lr_head: float = Field(1e-3, ge=0)  # learning rate of the task heads
    weight_decay: float = Field(0.1, ge=0)  # AdamW decay; never applied to biases, norms, logit scales
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)  # AdamW
    eps: float = Field(1e-6, gt=0, lt=1)
    # torch's fused AdamW kernel: the same update up to rounding, one kernel for all parameters instead of a
    # loop over them (ViT-B-32 on the 2-core CPU: 0.09 vs 0.81 s per optimizer step, docs/config.md)
    fused: bool = False
    warmup_steps: int = Field(10, ge=0)  # linear warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # global norm clipping; 0 disables
    freeze_backbone: bool = False  # train only the heads
    freeze_vision_blocks: int = Field(0, ge=0)  # lock patch/pos embeddings + the first N vision blocks
    freeze_text_blocks: int = Field(0, ge=0)  # lock token/pos embeddings + the first N text blocks
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory, ~30% slower)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    # bf16: the towers run under bf16 autocast, heads, losses and every weight stay fp32 (docs/design.md);
    # auto: bf16 on a GPU accelerator that supports it, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    config_file: str | None = None  # a ds_config JSON merged over the generated one (batch keys excluded)


class ScheduleConfig(_Section):
    eval_every: int = Field(0, ge=0)  # optimizer steps between evaluations; 0: only before/after
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between checkpoints; 0: only the final one
    checkpoint_every_minutes: float = Field(0, ge=0)  # wall-clock minutes between checkpoints too; 0: off
    keep_checkpoints: int = Field(2, ge=1)  # older checkpoints are deleted after a newer one is complete
    log_every: int = Field(10, ge=1)  # optimizer steps between log lines


class LogConfig(_Section):
    tensorboard: bool = True  # TensorBoard events under <run>/tensorboard
    wandb: Literal["off", "online", "offline"] = "off"  # Weights & Biases, same metric names as TensorBoard
    wandb_project: str = "multiclip"
    wandb_dir: str | None = None  # where W&B writes its files (default: <run>/wandb)


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    max_samples: int | None = Field(None, ge=1)  # cap on held-out samples (None: all; rounded up to whole batches)
    # the evaluation before the first step ("before" in metrics.json); off when that start is measured already,
    # e.g. a stage-2 run from init_weights whose stage-1 run evaluated the same weights
    before_training: bool = True
    general: str | list[str] | None = None  # shards measuring general (zero-shot) ability before/after
    wise_ft_alphas: list[float] = Field(default_factory=list)  # WiSE-FT: (1-a)*initial + a*fine-tuned backbone

    @model_validator(mode="after")
    def _check_alphas(self) -> EvalConfig:
        bad = [a for a in self.wise_ft_alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"wise_ft_alphas must lie in [0, 1], got {bad}")
        return self


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig
    tasks: list[TaskConfig]
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_tasks(self) -> Config:
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks: at least one task is required")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: a task is listed twice: {names}")
        for split in ("train", "val"):
            orphans = [t.name for t in self.tasks if getattr(t, split) is None and getattr(self.data, split) is None]
            if orphans:
                raise ValueError(f"data.{split} or tasks[].{split} is required (no {split} shards for {orphans})")
        return self

    def task(self, name: str) -> TaskConfig:
        return next(t for t in self.tasks if t.name == name)

    def train_shards(self, name: str) -> str | list[str]:
        """The task's own training shards, else the shared ``data.train``."""
        return self.task(name).train or self.data.train

    def val_shards(self, name: str) -> str | list[str]:
        return self.task(name).val or self.data.val

    def micro_batch_size(self, name: str) -> int:
        return self.task(name).micro_batch_size or self.optim.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {len(err.errors())} problem(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        lines.append(f"  - {where}: {e['msg']}{got}")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML); list items by index: ``tasks.0.options.x=1``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        dotted, value = item.split("=", 1)
        node: Any = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = _child(node, key, item)
        if isinstance(node, list):
            node[_index(node, leaf, item)] = yaml.safe_load(value)
        else:
            node[leaf] = yaml.safe_load(value)
    return raw


def _index(node: list, key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {item!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _child(node: Any, key: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, item)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {key!r} is not a section")
    return node.setdefault(key, {})


def load_deepspeed_overrides(cfg: Config) -> dict[str, Any]:
    """The user's ds_config JSON, if any (batch-size keys are derived, so they are rejected)."""
    if not cfg.deepspeed.config_file:
        return {}
    try:
        data = json.loads(Path(cfg.deepspeed.config_file).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg.deepspeed.config_file}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg.deepspeed.config_file}: top level must be a JSON object")
    derived = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    clash = derived & set(data)
    if clash:
        raise ConfigError(
            f"{cfg.deepspeed.config_file}: {sorted(clash)} are derived from optim.micro_batch_size "
            "and optim.grad_accum; set those instead"
        )
    precision = PRECISION_KEYS & set(data)
    if precision:  # the engine stays fp32; bf16 is the towers' autocast (training/accelerator.py)
        raise ConfigError(f"{cfg.deepspeed.config_file}: {sorted(precision)} would change the engine's precision; "
                          "set deepspeed.precision (fp32 | bf16 | auto) instead")
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{cfg.deepspeed.config_file}: zero_optimization must be a JSON object, got {zero!r}; "
                          "the stage is deepspeed.zero_stage")
    stage = zero.get("stage", cfg.deepspeed.zero_stage)
    if isinstance(stage, bool) or stage != cfg.deepspeed.zero_stage:  # tasks' ZeRO-3 support is checked on it
        raise ConfigError(f"{cfg.deepspeed.config_file}: zero_optimization.stage = {stage!r} differs from "
                          f"deepspeed.zero_stage = {cfg.deepspeed.zero_stage}; set deepspeed.zero_stage instead")
    return data


# ds_config sections that change what precision the engine keeps or moves weights and gradients in
# ("bfloat16" is DeepSpeed's older spelling of "bf16"; data_types.grad_accum_dtype, communication_data_type:
# the dtype gradients are accumulated or all-reduced in)
PRECISION_KEYS = frozenset({"bf16", "bfloat16", "fp16", "torch_autocast", "amp", "data_types",
                            "communication_data_type"})
