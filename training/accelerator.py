"""One place decides device, process-group backend and precision: DeepSpeed's accelerator.

Nothing else in the project asks ``torch.cuda`` what to do. DeepSpeed's ``get_accelerator()`` is
CUDA on a GPU node and its CPU accelerator elsewhere (``DS_ACCELERATOR=cpu`` forces it), so a CPU test
takes the same decisions a GPU run takes, only with other answers.

Precision design ("bf16 with fp32 heads", see docs/design.md): parameters, gradients, optimizer
states and DeepSpeed's engine stay fp32 at every ZeRO stage; with ``bf16`` the backbone's towers run
under ``torch.autocast`` (where the FLOPs are) and hand fp32 features to the heads, whose logits,
softmax, cross-entropy, BatchNorm statistics and logit scales are all fp32. The final weights are
therefore the fp32 masters whatever the stage, and frozen weights are never rounded.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device_type() -> str:
    """'cuda' on a GPU node, 'cpu' on DeepSpeed's CPU accelerator."""
    return accelerator().device_name()


def on_gpu() -> bool:
    return device_type() != "cpu"


def backend() -> str:
    """The process-group backend the accelerator uses (nccl on CUDA; gloo, or ccl with oneCCL, on CPU)."""
    return accelerator().communication_backend_name()


def device(local_rank: int = 0) -> torch.device:
    """This rank's device; selects it as the current one on a GPU node."""
    if not on_gpu():
        return torch.device("cpu")
    accelerator().set_device(local_rank)
    return torch.device(device_type(), local_rank)


def current_device() -> torch.device:
    """The device this process already uses (after :func:`device` or a launcher chose one)."""
    return torch.device(accelerator().current_device_name())


def resolve_precision(requested: str) -> str:
    """'auto' becomes bf16 where the accelerator is a GPU that supports it, fp32 on CPU."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "bf16" if on_gpu() and accelerator().is_bf16_supported() else "fp32"


def peak_memory_gib() -> float | None:
    """Peak device memory this process allocated so far (GPU only; None on CPU)."""
    if not on_gpu():
        return None
    return accelerator().max_memory_allocated() / 2**30


def enable_tf32() -> None:
    """fp32 matrix products on tensor cores (TF32) where the device has them; no effect on CPU."""
    if device_type() == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- bf16 towers, fp32 heads


def tower_modules(backbone: nn.Module) -> list[nn.Module]:
    """The modules that carry the backbone's compute: image and text towers and their transformers.

    The transformers are listed as well as the towers because some heads call them directly
    (geo_time's extra [CLS] tokens, meme's token states); nesting is harmless.
    """
    found = []
    for path in ("visual", "visual.transformer", "transformer", "text"):
        module: Any = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module) and all(module is not m for m in found):
            found.append(module)
    return found


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, tuple):
        return type(value)(_to_fp32(v) for v in value)
    if isinstance(value, list):
        return [_to_fp32(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


class TowerAutocast:
    """Forward hooks that run each tower under bf16 autocast and return fp32 outputs.

    Heads run outside any autocast region, so whatever a head computes from those outputs (logits,
    losses, normalisation statistics) is fp32. ``remove()`` takes the hooks off again.
    """

    def __init__(self, modules: Iterable[nn.Module], device_type: str, dtype: torch.dtype = torch.bfloat16):
        self.device_type, self.dtype = device_type, dtype
        self._active: list[torch.autocast] = []
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, module, args):
        region = torch.autocast(device_type=self.device_type, dtype=self.dtype)
        region.__enter__()
        self._active.append(region)

    def _exit(self, module, args, output):
        self._active.pop().__exit__(None, None, None)
        return _to_fp32(output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def apply_precision(model: nn.Module, precision: str) -> TowerAutocast | None:
    """Install the bf16 tower hooks on ``model.backbone`` when ``precision`` resolves to bf16."""
    if resolve_precision(precision) != "bf16":
        return None
    return TowerAutocast(tower_modules(model.backbone), device_type())
