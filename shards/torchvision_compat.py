"""Make ``import open_clip`` work where PyPI's torchvision is a CUDA build on a CPU torch.

PyPI ships no CPU torchvision, so on a CPU-only torch its compiled ``_C`` library fails to
load and ``torchvision._meta_registrations`` then crashes on ``torchvision::nms`` not existing.
open_clip needs only torchvision's Python transforms, never its compiled ops, so when (and only
when) ``_C`` cannot be loaded we declare the two op schemas that torchvision registers fake
kernels for. Where ``_C`` loads (GPU images, the Dockerfile) this is a no-op.

The one bootstrap, in the lowest package that needs it (``shards`` imports nothing from ``training``):
``training/__init__.py`` calls :func:`install` before anything imports open_clip, so every process that
goes through the ``training`` package (deepspeed ranks, DataLoader workers, Ray workers) gets it, and
the meme generator calls it before ``transformers`` (whose model classes import torchvision whenever
it is installed, with no switch to skip it). Calling it twice is harmless.
"""
from __future__ import annotations

import importlib.util
import logging
import os

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keep the torch.library.Library alive: dropping it unregisters the schemas
log = logging.getLogger(__name__)


def _native_ops_load() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to fix
    folder = os.path.dirname(spec.origin)
    candidates = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
        return True
    except (OSError, RuntimeError):
        return False


def install() -> bool:
    """Declare torchvision's op schemas if its native library cannot load. Returns True if it did."""
    global _library
    import sys

    if _library is not None or "torchvision" in sys.modules:
        return False
    if _native_ops_load():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    log.debug("torchvision's compiled ops are unavailable on this torch; declared op schemas only")
    return True
