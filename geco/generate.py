"""Image -> 3D Gaussians with a GECO checkpoint: one generator step, one reconstructor pass.

``geco generate IMAGE [IMAGE ...] --checkpoint URI -o OUTDIR [--seed S] [--num-samples K] [--device cpu|cuda]``

Per input image (``<name>`` = the file's stem; ``_sK`` added when ``--num-samples`` > 1, sample k
using seed S + k), OUTDIR receives:

* ``<name>[_sK].ply`` - the Gaussians as a standard 3DGS ``.ply`` (:func:`geco.export.save_ply`);
* ``<name>[_sK]_views.png`` - the prepared input followed by the 6 generated views, labelled by
  azimuth/elevation and scaled up to tiles of at least 128 px (:func:`geco.images.labeled_grid`);
* ``<name>[_sK]_turntable.gif`` - the Gaussians rendered on an orbit (24 frames, elevation 20 deg,
  radius 1.5, FOV 49.1 deg, white background) with :func:`geco.render.splat.rasterize`;

and one printed line of timings: seconds in the generator (condition encoding + the one UNet
evaluation + VAE decoding), the reconstructor and the export, with the network evaluations
**counted by forward hooks** (UNet calls split into denoising evaluations and reference passes).

Input images (:func:`prepare_image`)
    RGBA in any size and mode (8/16-bit, palette with transparency, LA, ...): the alpha gives the
    object. An image without (useful) alpha is accepted only if its border is near-uniform white;
    its alpha is then derived by thresholding the distance from white. Anything else (a photo on a
    busy background) is refused with a clear message: no background-removal model can be
    downloaded here, so provide an RGBA cut-out or a white-background image.
    The object is cropped to its alpha bounding box and re-centred and rescaled so that the longer
    side of that box spans :data:`OBJECT_FRACTION` of the frame, then composited on white:
    the fraction an object has in our conditioning renders. Those put objects normalised into
    [-0.5, 0.5]^3 at the origin, seen from radius 1.5 with a 49.1 deg FOV. A sphere of diameter 1
    (an object of extent 1 in every direction) subtends ``2 asin(0.5 / 1.5)``, so it spans
    ``tan(asin(0.5/1.5)) / tan(49.1/2 deg) = 0.774`` of the frame from every viewpoint
    (:func:`object_frame_fraction`). For comparison, a thin unit-length object seen side-on spans
    about 0.73, and a solid filling the whole unit cube overflows the frame (median 1.24 over the
    conditioning view distribution): 0.774 is the view-independent middle.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from geco.cameras import zero123pp_cameras
from geco.images import labeled_grid, to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "COND_FOV_DEG",
    "COND_RADIUS",
    "MAX_INPUT_PIXELS",
    "OBJECT_FRACTION",
    "GenerateError",
    "ImageInputError",
    "Result",
    "check_output_dir",
    "check_turntable",
    "count_calls",
    "generate",
    "load_image",
    "object_frame_fraction",
    "prepare_image",
    "render_turntable",
    "save_outputs",
]

COND_FOV_DEG = 49.1  # conditioning renders (geco.config.CondViewConfig defaults)
COND_RADIUS = 1.5

# RGB images: a pixel is background when every channel is within WHITE_LOW of white, object when
# some channel is darker than 1 - WHITE_HIGH, with a linear ramp in between (soft edges).
WHITE_LOW = 0.04
WHITE_HIGH = 0.10
# The border is "near-uniform white" when at least this fraction of its pixels are background.
BORDER_WHITE_FRACTION = 0.97


def object_frame_fraction(fov_deg: float = COND_FOV_DEG, radius: float = COND_RADIUS, extent: float = 1.0) -> float:
    """Fraction of the frame an object of diameter ``extent`` at the origin spans, seen from
    ``radius`` with a ``fov_deg`` field of view: ``tan(asin(extent / 2 / radius)) / tan(fov / 2)``."""
    if not 0 < extent / 2 < radius:
        raise ValueError("the camera must be outside the object (extent / 2 < radius)")
    return math.tan(math.asin(extent / 2 / radius)) / math.tan(math.radians(fov_deg) / 2)


OBJECT_FRACTION = object_frame_fraction()  # 0.774

# Input images above this many pixels are refused before they are decoded (a decompression bomb: a
# small file that expands to gigabytes). 8192 x 8192; inputs are resized to a few hundred pixels anyway.
MAX_INPUT_PIXELS = 8192 * 8192


class GenerateError(ValueError):
    """A problem with the request a user can fix (bad device, bad option)."""


class ImageInputError(GenerateError):
    """An input image that cannot be used (missing, not an image, unusable background)."""


# ================================================================================================
# Input images
# ================================================================================================
def _describe(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _scale_ints(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype.kind in "iu":  # PIL "I" (16-bit PNGs open as int32)
        return a.astype(np.float32) / (65535.0 if a.max(initial=0) > 255 else 255.0)
    a = a.astype(np.float32)
    peak = float(np.nanmax(a)) if a.size else 0.0
    if peak > 255.0:
        a = a / 65535.0
    elif peak > 1.0:
        a = a / 255.0
    return np.clip(np.nan_to_num(a), 0.0, 1.0)


def _from_pil(img, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
        pass
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA" if mode != "La" else "LA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        a = np.asarray(img)
    elif mode in ("L", "LA"):
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
    elif mode.startswith("I") or mode == "F":  # 16-bit / 32-bit grey
        a = np.asarray(img)[..., None]
    else:
        try:
            a = np.asarray(img.convert("RGBA"))
        except Exception as e:  # noqa: BLE001
            raise ImageInputError(f"{where}: unsupported image mode {mode!r} ({e})") from None
    a = _scale_ints(np.asarray(a))
    return _split_channels(a, where)


def _split_channels(a: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or min(a.shape[:2]) < 1:
        raise ImageInputError(f"{where}: expected an image H x W x {{1,2,3,4}}, got shape {tuple(a.shape)}")
    c = a.shape[2]
    rgb = np.repeat(a[..., :1], 3, axis=2) if c in (1, 2) else a[..., :3]
    alpha = a[..., -1] if c in (2, 4) else None
    return np.ascontiguousarray(rgb, np.float32), None if alpha is None else np.ascontiguousarray(alpha, np.float32)


def load_image(src) -> tuple[np.ndarray, np.ndarray | None]:
    """A path, PIL image, numpy array (H x W [x C], uint8/uint16/float) or tensor ([C, H, W] or
    [H, W, C], float in [0, 1]) -> (rgb [H, W, 3] float32 in [0, 1], alpha [H, W] or None)."""
    from PIL import Image, UnidentifiedImageError

    where = _describe(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.exists():
            raise ImageInputError(f"{path}: no such file")
        if not path.is_file():
            raise ImageInputError(f"{path}: not a file")
        try:
            with warnings.catch_warnings():  # PIL warns from ~89 Mpx; the size check below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:  # reads the header only
                    _check_pixels(img.size, path)
                    img.load()
                    return _from_pil(img, where)
        except ImageInputError:
            raise
        except Image.DecompressionBombError:  # PIL's own refusal, at open, past twice its limit
            raise ImageInputError(f"{path}: the image is too large to decode safely (more than "
                                  f"{MAX_INPUT_PIXELS:,} pixels); downscale it") from None
        except UnidentifiedImageError:
            raise ImageInputError(f"{path}: not an image (PIL cannot identify it; expected PNG, JPEG, WebP, "
                                  "TIFF, ...)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageInputError(f"{path}: cannot read the image ({e})") from None
    if isinstance(src, Image.Image):
        return _from_pil(src, where)
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 2, 3, 4) and t.shape[-1] not in (1, 2, 3, 4):
            t = t.permute(1, 2, 0)
        return _split_channels(_scale_ints(t.numpy()), where)
    if isinstance(src, np.ndarray):
        return _split_channels(_scale_ints(src), where)
    raise ImageInputError(f"{where}: expected a path, a PIL image, an array or a tensor")


def _check_pixels(size: tuple[int, int], path) -> None:
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise ImageInputError(f"{path}: {w}x{h} pixels is more than the {MAX_INPUT_PIXELS:,} an input may have "
                              "(a decompression bomb?); downscale it")


def _alpha_from_white_background(rgb: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, object mask for the bounding box) of an image on white. The mask's threshold rises
    with the object's contrast (a quarter of its median distance from white) so that JPEG ringing
    around a dark object does not widen the box; light objects keep the alpha's own threshold."""
    h, w = rgb.shape[:2]
    dist = 1.0 - rgb.min(axis=2)  # how far the darkest channel is from white
    b = max(1, round(0.02 * min(h, w)))
    border = np.concatenate([dist[:b].ravel(), dist[-b:].ravel(), dist[:, :b].ravel(), dist[:, -b:].ravel()])
    white = float((border <= WHITE_LOW).mean())
    if white < BORDER_WHITE_FRACTION:
        raise ImageInputError(
            f"{where}: no transparent background, and the border is not plain white (only {white:.0%} of the "
            f"border pixels are near white; need {BORDER_WHITE_FRACTION:.0%}). Provide an RGBA image whose alpha "
            "masks the object (e.g. a cut-out PNG), or a picture of the object on a plain white background; "
            "no background-removal model is available here.")
    alpha = np.clip((dist - WHITE_LOW) / (WHITE_HIGH - WHITE_LOW), 0.0, 1.0).astype(np.float32)
    inside = dist[dist > WHITE_HIGH]
    threshold = max(0.5 * (WHITE_LOW + WHITE_HIGH), 0.25 * float(np.median(inside)) if inside.size else 0.0)
    return alpha, dist > threshold


def prepare_image(src, size: int, fraction: float = OBJECT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> (rgb [3, S, S] in [0, 1] composited on white, alpha [1, S, S]) framed like our
    conditioning renders (module docstring): cropped to the object's alpha bounding box, the box's
    longer side scaled to ``fraction`` of the frame, centred."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    where = _describe(src)
    rgb, alpha = load_image(src)
    if alpha is not None and float(alpha.min()) > 0.99:  # an opaque alpha channel says nothing
        alpha = None
    if alpha is None:
        alpha, mask = _alpha_from_white_background(rgb, where)
    else:
        mask = alpha > 0.5
    if not mask.any():
        mask = alpha > 0.0
    if not mask.any():
        raise ImageInputError(f"{where}: no object found (the image is fully transparent or plain white)")
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])  # straight alpha, on white
    crop_rgb, crop_a = rgb[top:bottom, left:right], alpha[top:bottom, left:right]
    h, w = crop_a.shape
    side = max(int(math.ceil(max(h, w) / fraction)), 1)
    canvas = np.ones((side, side, 4), np.float32)
    canvas[..., 3] = 0.0
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[y0:y0 + h, x0:x0 + w, :3] = crop_rgb
    canvas[y0:y0 + h, x0:x0 + w, 3] = crop_a
    t = torch.from_numpy(canvas).permute(2, 0, 1)[None]
    if side != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    t = t[0].clamp(0, 1)
    return t[:3].contiguous(), t[3:].contiguous()


