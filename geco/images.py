"""Pictures people look at: evaluation sample grids, the render contact sheet, ``geco generate``'s views.

Conventions:

* A picture is an ``H x W x 3`` uint8 numpy array (RGB); :func:`to_uint8` makes one from a ``[3, H, W]``
  tensor in [0, 1] (clamped, rounded).
* Grids sit on a white background (``bg=255``) with ``pad`` pixels around and between cells; a cell is
  as wide as its column's widest picture and as tall as its row's tallest, pictures sit in its top-left
  corner.
* :func:`labeled_grid` is the one to use for anything shown in MLflow or written for a person: one row
  per object, one column per kind of picture, a header row naming the columns (PIL's default font), and
  every picture scaled up by one integer nearest-neighbour factor so that the smallest picture side is
  at least ``min_tile`` pixels; labels grow with the columns so they stay legible when a large grid is
  shown scaled down. Nearest neighbour keeps each pixel a sharp square (the embedded demo's
  16-px tiles stay readable and nothing is invented); one factor for all keeps relative sizes; pictures
  already that large are left alone.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # only for annotations: the tracking helpers import this module without torch's cost
    import torch

HEADER_MARGIN = 3  # pixels above and below a column label
MIN_FONT_SIZE = 11  # label size in px; wider columns get larger labels (a twelfth of the narrowest column)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] (any device/dtype) -> H x W x 3 uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def hstack_images(images: Sequence[np.ndarray], pad: int = 2, bg: int = 255) -> np.ndarray:
    """H x W x 3 uint8 images side by side (top-aligned, padded to the tallest)."""
    h = max(i.shape[0] for i in images)
    w = sum(i.shape[1] for i in images) + pad * (len(images) + 1)
    out = np.full((h + 2 * pad, w, 3), bg, np.uint8)
    x = pad
    for im in images:
        out[pad:pad + im.shape[0], x:x + im.shape[1]] = im[..., :3]
        x += im.shape[1] + pad
    return out


def vstack_images(images: Sequence[np.ndarray], bg: int = 255) -> np.ndarray:
    """H x W x 3 uint8 images one below the other (left-aligned, padded to the widest)."""
    w = max(i.shape[1] for i in images)
    rows = [np.concatenate([i, np.full((i.shape[0], w - i.shape[1], 3), bg, np.uint8)], 1) if i.shape[1] < w else i
            for i in images]
    return np.concatenate(rows, 0)


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel becomes a ``factor x factor`` block."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    return image if factor == 1 else image.repeat(factor, axis=0).repeat(factor, axis=1)


def resize_nearest(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (height, width) (source pixel ``floor(i * H / h)``)."""
    h, w = hw
    if image.shape[:2] == (h, w):
        return image
    yi = (np.arange(h) * image.shape[0] / h).astype(int)
    xi = (np.arange(w) * image.shape[1] / w).astype(int)
    return image[yi][:, xi]


def upscale_factor(images: Sequence[np.ndarray], min_tile: int) -> int:
    """The smallest integer factor that makes every picture's shorter side at least ``min_tile``."""
    smallest = min((min(i.shape[:2]) for i in images), default=0)
    return max(1, math.ceil(min_tile / smallest)) if smallest > 0 else 1


def _column_widths(rows: Sequence[Sequence[np.ndarray]], ncols: int) -> list[int]:
    return [max((r[c].shape[1] for r in rows if c < len(r)), default=0) for c in range(ncols)]


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, bg: int = 255, cols: int | None = None) -> np.ndarray:
    """Rows of H x W x 3 uint8 pictures in a table of ``cols`` columns (default: the longest row's
    length; shorter rows leave their last cells empty)."""
    ncols = max([len(r) for r in rows] + [cols or 0])
    widths = _column_widths(rows, ncols)
    heights = [max((im.shape[0] for im in r), default=0) for r in rows]
    out = np.full((sum(heights) + pad * (len(rows) + 1), sum(widths) + pad * (ncols + 1), 3), bg, np.uint8)
    y = pad
    for r, h in zip(rows, heights):
        x = pad
        for c, im in enumerate(r):
            out[y:y + im.shape[0], x:x + im.shape[1]] = im[..., :3]
            x += widths[c] + pad
        y += h + pad
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px (its fixed-size bitmap version where FreeType is missing)."""
    try:
        return ImageFont.load_default(size)
    except ImportError:  # Pillow built without FreeType: only the bitmap font, one size
        return ImageFont.load_default()


def _header(labels: Sequence[str], widths: Sequence[int], pad: int, bg: int) -> np.ndarray:
    """One strip with each label centred over its column (clipped to the column's width)."""
    font = _font(max(MIN_FONT_SIZE, min((w for w in widths if w), default=0) // 12))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [draw.textbbox((0, 0), label, font=font) for label in labels]
    text_h = max((b[3] for b in boxes), default=0)
    strip = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), text_h + 2 * HEADER_MARGIN), (bg,) * 3)
    x = pad
    for label, box, w in zip(labels, boxes, widths):
        cell = Image.new("RGB", (w, strip.height), (bg,) * 3)
        ImageDraw.Draw(cell).text((max(0, (w - (box[2] - box[0])) // 2) - box[0], HEADER_MARGIN), label,
                                  fill=(0, 0, 0), font=font)
        strip.paste(cell, (x, 0))
        x += w + pad
    return np.asarray(strip)


def labeled_grid(rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str], min_tile: int = 128,
                 pad: int = 2, bg: int = 255) -> np.ndarray:
    """A table of pictures for people: ``rows[i][j]`` is object i's picture of kind ``column_labels[j]``
    (H x W x 3 uint8). All pictures are scaled up by one nearest-neighbour factor so that the smallest
    side is at least ``min_tile`` (``min_tile=0``: as they are); a header row names the columns."""
    if any(len(r) > len(column_labels) for r in rows):
        raise ValueError(f"a row has more pictures than the {len(column_labels)} column labels")
    k = upscale_factor([im for r in rows for im in r], min_tile)
    rows = [[upscale_nearest(im, k) for im in r] for r in rows]
    header = _header(column_labels, _column_widths(rows, len(column_labels)), pad, bg)
    return np.concatenate([header, grid(rows, pad, bg, cols=len(column_labels))], 0)
