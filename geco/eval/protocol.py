"""The GSO protocol's views, and scoring one object's Gaussians against its ground truth.

Views (PAPER.md "Evaluation"; all cameras look at the origin, our world frame, z up):

    input     1 view, elevation 0, azimuth 0, the conditioning camera (FOV 49.1, radius 1.5),
              ``evaluate.input_resolution`` (paper: 512)
    zero123   the 6 Zero123++ poses relative to the input (azimuth 30, 90, ..., 330; elevation
              +20/-10; FOV 30, radius 2.0: ``render.zero123``), ``evaluate.resolution``
    orbit     ``evaluate.orbit_views`` (15) evenly spaced azimuths 360 k / 15 at elevation 0, the
              conditioning camera's FOV and radius, ``evaluate.resolution``
    geometry  ``evaluate.geometry_views`` (16) fixed cameras for CD / vIoU / F-score
              (:func:`geco.eval.geometry.geometry_cameras`), ``evaluate.geometry_resolution``

A ground-truth sample is a render sample (geco/data/schema.py) with the cameras in that order:
``cond`` = input, ``000``-``005`` zero123, then orbit, then geometry, each view's camera ``kind``
naming its set, so :func:`geco.data.schema.decode_sample` groups them.

Scoring (:func:`score_object`): the model's Gaussians are rasterized at every camera of a view
set (white background, as the ground truth is composited) and compared per view (PSNR, SSIM, LPIPS:
:mod:`geco.eval.image_metrics`), then averaged over the set's views; the geometry metrics come
from depth maps at the geometry cameras (:mod:`geco.eval.geometry`). The object was normalised by
the renderer as SyncDreamer does (largest bounding-box side 1, centred).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geco.cameras import Camera, zero123pp_cameras
from geco.eval.geometry import SURFACE_ALPHA, GeometrySettings, geometry_cameras, geometry_metrics
from geco.eval.image_metrics import ImageMetrics
from geco.render.splat import render_gaussians

VIEW_SETS = ("zero123", "orbit")  # the image view sets, in the report's order
GEOMETRY = "geometry"
BACKGROUND = 1.0  # white: the renders and the teacher's convention

__all__ = ["BACKGROUND", "GEOMETRY", "VIEW_SETS", "Protocol", "render_views", "score_object"]


@dataclass(frozen=True)
class Protocol:
    """Every camera of the protocol (module docstring)."""

    input: Camera
    zero123: tuple[Camera, ...]
    orbit: tuple[Camera, ...]
    geometry: tuple[Camera, ...]
    settings: GeometrySettings = GeometrySettings()

    @classmethod
    def from_config(cls, ev, render) -> "Protocol":
        """From an :class:`~geco.config.EvaluateConfig` and the :class:`~geco.config.RenderConfig`
        whose conditioning and Zero123++ cameras (FOV, radius, elevations) it shares."""
        cond, z = render.cond, render.zero123
        inp = Camera("cond", ev.input_resolution, ev.input_resolution, cond.fov_deg, cond.radius, 0.0, 0.0)
        z123 = zero123pp_cameras(0.0, elevations=tuple(z.elevations), fov_deg=z.fov_deg, radius=z.radius,
                                 resolution=ev.resolution)
        orbit = [Camera("orbit", ev.resolution, ev.resolution, cond.fov_deg, cond.radius,
                        360.0 * k / ev.orbit_views, float(ev.orbit_elevation)) for k in range(ev.orbit_views)]
        geo = geometry_cameras(ev.geometry_views, tuple(ev.geometry_elevations), cond.radius, cond.fov_deg,
                               ev.geometry_resolution)
        settings = GeometrySettings(ev.voxel_size, ev.iou_grid, ev.iou_extent, tuple(ev.fscore_thresholds))
        return cls(inp, tuple(z123), tuple(orbit), tuple(geo), settings)

    def cameras(self) -> list[Camera]:
        """Every camera in ground-truth sample order: input, zero123, orbit, geometry."""
        return [self.input, *self.zero123, *self.orbit, *self.geometry]

    def view_set(self, name: str) -> tuple[Camera, ...]:
        return getattr(self, name)

    def describe(self) -> dict[str, Any]:
        """What the report states about the views (JSON)."""
        def cams(cs):
            c = cs[0]
            return {"count": len(cs), "resolution": c.width, "fov_deg": c.fov_deg, "radius": c.radius,
                    "azimuths": [round(x.azimuth_deg, 3) for x in cs], "elevations": [x.elevation_deg for x in cs]}

        return {"input": cams([self.input]), "zero123": cams(self.zero123), "orbit": cams(self.orbit),
                "geometry": cams(self.geometry), "voxel_size": self.settings.voxel_size,
                "iou_grid": self.settings.iou_grid, "iou_extent": self.settings.iou_extent,
                "fscore_thresholds": list(self.settings.fscore_thresholds), "surface_alpha": SURFACE_ALPHA}


def _matrices(cams) -> tuple[torch.Tensor, torch.Tensor]:
    viewmats = torch.tensor(np.stack([c.w2c_opencv for c in cams]), dtype=torch.float32)
    Ks = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)
    return viewmats, Ks


@torch.no_grad()
def render_views(gaussians, cams, with_depth: bool = False, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Unbatched Gaussians at ``cams`` (one resolution) -> ``rgb`` [V, 3, H, W] on white, ``alpha``
    [V, 1, H, W] and, ``with_depth``, ``depth`` [V, H, W] (expected camera z-depth, 0 where no splat), on CPU."""
    viewmats, Ks = _matrices(cams)
    g = gaussians if gaussians.batched else gaussians[None]
    dev = g.means.device
    w, h = cams[0].width, cams[0].height
    rgbs, alphas, depths = [], [], []
    for i in range(0, len(cams), chunk):
        kw = {"render_mode": "RGB+ED"} if with_depth else {}
        out, alpha = render_gaussians(g, viewmats[None, i:i + chunk].to(dev), Ks[None, i:i + chunk].to(dev), w, h,
                                      BACKGROUND, **kw)
        out, alpha = out[0].float().cpu(), alpha[0].float().cpu()
        rgbs.append(out[:, :3].clamp(0, 1))
        alphas.append(alpha)
        if with_depth:
            depths.append(out[:, 3] * (alpha[:, 0] > 0))
    res = {"rgb": torch.cat(rgbs), "alpha": torch.cat(alphas)}
    if with_depth:
        res["depth"] = torch.cat(depths)
    return res


def _mean(values: list[float] | None) -> float | None:
    if values is None:
        return None
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _depth_set(depth: torch.Tensor, alpha: torch.Tensor, cams) -> dict:
    return {"depths": [d.numpy() for d in depth], "masks": [(a[0] > SURFACE_ALPHA).numpy() for a in alpha],
            "Ks": [c.K for c in cams], "w2cs": [c.w2c_opencv for c in cams]}


def score_object(gaussians, gt: dict, protocol: Protocol, metrics: ImageMetrics) -> tuple[dict, dict]:
    """One model's Gaussians against one object's decoded ground truth
    (:func:`geco.data.schema.decode_sample` of a ground-truth sample, white background, with depth).

    Returns ``(scores, renders)``: scores ``{"zero123": {"psnr", "ssim", "lpips"}, "orbit": {...},
    "geometry": {"cd", "viou", "fscore", "fscore_<t>"...}}`` (means over the set's views; ``None``
    for an unavailable metric, NaN where a shape has no surface), renders ``{view set: rgb [V, 3, H, W]}``."""
    scores: dict[str, dict] = {}
    renders: dict[str, torch.Tensor] = {}
    for vs in VIEW_SETS:
        cams = protocol.view_set(vs)
        pred = render_views(gaussians, cams)
        per_view = metrics(pred["rgb"], gt[vs]["rgb"].float())
        scores[vs] = {k: _mean(v) for k, v in per_view.items()}
        renders[vs] = pred["rgb"]
    cams = protocol.geometry
    pred = render_views(gaussians, cams, with_depth=True)
    g = gt[GEOMETRY]
    scores[GEOMETRY] = geometry_metrics(_depth_set(pred["depth"], pred["alpha"], cams),
                                        _depth_set(g["depth"][:, 0], g["alpha"], cams), protocol.settings)
    return scores, renders
