"""Render-shaped shards without Blender, for the stages that read render shards (pseudo-GT).

:func:`write_render_shards` writes samples with the render schema's members that matter downstream
(``cond.png``, ``000.png``-``005.png``, ``cameras.json`` from :func:`geco.cameras.sample_object_cameras`,
``meta.json``) through :class:`geco.data.shards.DatasetRun`, so the manifest and index files are the
render stage's own. A key in ``broken`` gets a ``cond.png`` that is not an image; ``without_cond``
leaves the conditioning view out of every sample.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from geco.cameras import sample_object_cameras
from geco.data import shards


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


def _object_image(key: str, size: int) -> np.ndarray:
    """An RGBA square of a colour picked by the key, on transparent."""
    colour = np.frombuffer(hashlib.sha256(key.encode()).digest()[:3], np.uint8)
    im = np.zeros((size, size, 4), np.uint8)
    lo, hi = size // 4, 3 * size // 4
    im[lo:hi, lo:hi, :3] = colour
    im[lo:hi, lo:hi, 3] = 255
    return im


def render_sample(key: str, size: int = 32, *, broken: bool = False, with_cond: bool = True) -> dict[str, bytes]:
    cams = sample_object_cameras(key, 0, cond_resolution=size, z123_resolution=size, num_random=0)
    sample = {"__key__": key, "cameras.json": json.dumps([c.to_dict() for c in cams]).encode(),
              "meta.json": json.dumps({"content_hash": key}).encode()}
    if with_cond:
        sample["cond.png"] = b"\x89PNG\r\n\x1a\nnot really a png" if broken else _png(_object_image(key, size))
    for i in range(6):
        sample[f"{i:03d}.png"] = _png(_object_image(key + str(i), size))
    return sample


def write_render_shards(out: str | Path, keys: list[str], *, size: int = 32, broken: tuple[str, ...] = (),
                        without_cond: bool = False, samples_per_shard: int = 4, tag: str = "v1") -> str:
    """Commit ``keys`` as render samples under ``out`` (content hash = key + ``tag``) and a manifest."""
    run = shards.DatasetRun(str(out), samples_per_shard, 0.0, 3600)
    for key in keys:
        run.add(render_sample(key, size, broken=key in broken, with_cond=not without_cond), f"{key}-{tag}", key)
    manifest, _ = run.commit(settings_hash=f"fake-{tag}", source_list_hash=f"fake-{tag}-{len(keys)}")
    return manifest
