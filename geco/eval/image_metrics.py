"""Image metrics of the GSO protocol: PSNR, SSIM and LPIPS (AlexNet) per view.

One home each: PSNR and SSIM are :mod:`geco.metrics` (SSIM = scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)``, checked against it in tests/unit/test_metrics.py); LPIPS is
:mod:`geco.models.lpips` (v0.1, AlexNet trunk, as the image-to-3D papers report it). This module
puts them together the way the evaluation uses them:

* images are RGB in [0, 1], ``[V, 3, H, W]``, both composited on the same background (white: the
  teacher's and the renders' convention) before they get here;
* every metric is per view; the evaluation averages views per object, then objects;
* LPIPS needs torchvision-format AlexNet weights and the LPIPS v0.1 linear layers
  (``models.lpips``-style fields: local path, s3://, URL or the torch hub cache). Where they do not
  load, LPIPS is **unavailable**: its values are ``None`` and :attr:`ImageMetrics.unavailable`
  says why - never a stand-in under its name.
"""
from __future__ import annotations

import logging

import torch

from geco.metrics import psnr, ssim
from geco.models.lpips import LPIPSMetric

log = logging.getLogger(__name__)

IMAGE_METRICS = ("psnr", "ssim", "lpips")
LPIPS_MIN_SIZE = 32  # AlexNet's pooling leaves nothing of smaller images

__all__ = ["IMAGE_METRICS", "ImageMetrics"]


class ImageMetrics:
    """``metrics(pred, target)`` -> ``{"psnr": [V], "ssim": [V], "lpips": [V] | None}`` (float lists).

    Build with :meth:`load` (LPIPS weights looked up as :func:`geco.models.lpips.load_lpips` does)
    or from an :class:`~geco.models.lpips.LPIPSMetric` (tests)."""

    def __init__(self, lpips: LPIPSMetric, batch: int = 8):
        self.lpips = lpips
        self.batch = batch
        self._too_small = ""  # set when views were below LPIPS_MIN_SIZE

    @classmethod
    def load(cls, net: str = "alex", backbone_weights: str = "", linear_weights: str = "",
             allow_download: bool | None = None, device: str | torch.device | None = None) -> "ImageMetrics":
        metric = LPIPSMetric.load(net, backbone_weights, linear_weights, allow_download=allow_download, device=device)
        return cls(metric)

    @property
    def unavailable(self) -> dict[str, str]:
        """``{metric: reason}`` for each metric that cannot be computed here."""
        if not self.lpips.available:
            return {"lpips": f"LPIPS (alex) weights did not load: {self.lpips.reason}"}
        return {"lpips": self._too_small} if self._too_small else {}

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, list[float] | None]:
        if pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"expected RGB views [V, 3, H, W], got {tuple(pred.shape)}")
        out: dict[str, list[float] | None] = {"psnr": psnr(pred, target).tolist(), "ssim": ssim(pred, target).tolist()}
        if self.lpips.available and min(pred.shape[-2:]) < LPIPS_MIN_SIZE:
            self._too_small = (f"views of {pred.shape[-1]}x{pred.shape[-2]} px are below AlexNet's smallest input "
                               f"({LPIPS_MIN_SIZE} px); evaluate at a larger evaluate.resolution")
            out["lpips"] = None
        elif self.lpips.available:
            dev = next(self.lpips.model.parameters()).device
            vals = [self.lpips(pred[i:i + self.batch].to(dev).clamp(0, 1), target[i:i + self.batch].to(dev))
                    for i in range(0, len(pred), self.batch)]
            out["lpips"] = torch.cat([v.flatten().float().cpu() for v in vals]).tolist()
        else:
            out["lpips"] = None
        return out
