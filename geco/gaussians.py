"""3D Gaussians: the one container type and its rotation maths.

Every producer of Gaussians (a reconstructor, a ``.ply`` file) and every consumer (the rasterizer
in :mod:`geco.render.splat`, the exporter in :mod:`geco.export`) meets here.

Conventions (DESIGN.md "Conventions")
    Our world: Blender's, right-handed, z up. means [.., N, 3]; quats **wxyz** [.., N, 4]
    (Hamilton convention, rotation = :func:`quat_to_matrix`; normalised wherever they are read);
    scales [.., N, 3] standard deviations and opacities [.., N] in (0, 1), both already activated;
    rgb [.., N, 3] in [0, 1]. A colour stored as a degree-0 spherical harmonic is
    f_dc = (rgb - 0.5) / SH_C0 (the 3DGS convention; the rasterizer adds 0.5 back).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SH_C0", "Gaussians", "matrix_to_quat", "quat_multiply", "quat_to_matrix"]

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))


@dataclass
class Gaussians:
    """Activated 3D Gaussians in **our** world (z up), batched: [B, N, ...].

    means [B,N,3]; quats wxyz [B,N,4] (unit); scales [B,N,3] (standard deviations, activated);
    opacities [B,N] in (0,1); rgb [B,N,3] in [0,1]. ``g[i]`` with an int gives one object's
    unbatched tensors ([N, ...], what the rasterizer takes); a slice keeps the batch dimension.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    rgb: Tensor

    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> Gaussians:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(lambda t: t.detach())

    def __getitem__(self, index) -> Gaussians:
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def batched(self) -> bool:
        return self.means.dim() == 3

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.means.device


# ------------------------------------------------------------------------------- quaternions


def quat_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] (wxyz, normalised here)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)  # fmt: skip


def matrix_to_quat(R: Tensor) -> Tensor:
    """Unit quaternions [..., 4] (wxyz, w >= 0) of rotation matrices [..., 3, 3] (Shepperd's method)."""
    m = R
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate (unnormalised) quaternions; the one with the largest norm is well conditioned.
    cands = torch.stack(
        [
            torch.stack(
                [
                    1 + m00 + m11 + m22,
                    m[..., 2, 1] - m[..., 1, 2],
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1 + m00 - m11 - m22,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1 - m00 + m11 - m22,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 - m00 - m11 + m22,
                ],
                -1,
            ),
        ],
        dim=-2,
    )  # [..., 4 candidates, 4]
    best = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1).argmax(
        -1
    )
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b of wxyz quaternions (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )
