"""Pseudo ground truth for stage 2: the teacher's multi-step sample, lifted to 3D and rendered.

Per object (PAPER.md "Stage 2"; GECO v1's pseudo-GT script)::

    cond.png of a render sample ──► teacher: K-step deterministic DDIM (eta 0) from saved noise z
                                    (seeded by hash(object key, seed)), CFG ``guidance_scale``
                                 ──► 3 x 2 grid ──► 6 views ──► reconstructor ──► Gaussians (our world)
                                 ──► rasterized (geco.render.splat) at the 6 Zero123++ poses of the
                                    render sample + ``num_views - 6`` random views ──► RGBA + depth

Objects are batched through the teacher, the reconstructor and the rasterizer (:meth:`PseudoGT.run`;
a view renders the same whichever objects share its batch); a sample that
cannot be used (no conditioning view, no Zero123++ cameras, a broken image) is returned as a
:class:`PseudoGTError` naming the object and the reason, and the rest of the batch goes on.

Output sample (CONTRACTS.md "Pseudo-GT shards"; the render schema of :mod:`geco.data.schema`,
without normals, so :func:`~geco.data.schema.decode_sample` reads it):

* ``cond.png`` copied from the render sample; ``000.png``-``005.png`` the Zero123++ poses (the
  render sample's cameras ``000``-``005`` at ``resolution``: azimuth relative to the cond view,
  as render writes them); ``006.png``... the random views (elevation uniform in
  ``random_elevation_range``, azimuth uniform in ``random_azimuth_range``, ``random_radius``,
  ``random_fov_deg``; drawn by :func:`geco.cameras.sample_object_cameras` from (key, seed)).
  Images are straight-alpha RGBA, alpha = the rendered opacity; colour = premultiplied render /
  alpha, so compositing on white at load time gives exactly the render on white.
* ``NNN.depth.npy``: float16 expected camera z-depth (gsplat's "ED"), 0 where alpha < 0.5
  (:data:`DEPTH_MIN_ALPHA`: a pixel more transparent than opaque has no surface).
* ``cameras.json``: the render sample's ``cond`` camera, then every view (``Camera.to_dict``).
* ``noise.npy``: the float32 initial noise [C, h, w] (the teacher's latent grid);
  ``teacher.png``: the teacher's decoded 3 x 2 grid (RGB); ``gaussians.ply``: the Gaussians
  (:func:`geco.export.save_ply`); ``meta.json``: what the caller passes (hashes, lineage).

Reproducibility: the noise and the random cameras depend only on (key, seed). The DDIM sampler
is deterministic, but the teacher's condition latent and its reference-attention noise come from
one generator per batch (seeded by the batch's keys), so a sample is reproducible from its batch.

Hashes that make the stage incremental: :func:`weights_hash` (a model's files: names, sizes, ETags,
plus the settings that shape it) and :meth:`geco.config.PseudoGTConfig.settings_hash`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from geco import storage
from geco.cameras import Camera, sample_object_cameras
from geco.config import PseudoGTConfig
from geco.data.schema import SampleError, decode_sample
from geco.export import save_ply
from geco.images import to_uint8
from geco.models.reconstructors import input_cameras
from geco.models.teacher import NUM_VIEWS, views_from_grid
from geco.render.splat import render_gaussians

__all__ = [
    "DEPTH_MIN_ALPHA",
    "PseudoGT",
    "PseudoGTError",
    "PseudoGTSetupError",
    "Result",
    "check_fit",
    "initial_noise",
    "view_cameras",
    "weights_hash",
]

DEPTH_MIN_ALPHA = 0.5  # depth is 0 ("no surface") where the rendered alpha is below this
RENDER_CHUNK = 10  # (object, view) pairs rasterized per call (bounds memory at 50 views, or 50 objects)


class PseudoGTError(SampleError):
    """One source sample that cannot become pseudo-GT (the message names the object and why)."""


class PseudoGTSetupError(ValueError):
    """A teacher / reconstructor pair or a dataset that cannot make pseudo-GT at all (one line)."""


# ------------------------------------------------------------------------------------------------
# checks and hashes
# ------------------------------------------------------------------------------------------------
def check_fit(tile_size: int, input_size: int, max_upscale: float) -> None:
    """The reconstructor reads the teacher's ``tile_size`` tiles resized to its ``input_size``;
    refuse a pair that would upscale them by more than ``max_upscale`` (a mismatched pair)."""
    if input_size > tile_size * max_upscale:
        raise PseudoGTSetupError(
            f"models.reconstructor.input_size={input_size} does not fit models.teacher.tile_size={tile_size}: the "
            f"reconstructor would read the teacher's views upscaled {input_size / tile_size:.1f}x (more than "
            f"pseudo_gt.max_reconstructor_upscale={max_upscale:g}); pair it with a teacher of larger tiles or a "
            "reconstructor for smaller inputs")


def weights_hash(uris: list[str], settings: Mapping[str, Any]) -> str:
    """A short hash of a model: ``settings`` (what shapes it beyond its files) and, for each
    non-empty URI (a folder/prefix or a file), its files' relative names, sizes and ETags (S3's, or
    mtime-size locally) from one listing: no weights are read. No URI: a tiny random model, whose
    weights follow from ``settings``."""
    h = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for uri in uris:
        if not uri:
            continue
        uri = uri.rstrip("/")
        stats = storage.list_stats(uri) or {uri: storage.stat(uri)}
        for u, st in sorted(stats.items()):
            h.update(f"\x00{u[len(uri):]}:{st['size']}:{st['etag']}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# noise and cameras
# ------------------------------------------------------------------------------------------------
def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def initial_noise(key: str, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The teacher's initial N(0, I) noise for one object ([C, h, w] float32), from (key, seed)."""
    g = torch.Generator().manual_seed(_seed("pseudo-gt-noise", key, seed))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def view_cameras(key: str, source_cameras: list[Mapping[str, Any]], cfg: PseudoGTConfig) -> list[Camera]:
    """The ``cfg.num_views`` cameras of one object, in shard order: the render sample's Zero123++
    cameras ``000``-``005`` at ``cfg.resolution``, then the random views (module docstring).
    Raises :class:`PseudoGTError` when the render sample has no such cameras."""
    z123 = []
    for i, cam in enumerate(source_cameras[1:1 + NUM_VIEWS]):
        if cam.get("kind") != "zero123":
            break
        fields = {f.name: cam[f.name] for f in dataclasses.fields(Camera) if f.name in cam}
        try:
            z123.append(dataclasses.replace(Camera(**fields), width=cfg.resolution, height=cfg.resolution))
        except TypeError as e:
            raise PseudoGTError(f"object {key!r}: camera {i:03d} is incomplete ({e})") from None
    if len(z123) != NUM_VIEWS:
        raise PseudoGTError(f"object {key!r}: its render sample has {len(z123)} Zero123++ cameras (000-005), "
                            f"need {NUM_VIEWS}: render it with the render stage")
    lo, hi = cfg.random_azimuth_range
    randoms = sample_object_cameras(key, cfg.seed, num_random=cfg.num_views - NUM_VIEWS,
                                    random_fov_deg=cfg.random_fov_deg, random_radius=cfg.random_radius,
                                    random_resolution=cfg.resolution,
                                    random_elevation_range=tuple(cfg.random_elevation_range))[1 + NUM_VIEWS:]
    # sample_object_cameras draws azimuths uniform in [0, 360): map them linearly onto [lo, hi)
    randoms = [dataclasses.replace(c, azimuth_deg=lo + c.azimuth_deg / 360.0 * (hi - lo)) for c in randoms]
    return z123 + randoms


