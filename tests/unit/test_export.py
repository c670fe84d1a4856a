"""Tests for geco.export: the standard 3DGS .ply layout and a lossless round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from plyfile import PlyData

from geco.export import SH_C0, load_ply, ply_property_names, save_ply


def gaussians(n=50, degree=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g) * 3.0  # not normalised on purpose
    scales = torch.rand(n, 3, generator=g) * 0.1 + 1e-3
    opacities = torch.rand(n, generator=g) * 0.98 + 0.01
    sh = torch.randn(n, (degree + 1) ** 2, 3, generator=g) * 0.5
    return means, quats, scales, opacities, sh


def expected_names(degree):
    rest = [f"f_rest_{i}" for i in range(3 * ((degree + 1) ** 2 - 1))]
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + rest
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])  # fmt: skip


@pytest.mark.parametrize("degree", [0, 3])
def test_layout_is_what_3dgs_viewers_read(tmp_path, degree):
    means, quats, scales, opacities, sh = gaussians(degree=degree)
    path = tmp_path / "splat.ply"
    save_ply(path, means, quats, scales, opacities, sh)
    ply = PlyData.read(str(path))
    assert ply.header.splitlines()[1] == "format binary_little_endian 1.0"
    assert [e.name for e in ply.elements] == ["vertex"]
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == expected_names(degree) == ply_property_names(degree)
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in vertex.data.dtype.names)
    assert len(vertex.data) == 50
    # stored values: activations inverted, normals zero, rotations unit wxyz
    np.testing.assert_allclose(vertex["opacity"], torch.logit(opacities.double()).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vertex["scale_1"], scales[:, 1].log().numpy(), rtol=1e-6)
    assert not np.any(vertex["nx"]) and not np.any(vertex["nz"])
    rot = np.stack([vertex[f"rot_{i}"] for i in range(4)], axis=1)
    np.testing.assert_allclose(rot, (quats / quats.norm(dim=1, keepdim=True)).numpy(), rtol=1e-6, atol=1e-7)
    if degree:
        # f_rest is channel-major (3DGS transposes [N, K-1, 3] to [N, 3, K-1] before flattening)
        np.testing.assert_allclose(vertex["f_rest_0"], sh[:, 1, 0].numpy())  # red, first band
        np.testing.assert_allclose(vertex["f_rest_15"], sh[:, 1, 1].numpy())  # green starts at K-1
        np.testing.assert_allclose(vertex["f_rest_44"], sh[:, 15, 2].numpy())  # blue, last


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_round_trip(tmp_path, degree):
    means, quats, scales, opacities, sh = gaussians(degree=degree, seed=degree)
    save_ply(tmp_path / "a.ply", means, quats, scales, opacities, sh)
    back = load_ply(tmp_path / "a.ply")
    assert back.sh_degree == degree
    torch.testing.assert_close(back.means, means)
    torch.testing.assert_close(back.quats, quats / quats.norm(dim=1, keepdim=True))
    torch.testing.assert_close(back.scales, scales)
    torch.testing.assert_close(back.opacities, opacities)
    torch.testing.assert_close(back.sh, sh)


def test_rgb_colours_become_the_dc_term():
    means, quats, scales, opacities, _ = gaussians()
    rgb = torch.rand(50, 3)
    buffer = io.BytesIO()
    save_ply(buffer, means.numpy(), quats.numpy(), scales.numpy(), opacities.numpy(), rgb.numpy())
    buffer.seek(0)
    vertex = PlyData.read(buffer)["vertex"]
    assert not any(p.name.startswith("f_rest") for p in vertex.properties)
    np.testing.assert_allclose(vertex["f_dc_2"], ((rgb[:, 2] - 0.5) / SH_C0).numpy(), rtol=1e-6)
    buffer.seek(0)
    back = load_ply(buffer)
    assert back.sh.shape == (50, 1, 3) and back.sh_degree == 0
    torch.testing.assert_close(back.rgb, rgb)


def test_loaded_splats_render_like_the_originals():
    """RGB in, SH degree 0 out: the rasterizer's max(SH + 0.5, 0) gives the same image."""
    from geco.render.splat import rasterize

    means, quats, scales, opacities, _ = gaussians(n=30)
    means, scales = means * 0.2, scales * 2
    rgb = torch.rand(30, 3)
    buffer = io.BytesIO()
    save_ply(buffer, means, quats, scales, opacities, rgb)
    buffer.seek(0)
    back = load_ply(buffer)
    viewmat = torch.eye(4)
    viewmat[2, 3] = 2.0
    K = torch.tensor([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
    a, alpha_a, _ = rasterize(means, quats, scales, opacities, rgb, viewmat[None], K[None], 16, 12)
    b, alpha_b, _ = rasterize(back.means, back.quats, back.scales, back.opacities, back.sh, viewmat[None], K[None],
                              16, 12, sh_degree=0)  # fmt: skip
    assert alpha_a.max() > 0.5
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha_b, alpha_a, atol=1e-5, rtol=0)


def test_extreme_opacities_stay_finite(tmp_path):
    means, quats, scales, _, sh = gaussians(n=3)
    save_ply(tmp_path / "b.ply", means, quats, scales, torch.tensor([0.0, 1.0, 0.5]), sh)
    back = load_ply(tmp_path / "b.ply")
    assert np.isfinite(PlyData.read(str(tmp_path / "b.ply"))["vertex"]["opacity"]).all()
    torch.testing.assert_close(back.opacities, torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0)


def test_bad_inputs_raise(tmp_path):
    means, quats, scales, opacities, _ = gaussians(n=4)
    with pytest.raises(ValueError, match="square"):
        save_ply(tmp_path / "c.ply", means, quats, scales, opacities, torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match="colours"):
        save_ply(tmp_path / "c.ply", means, quats, scales, opacities, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="scales"):
        save_ply(tmp_path / "c.ply", means, quats, -scales, opacities, torch.zeros(4, 3))
