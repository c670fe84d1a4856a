"""Image metrics for evaluation: PSNR and SSIM per image (LPIPS lives in geco/models/lpips.py).

Both take images in [0, 1] shaped ``[..., C, H, W]`` (any leading batch dimensions) and return one
value per image (the leading shape), so callers average the way the paper does: per image, then
over images and objects. Predictions are clamped to [0, 1]; targets are used as they are.

SSIM follows Wang et al. 2004 as implemented by scikit-image's ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`` (the setting the
image-to-3D papers report): an 11x11 Gaussian window, constants (0.01, 0.03), valid convolution
(no padding), the mean over channels and positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # pixels (scikit-image: 2 * round(3.5 * sigma) + 1 = 11 for sigma 1.5)
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (``[..., C, H, W]`` -> ``[...]``); an exact match gives 100 dB."""
    pred, target = _pair(pred, target)
    mse = ((pred - target) ** 2).flatten(-3).mean(-1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (``[..., C, H, W]`` -> ``[...]``), in [-1, 1]; 1 for identical images.

    Images smaller than the 11-pixel window are compared with a window as large as they are."""
    pred, target = _pair(pred, target)
    lead, (c, h, w) = pred.shape[:-3], pred.shape[-3:]
    x = pred.reshape(-1, c, h, w).double()
    y = target.reshape(-1, c, h, w).double()
    size = min(SSIM_WINDOW, h, w)
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    win = _gaussian_window(size, sigma, c, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).to(pred.dtype).reshape(lead)


def paired_psnr_margin(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image ``i`` of a batch (``[B, C, H, W]``, B >= 2): PSNR(pred_i, target_i) minus the highest
    PSNR(pred_i, target_j) over the other targets ``j`` (dB). Above 0: closer to its own target than to
    any other; a blurry mean, a constant colour or one image for every input scores about 0 or below."""
    b = pred.shape[0]
    if b < 2:
        raise ValueError(f"a paired margin needs 2 or more images, got {b}")
    pairs = psnr(pred[:, None].expand(b, *pred.shape), target[None].expand(b, *target.shape))  # [pred i, target j]
    own = pairs.diagonal()
    others = pairs.masked_fill(torch.eye(b, dtype=torch.bool, device=pairs.device), float("-inf"))
    return own - others.max(dim=1).values


def mean_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The mean of the per-image PSNRs (dB), as a float."""
    return float(psnr(pred, target).mean())


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() < 3:
        raise ValueError(f"expected images shaped [..., C, H, W], got {tuple(pred.shape)}")
    pred = pred.detach().float().clamp(0, 1)
    return pred, target.detach().to(pred.device, torch.float32)


__all__ = ["psnr", "ssim", "mean_psnr", "paired_psnr_margin", "SSIM_WINDOW", "SSIM_SIGMA"]
