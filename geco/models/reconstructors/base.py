"""What every reconstructor is: views with their cameras in, 3D Gaussians in our world out.

A reconstructor kind (one module in this package, e.g. :mod:`.lgm`) provides a ``torch.nn.Module``
that satisfies :class:`Reconstructor`, plus build / load / save functions and the cameras its input
views are described with; :mod:`geco.models.reconstructors` registers them by ``kind``.

Conventions (DESIGN.md "Conventions")
    images [B, V, 3, H, W] in [0, 1] on ``cfg.background``; Ks [B, V, 3, 3] in pixels of those
    images; c2w [B, V, 4, 4] camera-to-world, OpenCV axes, our world (z up). A kind resizes the
    views to its ``input_size`` itself (and rescales K with them). Any change of frame into the
    network's own (LGM: y up) happens inside the kind and is undone on its output.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from geco.cameras import zero123pp_cameras
from geco.gaussians import Gaussians

__all__ = ["Reconstructor", "ReconstructorLoadError", "zero123_input_cameras"]


class ReconstructorLoadError(RuntimeError):
    """A weights file does not fit the configured architecture (lists missing/unexpected keys)."""


@runtime_checkable
class Reconstructor(Protocol):
    """The interface the pipeline uses (pretraining, stage-1 bundles, ``geco generate``, benchmarks)."""

    cfg: object  # its geco.config.ReconstructorConfig

    @property
    def input_size(self) -> int:
        """Side, in pixels, of the square views the network reads."""

    def num_gaussians(self, num_views: int) -> int:
        """Gaussians produced for ``num_views`` input views."""

    def forward(self, images: Tensor, Ks: Tensor, c2w: Tensor) -> Gaussians:
        """[B,V,3,H,W] views + cameras -> batched Gaussians [B, N, ...] (float32, our world)."""

    def render(self, gaussians: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int,
               background=None) -> tuple[Tensor, Tensor]:
        """(rgb [B,C,3,H,W], alpha [B,C,1,H,W]) at world-to-camera OpenCV ``viewmats``."""

    def loss(self, pred_rgb: Tensor, pred_alpha: Tensor, gt_rgb: Tensor, gt_alpha: Tensor,
             lpips: Callable | None = None) -> dict[str, Tensor]:
        """The pretraining loss on renders: ``{"loss", ...}``."""


def zero123_input_cameras(cfg, cond_azimuth: float = 0.0) -> tuple[Tensor, Tensor]:
    """K [6,3,3] and c2w [6,4,4] (OpenCV, our world) of the six Zero123++ views as a reconstructor
    is told they were taken: Zero123++ azimuths/elevations (``cfg.zero123_elevations``) re-posed to
    the reconstructor's ``radius`` and ``fovy_deg``, at ``input_size`` pixels."""
    cams = zero123pp_cameras(
        cond_azimuth,
        elevations=tuple(cfg.zero123_elevations),
        fov_deg=cfg.fovy_deg,
        radius=cfg.radius,
        resolution=cfg.input_size,
    )
    K = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)
    c2w = torch.tensor(np.stack([c.c2w_opencv for c in cams]), dtype=torch.float32)
    return K, c2w