# ------------------------------------------------------------------------------------------------
# encoding members
# ------------------------------------------------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _rgba_png(premultiplied: torch.Tensor, alpha: torch.Tensor) -> bytes:
    """[3,H,W] premultiplied colour + [1,H,W] alpha -> straight-alpha RGBA PNG."""
    straight = (premultiplied / alpha.clamp(min=1e-6)).clamp(0, 1)
    rgba = torch.cat([straight, alpha.clamp(0, 1)]).permute(1, 2, 0).float().cpu().numpy()
    return _png((rgba * 255 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# the batch job
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One object's pseudo-GT: ``members`` (the sample without ``__key__`` and ``meta.json``), the
    Gaussians (unbatched, CPU) and the teacher's grid; ``seconds`` its share of the batch's time."""

    key: str
    members: dict[str, bytes]
    gaussians: Any = None
    teacher_grid: np.ndarray | None = None  # H x W x 3 uint8
    seconds: dict[str, float] = field(default_factory=dict)


class PseudoGT:
    """Holds a teacher and a reconstructor; :meth:`run` turns render samples into pseudo-GT.

    ``teacher``: a :class:`geco.models.teacher.Zero123PlusTeacher`; ``reconstructor``: a
    :class:`geco.models.reconstructors.Reconstructor`; both on ``device`` and in eval mode. The
    pair is checked with :func:`check_fit` here."""

    def __init__(self, teacher, reconstructor, cfg: PseudoGTConfig):
        check_fit(teacher.tile_size, reconstructor.input_size, cfg.max_reconstructor_upscale)
        self.teacher, self.reconstructor, self.cfg = teacher, reconstructor, cfg
        self.guidance_scale = teacher.cfg.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def _prepare(self, sample: Mapping[str, Any]) -> tuple[str, torch.Tensor, list[dict], list[Camera]]:
        key = str(sample.get("__key__", "?"))
        if sample.get("cond.png") is None:
            raise PseudoGTError(f"object {key!r}: no conditioning view (cond.png); pseudo-GT needs render shards")
        try:
            dec = decode_sample(sample, background=(1.0, 1.0, 1.0), views="none", with_depth=False,
                                with_normals=False)
        except (SampleError, ValueError, OSError) as e:  # a broken PNG or cameras.json
            raise PseudoGTError(f"object {key!r}: {e}") from None
        cams = view_cameras(key, dec["cameras"], self.cfg)
        return key, dec["cond_rgb"], dec["cameras"], cams

    @torch.no_grad()
    def run(self, samples: list[Mapping[str, Any]]) -> list[Result | PseudoGTError]:
        """One result per sample, in order: a :class:`Result`, or the :class:`PseudoGTError` saying
        why that sample was skipped. Samples are raw render rows (``decode_sample``'s input)."""
        out: list[Result | PseudoGTError] = [None] * len(samples)  # type: ignore[list-item]
        ok = []
        for i, s in enumerate(samples):
            try:
                ok.append((i, s, *self._prepare(s)))
            except PseudoGTError as e:
                out[i] = e
        if not ok:
            return out
        teacher, rec, dev = self.teacher, self.reconstructor, self.device
        size = teacher.cond_size
        conds = [c if c.shape[-1] == size and c.shape[-2] == size else
                 F.interpolate(c[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
                 for *_, c, _, _ in ok]
        cond = torch.stack(conds).to(dev)
        keys = [k for _, _, k, *_ in ok]
        noise = torch.stack([initial_noise(k, self.cfg.seed, teacher.latent_shape(1)[1:]) for k in keys])
        t0 = time.perf_counter()
        g = torch.Generator(device=dev).manual_seed(_seed("pseudo-gt-batch", self.cfg.seed, *keys))
        lat = teacher.sample(cond, num_steps=self.cfg.steps, guidance_scale=self.guidance_scale, sampler="ddim",
                             generator=g, latents=noise.to(dev), eta=0.0)
        grid = teacher.decode_latents(lat)  # [B, 3, 3t, 2t] in [0, 1]
        views = views_from_grid(grid, teacher.tile_size)  # [B, 6, 3, t, t]
        t1 = time.perf_counter()
        Ks, c2ws = [], []
        for *_, src_cams, _ in ok:  # the reconstructor is told the views' poses around the cond view
            K, c2w = input_cameras(rec.cfg, float(src_cams[0].get("azimuth_deg", 0.0)), teacher.tile_size)
            Ks.append(K)
            c2ws.append(c2w)
        gaussians = rec(views.to(dev), torch.stack(Ks).to(dev), torch.stack(c2ws).to(dev)).detach().to(
            dtype=torch.float32)  # rendered where they are (gsplat on GPU, our torch path on CPU)
        t2 = time.perf_counter()
        n = len(ok)
        rendered = self._render(gaussians, [cams for *_, cams in ok])
        t3 = time.perf_counter()
        for b, (i, s, key, _, src_cams, cams) in enumerate(ok):
            t4 = time.perf_counter()
            members = rendered[b]
            members["cond.png"] = bytes(s["cond.png"])
            members["cameras.json"] = json.dumps([dict(src_cams[0], name="cond")] + [
                dict(c.to_dict(), name=f"{j:03d}") for j, c in enumerate(cams)]).encode()
            members["noise.npy"] = _npy(noise[b].numpy().astype(np.float32))
            teacher_grid = to_uint8(grid[b])
            members["teacher.png"] = _png(teacher_grid)
            g_b = gaussians[b].to("cpu")
            ply = io.BytesIO()
            save_ply(ply, g_b.means, g_b.quats, g_b.scales, g_b.opacities, g_b.rgb)
            members["gaussians.ply"] = ply.getvalue()
            out[i] = Result(key, members, g_b, teacher_grid,
                            {"teacher": (t1 - t0) / n, "reconstructor": (t2 - t1) / n,
                             "render": (t3 - t2) / n + time.perf_counter() - t4})
        return out

    def _render(self, gaussians, cams: list[list[Camera]]) -> list[dict[str, bytes]]:
        """RGBA PNG + depth of each object's cameras (module docstring): ``gaussians`` batched
        [B, N, ...], ``cams`` B lists of ``cfg.num_views``. A call rasterizes up to RENDER_CHUNK
        (object, view) pairs: several objects' views at once (one batch of scenes)."""
        res = self.cfg.resolution
        viewmats = torch.tensor(np.stack([[c.w2c_opencv for c in cs] for cs in cams]), dtype=torch.float32)
        Ks = torch.tensor(np.stack([[c.K for c in cs] for cs in cams]), dtype=torch.float32)
        members: list[dict[str, bytes]] = [{} for _ in cams]
        objects = min(len(cams), RENDER_CHUNK)
        views = max(1, RENDER_CHUNK // objects)
        for o in range(0, len(cams), objects):
            for v in range(0, viewmats.shape[1], views):
                sl = (slice(o, o + objects), slice(v, v + views))
                out, alpha = render_gaussians(gaussians[sl[0]], viewmats[sl], Ks[sl], res, res, background=0.0,
                                              render_mode="RGB+ED")
                out, alpha = out.cpu(), alpha.cpu()
                for b, m in enumerate(members[sl[0]]):
                    for j in range(out.shape[1]):
                        name = f"{v + j:03d}"
                        rgb, depth, a = out[b, j, :3], out[b, j, 3], alpha[b, j]
                        m[f"{name}.png"] = _rgba_png(rgb, a)
                        d = torch.where(a[0] >= DEPTH_MIN_ALPHA, depth, torch.zeros_like(depth))
                        m[f"{name}.depth.npy"] = _npy(d.numpy().astype(np.float16))
        return members
