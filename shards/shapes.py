"""Flat shapes drawn by the synthetic generators (shared, so every task draws them the same way)."""
from __future__ import annotations

from PIL import ImageDraw


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, extent: float, fill: tuple) -> None:
    x1, y1 = x0 + extent, y0 + extent
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        bar = extent / 3
        draw.rectangle((x0, y0 + bar, x1, y0 + 2 * bar), fill=fill)
        draw.rectangle((x0 + bar, y0, x0 + 2 * bar, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
