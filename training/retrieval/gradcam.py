"""Grad-CAM for CLIP: where in the image the image-text similarity comes from (task spec section 1).

Target scalar: ``scale * cos(image embedding, text embedding)``. Activations A and their gradients
are taken at the last stage of the vision tower; channel weights are the spatial mean of the
gradients, CAM = ReLU(sum_c w_c A_c), upsampled to the input size and min-max normalised.

- ViT (open_clip ``VisionTransformer``): the tokens entering the last residual block (its ``ln_1``
  output), patch tokens reshaped to the patch grid. The tokens the last block *outputs* are useless
  here: with class-token pooling only the class token reaches the embedding, so every patch token's
  gradient there is exactly zero.
- ResNet (open_clip ``ModifiedResNet``): the output of ``layer4``, before the attention pool.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import nn
from torchvision import transforms

from training.runs import load_run as load_full_run

VIT_MASK_THRESHOLD = 0.3  # the spec's threshold for ViT masks


@dataclass(frozen=True)
class CamResult:
    """One heatmap: ``cam`` in [0, 1] at the model's input resolution, plus the raw grid."""

    cam: np.ndarray  # [H, W] float32, min-max normalised
    grid: np.ndarray  # [h, w] the CAM before upsampling
    score: float  # the target scalar: scale * cosine
    box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) of the thresholded mask, inclusive; None if empty


def target_module(visual: nn.Module) -> tuple[nn.Module, str]:
    """The module whose output Grad-CAM reads, and the layout of that output ('tokens' or 'maps')."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return visual.transformer.resblocks[-1].ln_1, "tokens"
    if hasattr(visual, "layer4"):
        return visual.layer4, "maps"
    raise TypeError(f"Grad-CAM supports open_clip VisionTransformer and ModifiedResNet towers, "
                    f"not {type(visual).__name__}")


def tokens_to_maps(tokens: torch.Tensor, grid: tuple[int, int], batch_first: bool) -> torch.Tensor:
    """[B, T, C] (or [T, B, C]) tokens -> [B, C, h, w] patch maps, dropping the class/prefix tokens."""
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    h, w = grid
    prefix = tokens.shape[1] - h * w
    if prefix < 0:
        raise ValueError(f"{tokens.shape[1]} tokens cannot hold a {h}x{w} patch grid")
    patches = tokens[:, prefix:, :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class _Capture:
    """Forward hook keeping the target layer's output with its gradient."""

    def __init__(self, module: nn.Module):
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        output.retain_grad()
        self.output = output

    def remove(self) -> None:
        self.handle.remove()


def _vit_layout(visual: nn.Module) -> tuple[tuple[int, int], bool]:
    grid = tuple(int(g) for g in visual.grid_size)
    return grid, bool(getattr(visual.transformer, "batch_first", True))


