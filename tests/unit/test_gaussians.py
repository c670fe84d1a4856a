"""geco.gaussians: the Gaussians container and its quaternion maths (wxyz, Hamilton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geco.gaussians import Gaussians, matrix_to_quat, quat_multiply, quat_to_matrix


def test_quaternion_helpers():
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(256, 4, generator=g, dtype=torch.float64), dim=-1)
    q = torch.cat([q, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1], [0, 0.6, 0.8, 0]], dtype=torch.float64)])  # 180 deg
    R = quat_to_matrix(q)
    q2 = matrix_to_quat(R)
    torch.testing.assert_close(q2, q * torch.where(q[:, :1] < 0, -1.0, 1.0).to(q))
    torch.testing.assert_close(quat_to_matrix(quat_multiply(q[:10], q[10:20])), R[:10] @ R[10:20])


def test_gaussians_container():
    g = Gaussians(
        torch.zeros(2, 5, 3),
        torch.ones(2, 5, 4),
        torch.ones(2, 5, 3),
        torch.ones(2, 5),
        torch.ones(2, 5, 3, requires_grad=True),
    )
    one = g[1]
    assert one.means.shape == (5, 3) and one.opacities.shape == (5,) and not one.batched
    assert g[0:1].means.shape == (1, 5, 3) and len(g) == 2 and g.num_gaussians == 5
    assert not g.detach().rgb.requires_grad
    assert g.to(torch.float64).means.dtype == torch.float64
