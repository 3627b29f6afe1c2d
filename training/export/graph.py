"""What an export is made of: graphs with example inputs, and what a head adds to the export folder.

Torch only (no onnx): task files import this to describe their own export (``Task.export_onnx``), and
:mod:`training.export.exporter` turns it into checked ONNX files and the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from training.config import ConfigError

if TYPE_CHECKING:
    from training.backbone import Backbone


@dataclass
class Graph:
    """One module to export: example inputs (batch first), output names, which input axes are dynamic."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {axis: dim name}; default batch


@dataclass
class HeadExport:
    graphs: list[Graph]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # saved as <name>.npy
    documents: dict[str, Any] = field(default_factory=dict)  # saved as <name>.json (label sets, corpora)
    meta: dict[str, Any] = field(default_factory=dict)  # manifest["tasks"][task]
    files: dict[str, Callable[[Path], Any]] = field(default_factory=dict)  # folder name -> writer(out / name)


class ImageEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)


class TextEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids)


def fixed_images(backbone: Backbone, n: int = 4) -> torch.Tensor:
    """Deterministic, image-like inputs: a seeded uniform [0, 1] image normalised as open_clip does."""
    size = image_size(backbone.model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    cfg = backbone.model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


FIXED_TEXTS = ["a photo of a red circle", "two blue squares at the bottom right", "a photo taken in May, 2017",
               "sunset over the sea at 19:30 in summer, long shadows and an orange sky"]


def image_size(clip: nn.Module) -> int:
    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    if isinstance(clip.visual.image_size, (tuple, list)) and len(set(clip.visual.image_size)) != 1:
        raise ConfigError(f"only square input sizes are exported, got {clip.visual.image_size}")
    return int(size)