# ================================================================================================
# Generation
# ================================================================================================
@dataclass
class Result:
    """One generated object. ``gaussians`` unbatched ([N, ...], CPU, our world); ``views`` [6, 3, t, t]
    and ``input_rgb`` [3, S, S] in [0, 1]; ``timings`` in seconds (``generator_s``,
    ``reconstructor_s``; :func:`save_outputs` adds ``export_s``, ``views_png_s``, ``turntable_s``);
    ``evals`` network evaluations counted by forward hooks."""

    gaussians: Any
    views: torch.Tensor
    latents: torch.Tensor
    input_rgb: torch.Tensor
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    evals: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def seconds_to_3d(self) -> float:
        return self.timings.get("generator_s", 0.0) + self.timings.get("reconstructor_s", 0.0)


@contextlib.contextmanager
def count_calls(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, int]]:
    """Count ``forward`` calls of each module while the block runs. A UNet with reference attention
    is split by its call's ``cross_attention_kwargs``: ``<name>_reference`` (the reference pass,
    mode "write") and ``<name>_denoise`` (every other call), plus ``<name>`` = both."""
    counts: dict[str, int] = {}
    handles = []

    def make(name):
        def hook(_module, _args, kwargs, _out):
            counts[name] = counts.get(name, 0) + 1
            cak = kwargs.get("cross_attention_kwargs") if isinstance(kwargs, dict) else None
            if name == "unet":
                sub = "unet_reference" if (cak or {}).get("ref_mode") == "write" else "unet_denoise"
                counts[sub] = counts.get(sub, 0) + 1
        return hook

    for name, mod in modules.items():
        if mod is not None and isinstance(mod, torch.nn.Module):
            counts.setdefault(name, 0)
            handles.append(mod.register_forward_hook(make(name), with_kwargs=True))
    if "unet" in counts:
        counts.setdefault("unet_denoise", 0)
        counts.setdefault("unet_reference", 0)
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstructor_cameras(reconstructor, tile: int, cond_azimuth: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """K [6, 3, 3] in pixels of ``tile``-sized views and c2w [6, 4, 4] of the six Zero123++ views
    as the reconstructor is told they were taken (``cond_azimuth``: the conditioning view's azimuth
    in degrees, so the Gaussians come out in the frame of a shard's cameras; 0 for a lone image)."""
    from geco.models.reconstructors import input_cameras

    return input_cameras(reconstructor.cfg, cond_azimuth, tile)


@torch.no_grad()
def generate(bundle, image, seed: int = 0, num_samples: int = 1) -> list[Result]:
    """``num_samples`` objects for one image (a path, array, PIL image or a prepared [3, S, S]
    tensor), sample k with seed ``seed + k``: each = one generator call (one UNet evaluation + its
    reference pass) + one reconstructor pass."""
    if num_samples < 1:
        raise GenerateError(f"num_samples must be >= 1, got {num_samples}")
    teacher, gen, rec = bundle.teacher, bundle.generator, bundle.reconstructor
    device = gen.device
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.is_floating_point():
        cond_rgb = image
    else:
        cond_rgb, _ = prepare_image(image, teacher.cond_size)
    x = cond_rgb[None].to(device, torch.float32)
    K, c2w = reconstructor_cameras(rec, teacher.tile_size)
    K, c2w = K[None].to(device), c2w[None].to(device)
    modules = {"unet": gen.unet, "vae_encoder": teacher.vae.encoder, "vae_decoder": teacher.vae.decoder,
               "vision_encoder": teacher.vision_encoder, "reconstructor": rec}
    results = []
    for k in range(num_samples):
        s = int(seed) + k
        with count_calls(modules) as counts:
            _sync(device)
            t0 = time.perf_counter()
            latents, views = gen.generate(x, generator=s)
            _sync(device)
            t1 = time.perf_counter()
            gaussians = rec(views, K, c2w)
            _sync(device)
            t2 = time.perf_counter()
        results.append(Result(gaussians=gaussians[0].detach().to("cpu", torch.float32), views=views[0].float().cpu(),
                              latents=latents[0].cpu(), input_rgb=cond_rgb.cpu(), seed=s,
                              timings={"generator_s": t1 - t0, "reconstructor_s": t2 - t1}, evals=dict(counts)))
    return results


# ================================================================================================
# Outputs
# ================================================================================================
def views_image(result: Result) -> np.ndarray:
    """The input (resized to a view's size) followed by the 6 views in one labelled row, each view
    named by its Zero123++ pose (azimuth relative to the input, elevation), scaled up to readable
    tiles."""
    t = result.views.shape[-1]
    inp = F.interpolate(result.input_rgb[None], size=(t, t), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    labels = ["input"] + [f"az {c.azimuth_deg:.0f}° el {c.elevation_deg:+.0f}°" for c in zero123pp_cameras(0.0)]
    return labeled_grid([[to_uint8(inp)] + [to_uint8(v) for v in result.views]], labels)


@torch.no_grad()
def render_turntable(gaussians, frames: int = 24, size: int = 256, elevation: float = 20.0,
                     radius: float = COND_RADIUS, fov_deg: float = COND_FOV_DEG, background: float = 1.0,
                     chunk: int = 8) -> list[np.ndarray]:
    """Render unbatched Gaussians on an orbit (azimuths 0, 360/frames, ...) -> uint8 frames."""
    from geco.cameras import Camera
    from geco.render.splat import render_gaussians

    cams = [Camera("random", size, size, fov_deg, radius, 360.0 * i / frames, elevation) for i in range(frames)]
    dev = gaussians.means.device
    viewmats = torch.tensor(np.stack([c.w2c_opencv for c in cams]), dtype=torch.float32, device=dev)
    Ks = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32, device=dev)
    g = gaussians if gaussians.batched else gaussians[None]
    out = []
    for i in range(0, frames, chunk):
        rgb, _ = render_gaussians(g, viewmats[None, i:i + chunk], Ks[None, i:i + chunk], size, size, background)
        out.extend(to_uint8(f.float().cpu()) for f in rgb[0])
    return out


def check_turntable(frames: int, size: int) -> None:
    """Refuse turntable options that would fail after the other outputs are written."""
    if frames < 0:
        raise GenerateError(f"--turntable-frames must be >= 0 (0: no GIF), got {frames}")
    if frames > 0 and size < 1:
        raise GenerateError(f"--turntable-size must be >= 1 pixel, got {size}")


def check_output_dir(outdir: str | os.PathLike) -> Path:
    """``outdir``, created if needed and shown to be writable (a probe file is written and removed),
    so that a bad ``-o`` fails before any model runs."""
    out = Path(outdir).expanduser()
    if out.exists() and not out.is_dir():
        raise GenerateError(f"-o {outdir}: exists and is not a folder; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".geco-write-check-"):
            pass
    except OSError as e:
        raise GenerateError(f"-o {outdir}: cannot write there ({e.strerror or e}); give a writable folder") from None
    return out


def save_outputs(result: Result, outdir: str | os.PathLike, name: str, turntable_frames: int = 24,
                 turntable_size: int = 256) -> dict[str, str]:
    """Write ``<name>.ply``, ``<name>_views.png`` and ``<name>_turntable.gif`` (unless
    ``turntable_frames`` is 0) into ``outdir``; timings go into ``result.timings``."""
    from PIL import Image

    from geco.export import save_ply

    check_turntable(turntable_frames, turntable_size)
    out = check_output_dir(outdir)
    g = result.gaussians
    paths = {}
    t0 = time.perf_counter()
    paths["ply"] = str(out / f"{name}.ply")
    save_ply(paths["ply"], g.means, g.quats, g.scales, g.opacities, g.rgb)
    t1 = time.perf_counter()
    paths["views"] = str(out / f"{name}_views.png")
    Image.fromarray(views_image(result)).save(paths["views"])
    t2 = time.perf_counter()
    result.timings.update({"export_s": t1 - t0, "views_png_s": t2 - t1})
    if turntable_frames > 0:
        frames = render_turntable(g, turntable_frames, turntable_size)
        paths["turntable"] = str(out / f"{name}_turntable.gif")
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(paths["turntable"], save_all=True, append_images=imgs[1:], duration=max(20, 2000 // len(imgs)),
                     loop=0, disposal=2)
        result.timings["turntable_s"] = time.perf_counter() - t2
    result.outputs = paths
    return paths


def timing_line(name: str, result: Result) -> str:
    t, e = result.timings, result.evals
    return (f"{name}: seed {result.seed}  time to 3D {result.seconds_to_3d:.3f} s = generator {t['generator_s']:.3f} s "
            f"(UNet calls {e.get('unet', 0)}: {e.get('unet_denoise', 0)} denoising + {e.get('unet_reference', 0)} "
            f"reference; VAE enc {e.get('vae_encoder', 0)}, dec {e.get('vae_decoder', 0)}; CLIP "
            f"{e.get('vision_encoder', 0)}) + reconstructor {t['reconstructor_s']:.3f} s "
            f"({e.get('reconstructor', 0)} call, {result.gaussians.num_gaussians} Gaussians); export "
            f"{t.get('export_s', 0.0):.3f} s" + (f"; turntable {t['turntable_s']:.2f} s" if "turntable_s" in t else ""))


# ================================================================================================
# The command
# ================================================================================================
def _names(images: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for img in images:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(img).stem) or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out.append(stem if n == 1 else f"{stem}-{n}")
    return out


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                            "use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise GenerateError(f"--device must be cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def run(images: list[str], checkpoint: str, outdir: str, seed: int = 0, num_samples: int = 1,
        device: str | None = None, turntable_frames: int = 24, turntable_size: int = 256,
        tracking_uri: str | None = None, echo=print) -> list[Result]:
    """What ``geco generate`` does: check every input first (options, files, the output folder, then
    the checkpoint, then the pixels), load the bundle once, generate, write, print a timing line per object."""
    from geco.models.bundle import load_bundle, read_manifest, resolve_checkpoint

    if num_samples < 1:
        raise GenerateError(f"--num-samples must be >= 1, got {num_samples}")
    check_turntable(turntable_frames, turntable_size)
    dev = pick_device(device)
    for img in images:  # cheap checks before anything is downloaded
        p = Path(img).expanduser()
        if not p.exists():
            raise ImageInputError(f"{img}: no such file")
        if not p.is_file():
            raise ImageInputError(f"{img}: not a file")
    check_output_dir(outdir)
    with contextlib.suppress(Exception):  # transformers' per-load "Loading weights" bars clutter the output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    root = resolve_checkpoint(checkpoint, tracking_uri=tracking_uri)
    cond_size = int(read_manifest(root)["models"]["teacher"].get("cond_size", 512))
    prepared = [prepare_image(img, cond_size)[0] for img in images]  # refuse bad images before loading models
    bundle = load_bundle(root, device=dev)
    echo(f"checkpoint {checkpoint} loaded in {time.perf_counter() - t0:.1f} s on {dev} (teacher "
         f"{'with' if bundle.teacher_has_unet else 'without'} UNet; generator t*={bundle.generator.timestep})")
    results = []
    for img, name, cond in zip(images, _names(images), prepared):
        for r in generate(bundle, cond, seed=seed, num_samples=num_samples):
            stem = name if num_samples == 1 else f"{name}_s{r.seed - seed}"
            save_outputs(r, outdir, stem, turntable_frames, turntable_size)
            echo(timing_line(f"{img} -> {r.outputs['ply']}", r))
            results.append(r)
    return results
