"""Export Gaussians as the standard 3D Gaussian Splatting ``.ply`` and read it back.

File layout (what the 3DGS reference code writes and splat viewers read): binary little endian,
one ``vertex`` element, every property float32, in this order:
    x, y, z                 mean
    nx, ny, nz              zeros (unused normals)
    f_dc_0..2               SH degree-0 coefficient per channel (R, G, B)
    f_rest_0..3(K-1)-1      the higher SH coefficients, channel-major: all of R's K-1
                            coefficients, then G's, then B's (only when the SH degree > 0)
    opacity                 logit(opacity)
    scale_0..2              log(scale)
    rot_0..3                unit quaternion w, x, y, z

Our tensors follow the rasterizer's conventions (DESIGN.md): quats wxyz, scales and opacities
activated, colours either RGB [N, 3] (saved as the DC term f_dc = (rgb - 0.5) / C0, C0 = SH_C0,
so a viewer's max(SH + 0.5, 0) shows the same colour) or SH coefficients [N, K, 3],
K = (degree + 1)^2. ``load_ply`` inverts every activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import IO

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from geco.gaussians import SH_C0

__all__ = ["SH_C0", "SplatPly", "load_ply", "ply_property_names", "save_ply"]

# Opacities are clamped into [eps, 1 - eps] before the logit so 0 and 1 stay finite (float32).
_OPACITY_EPS = 1e-6


@dataclass
class SplatPly:
    """Gaussians read from a 3DGS .ply, activated: means [N, 3], quats [N, 4] wxyz (unit),
    scales [N, 3], opacities [N], sh [N, K, 3] (K = (sh_degree + 1)^2)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor

    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.sh.shape[1]) - 1

    @property
    def rgb(self) -> torch.Tensor:
        """The DC colour [N, 3] = SH_C0 * f_dc + 0.5 (the inverse of saving RGB colours)."""
        return self.sh[:, 0, :] * SH_C0 + 0.5


def ply_property_names(sh_degree: int) -> list[str]:
    """The vertex property names, in file order, for a given SH degree."""
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz"]
        + [f"f_dc_{i}" for i in range(3)]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity"]
        + [f"scale_{i}" for i in range(3)]
        + [f"rot_{i}" for i in range(4)]
    )


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def save_ply(path_or_file: str | PathLike | IO[bytes], means, quats, scales, opacities, colors_rgb_or_sh) -> None:
    """Write N Gaussians as a 3DGS .ply (see the module docstring for the layout).

    ``colors_rgb_or_sh``: RGB [N, 3] (saved as f_dc only) or SH [N, K, 3] with K a square.
    Accepts torch tensors or numpy arrays; a path or a binary file object.
    """
    means, quats, scales, opacities, colors = map(_numpy, (means, quats, scales, opacities, colors_rgb_or_sh))
    n = means.shape[0]
    for name, arr, shape in (("means", means, (n, 3)), ("quats", quats, (n, 4)), ("scales", scales, (n, 3)),
                             ("opacities", opacities, (n,))):  # fmt: skip
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if colors.shape == (n, 3):
        sh = ((colors - 0.5) / SH_C0)[:, None, :]
    elif colors.ndim == 3 and colors.shape[0] == n and colors.shape[2] == 3:
        sh = colors
    else:
        raise ValueError(f"colours must be RGB [N, 3] or SH [N, K, 3], got {colors.shape}")
    K = sh.shape[1]
    degree = math.isqrt(K) - 1
    if (degree + 1) ** 2 != K:
        raise ValueError(f"SH coefficient count K={K} is not a square (degree + 1)^2")
    if (scales <= 0).any():
        raise ValueError("scales must be positive (activated)")

    norms = np.linalg.norm(quats, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("quaternions must be non-zero")
    p = np.clip(opacities, _OPACITY_EPS, 1.0 - _OPACITY_EPS)
    columns = [
        means,
        np.zeros((n, 3)),
        sh[:, 0, :],
        sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1),  # channel-major f_rest
        np.log(p / (1.0 - p))[:, None],
        np.log(scales),
        quats / norms,
    ]
    values = np.concatenate(columns, axis=1).astype(np.float32)
    names = ply_property_names(degree)
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertices[name] = values[:, i]
    PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<").write(path_or_file)


def load_ply(path_or_file: str | PathLike | IO[bytes]) -> SplatPly:
    """Read a 3DGS .ply (ours or another tool's) back into activated float32 tensors."""
    vertex = PlyData.read(path_or_file)["vertex"]
    names = [p.name for p in vertex.properties]
    n_rest = len([name for name in names if name.startswith("f_rest_")])
    K = 1 + n_rest // 3
    if n_rest % 3 or math.isqrt(K) ** 2 != K:
        raise ValueError(f"{n_rest} f_rest properties do not make a whole SH degree")

    def stack(keys) -> np.ndarray:
        return np.stack([np.asarray(vertex[k], dtype=np.float64) for k in keys], axis=1)

    n = len(vertex.data)
    dc = stack([f"f_dc_{i}" for i in range(3)])
    rest = stack([f"f_rest_{i}" for i in range(n_rest)]) if n_rest else np.zeros((n, 0))
    sh = np.concatenate([dc[:, None, :], rest.reshape(n, 3, K - 1).transpose(0, 2, 1)], axis=1)
    quats = stack([f"rot_{i}" for i in range(4)])
    quats = quats / np.linalg.norm(quats, axis=1, keepdims=True)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return SplatPly(
        means=tensor(stack(["x", "y", "z"])),
        quats=tensor(quats),
        scales=tensor(np.exp(stack([f"scale_{i}" for i in range(3)]))),
        opacities=tensor(1.0 / (1.0 + np.exp(-np.asarray(vertex["opacity"], dtype=np.float64)))),
        sh=tensor(sh),
    )