def mask_box(cam: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1, inclusive pixels) of ``cam >= threshold``; None when empty."""
    ys, xs = np.nonzero(cam >= threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def min_max(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def grad_cam(model: nn.Module, image: torch.Tensor, text: torch.Tensor, scale: float | None = None,
             threshold: float = VIT_MASK_THRESHOLD) -> CamResult:
    """Grad-CAM of one preprocessed image ``[3, H, W]`` for one tokenised text ``[L]``.

    Args:
        model: an open_clip CLIP model (ViT or ModifiedResNet vision tower).
        image: the image as the model's ``preprocess_val`` returns it.
        text: the tokenised text (one row of the tokenizer's output).
        scale: the logit scale multiplying the cosine; default ``exp(model.logit_scale)``. It scales
            the map uniformly, so it changes ``score`` but not the normalised heatmap.
        threshold: mask threshold on the normalised CAM for ``box``.
    Returns:
        A :class:`CamResult`.
    """
    visual = model.visual
    module, layout = target_module(visual)
    if scale is None:
        scale = float(model.logit_scale.detach().exp().reshape(())) if hasattr(model, "logit_scale") else 1.0
    was_training = model.training
    model.eval()
    capture = _Capture(module)
    try:
        with torch.enable_grad():
            param = next(model.parameters())
            pixels = image.unsqueeze(0).to(param.device, param.dtype).requires_grad_(True)
            image_emb = F.normalize(model.encode_image(pixels), dim=-1)
            text_emb = F.normalize(model.encode_text(text.unsqueeze(0).to(param.device)), dim=-1)
            score = scale * (image_emb * text_emb).sum()
            model.zero_grad(set_to_none=True)
            score.backward()
        acts, grads = capture.output.detach(), capture.output.grad.detach()
    finally:
        capture.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if layout == "tokens":
        grid, batch_first = _vit_layout(visual)
        acts, grads = tokens_to_maps(acts, grid, batch_first), tokens_to_maps(grads, grid, batch_first)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # [1, C, 1, 1]
    grid_cam = F.relu((weights * acts).sum(dim=1))[0].float()  # [h, w]
    up = F.interpolate(grid_cam[None, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    cam = min_max(up[0, 0]).cpu().numpy().astype(np.float32)
    return CamResult(cam=cam, grid=grid_cam.cpu().numpy(), score=float(score.detach()), box=mask_box(cam, threshold))


# --------------------------------------------------------------------------- pictures


def model_view(preprocess: Callable) -> Callable[[Image.Image], Image.Image]:
    """The image as the model sees it (resize + crop of ``preprocess``), without tensor conversion."""
    steps = [t for t in getattr(preprocess, "transforms", []) if isinstance(t, (transforms.Resize, transforms.CenterCrop))]
    return transforms.Compose(steps) if steps else (lambda image: image)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Jet-coloured heatmap blended over ``image`` (resized to the CAM), with the mask box drawn."""
    base = image.convert("RGB").resize((cam.shape[1], cam.shape[0]), Image.BILINEAR)
    heat = (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(base, Image.fromarray(heat), alpha)
    if box is not None:
        ImageDraw.Draw(blended).rectangle(box, outline=(255, 255, 255))
    return blended


def save_cam(result: CamResult, image: Image.Image, out_png: Path, upscale: int = 1) -> None:
    """Write the overlay PNG (upscaled by an integer factor for small inputs) and its box as JSON."""
    picture = overlay(image, result.cam, box=result.box)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out_png)
    info = {"score": result.score, "box": list(result.box) if result.box else None,
            "box_format": "x0,y0,x1,y1 inclusive, pixels of the model input",
            "input_size": list(result.cam.shape[::-1]), "peak": list(peak(result.cam))}
    out_png.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(x, y) of the hottest pixel."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(x), int(y)


# --------------------------------------------------------------------------- a run's weights, files in and out


def load_run(run_dir: str | Path):
    """The backbone of a finished run with its final weights: (open_clip model, preprocess, tokenizer)."""
    model, backbone, _ = load_full_run(run_dir)
    return model.backbone.eval(), backbone.preprocess_val, backbone.tokenizer


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")
    return "-".join(part for part in keep.split("-") if part)[:limit] or "text"


def cams_for_files(run_dir: str | Path, images: list[str | Path], texts: list[str], out_dir: str | Path,
                   threshold: float = VIT_MASK_THRESHOLD, min_side: int = 256) -> list[dict]:
    """One overlay PNG + box JSON per (image, text) pair under ``out_dir``; returns what was written."""
    model, preprocess, tokenizer = load_run(run_dir)
    view = model_view(preprocess)
    tokens = tokenizer(texts)
    written = []
    for image_path in map(Path, images):
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise ValueError(f"{image_path}: not a readable image ({err})") from err
        pixels = preprocess(image)
        for index, text in enumerate(texts):
            result = grad_cam(model, pixels, tokens[index], threshold=threshold)
            png = Path(out_dir) / f"{image_path.stem}__{index:02d}-{_slug(text)}.png"
            save_cam(result, view(image), png, upscale=max(1, -(-min_side // result.cam.shape[0])))
            written.append({"image": str(image_path), "text": text, "png": str(png), "box": result.box,
                            "peak": peak(result.cam), "score": result.score})
    return written
