"""Tests for geco.render.splat: the torch rasterizer against a brute-force reference of gsplat's
rules, gradients, conventions, and (on a GPU) against gsplat's CUDA rasterizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geco.render import splat
from geco.render.splat import SH_C0, eval_sh, project_gaussians, rasterize

# --------------------------------------------------------------------------- scenes


def look_at_w2c(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0), dtype=torch.float64):
    """World-to-camera OpenCV matrix (x right, y down, z forward) of a camera at ``eye``."""
    eye, target, up = (torch.tensor(v, dtype=dtype) for v in (eye, target, up))
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, up)
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    R = torch.stack([right, down, forward])
    w2c = torch.eye(4, dtype=dtype)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    return w2c


def intrinsics(f, width, height, dtype=torch.float64):
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def random_scene(n=20, seed=0, dtype=torch.float64, width=16, height=12):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g, dtype=dtype) - 0.5
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = 0.05 + 0.15 * torch.rand(n, 3, generator=g, dtype=dtype)
    opacities = 0.2 + 0.75 * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    # a few opaque splats stacked on the view axis of camera 0: the 1e-4 stop rule triggers
    means[:6] = torch.tensor([[0.05 * i, 0.02 * i, 0.0] for i in range(6)], dtype=dtype)
    opacities[:6] = 0.995
    scales[:6] = 0.25
    # one splat behind camera 1 (culled: z < near)
    means[4] = torch.tensor([0.0, 3.5, 0.3], dtype=dtype)
    viewmats = torch.stack([look_at_w2c((2.5, 0.0, 0.0), dtype=dtype), look_at_w2c((0.0, 2.5, 0.8), dtype=dtype)])
    Ks = torch.stack([intrinsics(14.0, width, height, dtype), intrinsics(18.0, width, height, dtype)])
    return means, quats, scales, opacities, colors, viewmats, Ks, width, height


# --------------------------------------------------------------------------- reference


def reference_render(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                     near=0.01, far=1e10, eps2d=0.3, backgrounds=None):  # fmt: skip
    """gsplat's rules, written out per Gaussian and per pixel (numpy float64, no tiles)."""
    means, quats, scales, opacities, colors, viewmats, Ks = (
        t.detach().double().numpy() for t in (means, quats, scales, opacities, colors, viewmats, Ks)
    )
    C = len(viewmats)
    out_c = np.zeros((C, height, width, colors.shape[-1]))
    out_a = np.zeros((C, height, width, 1))
    px, py = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    for cam in range(C):
        Rc, t = viewmats[cam, :3, :3], viewmats[cam, :3, 3]
        fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
        splats = []
        for i in range(len(means)):
            w, x, y, z = quats[i] / np.linalg.norm(quats[i])
            R = np.array([
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ])  # fmt: skip
            cov = R @ np.diag(scales[i] ** 2) @ R.T
            mc = Rc @ means[i] + t
            if mc[2] < near or mc[2] > far:
                continue
            covc = Rc @ cov @ Rc.T
            lim_x = (cx / fx + 0.15 * width / fx, (width - cx) / fx + 0.15 * width / fx)
            lim_y = (cy / fy + 0.15 * height / fy, (height - cy) / fy + 0.15 * height / fy)
            tx = mc[2] * min(max(mc[0] / mc[2], -lim_x[0]), lim_x[1])
            ty = mc[2] * min(max(mc[1] / mc[2], -lim_y[0]), lim_y[1])
            J = np.array([
                [fx / mc[2], 0.0, -fx * tx / mc[2] ** 2],
                [0.0, fy / mc[2], -fy * ty / mc[2] ** 2],
            ])  # fmt: skip
            cov2 = J @ covc @ J.T + eps2d * np.eye(2)
            if np.linalg.det(cov2) <= 0:
                continue
            conic = np.linalg.inv(cov2)
            m2 = np.array([fx * mc[0] / mc[2] + cx, fy * mc[1] / mc[2] + cy])
            splats.append((mc[2], i, m2, conic))
        splats.sort(key=lambda s: (s[0], s[1]))  # front to back, ties by index
        T = np.ones((height, width))
        done = np.zeros((height, width), bool)
        acc = np.zeros((height, width, colors.shape[-1]))
        for _, i, m2, conic in splats:
            dx, dy = px - m2[0], py - m2[1]
            sigma = 0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) + conic[0, 1] * dx * dy
            alpha = np.minimum(0.999, opacities[i] * np.exp(-sigma))
            use = ~done & (sigma >= 0) & (alpha >= 1.0 / 255.0)
            next_T = T * (1.0 - alpha)
            stop = use & (next_T <= 1e-4)
            done |= stop
            use &= ~stop
            acc += np.where(use[..., None], (alpha * T)[..., None] * colors[i], 0.0)
            T = np.where(use, next_T, T)
        bg = 0.0 if backgrounds is None else backgrounds[cam].detach().double().numpy()
        out_c[cam] = acc + T[..., None] * bg
        out_a[cam, ..., 0] = 1.0 - T
    return torch.from_numpy(out_c), torch.from_numpy(out_a)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_brute_force_reference(dtype):
    scene = random_scene(dtype=dtype)
    bg = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]], dtype=dtype)
    colors, alphas, meta = rasterize(*scene, backgrounds=bg)
    ref_c, ref_a = reference_render(*scene, backgrounds=bg)
    assert colors.shape == (2, 12, 16, 3) and alphas.shape == (2, 12, 16, 1)
    torch.testing.assert_close(colors.double(), ref_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(alphas.double(), ref_a, atol=1e-5, rtol=0)
    # the scene has deep stacks (the stop rule applies), partial coverage and culling
    assert (ref_a > 0.999).any() and ((ref_a > 0.01) & (ref_a < 0.5)).any()
    assert meta["radii"].shape == (2, 20, 2) and meta["radii"].dtype == torch.int32
    assert (meta["radii"][1, 4] == 0).all()  # behind camera 1
    assert meta["means2d"].shape == (2, 20, 2) and meta["depths"].shape == (2, 20)


def test_matches_reference_on_many_overlapping_splats():
    """Tiles with long lists (several compositing blocks, early stop) still follow the rules."""
    means, quats, scales, opacities, colors, viewmats, Ks, _, _ = random_scene(n=300, seed=3)
    scales = scales * 0.5
    scene = (means, quats, scales, opacities, colors, viewmats, Ks, 20, 20)
    out_c, out_a, _ = rasterize(*scene)
    ref_c, ref_a = reference_render(*scene)
    torch.testing.assert_close(out_c, ref_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_a, ref_a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tile, block", [(4, 2), (16, 3), (8, 64)])
def test_output_does_not_depend_on_tiling(monkeypatch, tile, block):
    """Tile edge and compositing block length are implementation details (blocks carry T and
    the stop state across, as a single front-to-back pass would)."""
    scene = random_scene(n=60, seed=2, width=20, height=20)
    ref_c, ref_a = reference_render(*scene)
    monkeypatch.setattr(splat, "CPU_TILE_SIZES", ((math.inf, tile),))
    monkeypatch.setattr(splat, "CPU_K_BLOCK", block)
    out_c, out_a, meta = rasterize(*scene)
    assert meta["tile_size"] == tile
    torch.testing.assert_close(out_c, ref_c, atol=1e-10, rtol=0)
    torch.testing.assert_close(out_a, ref_a, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_a_batch_of_scenes_renders_each_scene_as_alone(dtype, atol):
    """gsplat's leading batch dims: scene b seen by its own cameras, as if rendered by itself
    (images, meta, gradients); per-camera and SH colours; nested batch dims."""
    scenes = [random_scene(n=40, seed=s, dtype=dtype, width=20, height=20) for s in (7, 8, 9)]
    for scene in scenes[1:]:  # each scene its own cameras
        scene[5][:] = scene[5] @ look_at_w2c((0.3, -0.2, 0.1), (0.0, 0.0, 1.0), dtype=dtype)
    W, H = 20, 20
    bgs = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    sh = torch.randn(3, 40, 4, 3, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.3
    leaves = [torch.stack([s[i] for s in scenes]).requires_grad_() for i in range(5)]
    cams = [torch.stack([s[i] for s in scenes]) for i in (5, 6)]
    for colors, kw in ((leaves[4], {}), (sh, {"sh_degree": 1}), (leaves[4][:, None].expand(3, 2, 40, 3), {})):
        out, alpha, meta = rasterize(*leaves[:4], colors, *cams, W, H, backgrounds=bgs, render_mode="RGB+ED", **kw)
        assert out.shape == (3, 2, H, W, 4) and alpha.shape == (3, 2, H, W, 1)
        assert meta["radii"].shape == (3, 2, 40, 2) and meta["n_batches"] == 3
        (out.square().sum() + alpha.sum()).backward()
        batch_grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None  # the per-scene renders' gradients accumulate afresh
        for b in range(3):
            one = [t[b] for t in leaves]
            o, a, m = rasterize(*one[:4], colors[b], *(c[b] for c in cams), W, H, backgrounds=bgs[b],
                                render_mode="RGB+ED", **kw)  # fmt: skip
            torch.testing.assert_close(out[b], o, atol=atol, rtol=0)
            torch.testing.assert_close(alpha[b], a, atol=atol, rtol=0)
            assert torch.equal(meta["radii"][b], m["radii"])
            (o.square().sum() + a.sum()).backward()
        for g, expect in zip(batch_grads, (t.grad for t in leaves)):
            torch.testing.assert_close(g, expect, atol=atol * 100, rtol=atol)  # (None where SH colours)
        for t in leaves:
            t.grad = None
    nested = rasterize(*(t.detach().reshape(3, 1, *t.shape[1:]) for t in leaves),
                       *(c.reshape(3, 1, *c.shape[1:]) for c in cams), W, H)[0]  # fmt: skip
    flat = rasterize(*(t.detach() for t in leaves), *cams, W, H)[0]
    assert nested.shape == (3, 1, 2, H, W, 3) and torch.equal(nested[:, 0], flat)
    with pytest.raises(ValueError, match="viewmats must have shape"):
        rasterize(*(t.detach() for t in leaves), cams[0][0], cams[1][0], W, H)


def wall_scene():
    """A thick opaque wall on the left (every pixel of its tiles stops after a few splats) and
    faint splats on the right (those tiles run to the end of their lists)."""
    W, H, n_wall, n_faint = 16, 8, 10, 12
    f64 = dict(dtype=torch.float64)
    viewmats = torch.eye(4, **f64)[None]
    Ks = intrinsics(20.0, W, H)[None]
    wall = torch.tensor([[-0.2, 0.0, 1.0 + 0.05 * i] for i in range(n_wall)], **f64)
    faint = torch.stack([torch.linspace(0.05, 0.3, n_faint, **f64), torch.zeros(n_faint, **f64),
                         1.0 + 0.05 * torch.arange(n_faint, **f64)], dim=1)  # fmt: skip
    means = torch.cat([wall, faint])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], **f64).repeat(n_wall + n_faint, 1)
    scales = torch.cat([torch.full((n_wall, 3), 0.3, **f64), torch.full((n_faint, 3), 0.05, **f64)])
    opacities = torch.cat([torch.full((n_wall,), 0.99, **f64), torch.full((n_faint,), 0.2, **f64)])
    colors = torch.rand(n_wall + n_faint, 3, generator=torch.Generator().manual_seed(0), **f64)
    return means, quats, scales, opacities, colors, viewmats, Ks, W, H


def test_tiles_whose_pixels_all_stopped_leave_their_chunk(monkeypatch):
    """Work saved on stopped tiles changes nothing: the image is the reference's and the
    gradients are those of one block per list (where no tile can leave early)."""
    monkeypatch.setattr(splat, "CPU_TILE_SIZES", ((math.inf, 4),))
    scene = list(wall_scene())

    def render_and_grads(block):
        monkeypatch.setattr(splat, "CPU_K_BLOCK", block)
        leaves = [t.clone().requires_grad_() for t in scene[:5]]
        out, alpha, _ = rasterize(*leaves, *scene[5:])
        (out.square().sum() + alpha.sum()).backward()
        return out.detach(), alpha.detach(), [t.grad for t in leaves]

    blocks = splat._blocks
    tiles_per_block = []

    def spy(bins, packed):
        for item in blocks(bins, packed):
            tiles_per_block.append(len(item[0]))
            yield item

    monkeypatch.setattr(splat, "_blocks", spy)
    out, alpha, grads = render_and_grads(2)
    assert tiles_per_block[0] > tiles_per_block[-1] > 0  # the wall's tiles left early
    ref_c, ref_a = reference_render(*scene)
    torch.testing.assert_close(out, ref_c, atol=1e-10, rtol=0)
    torch.testing.assert_close(alpha, ref_a, atol=1e-10, rtol=0)
    _, _, one_block = render_and_grads(64)
    for g, expect in zip(grads, one_block):
        torch.testing.assert_close(g, expect, atol=1e-10, rtol=1e-10)


def stop_rule_scene():
    """Five splats on one pixel's ray, each with alpha 0.95 at that pixel."""
    W, H = 9, 7
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = torch.tensor([[[20.0, 0, 4.5], [0, 20.0, 3.5], [0, 0, 1]]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0, 1.0 + 0.1 * i] for i in range(5)], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 5, dtype=torch.float64)
    scales = torch.full((5, 3), 0.02, dtype=torch.float64)
    opacities = torch.full((5,), 0.95, dtype=torch.float64)
    colors = torch.tensor(
        [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )
    return means, quats, scales, opacities, colors, viewmats, Ks, W, H


def test_stop_rule_excludes_the_gaussian_that_crosses_1e4():
    """alpha 0.95 on one ray: T = 0.05, 0.0025, 1.25e-4, then 6.25e-6 <= 1e-4, so the pixel
    stops before the fourth splat; the fourth and fifth add nothing."""
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = stop_rule_scene()
    out, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    T = [1.0, 0.05, 0.0025]
    expect = sum(0.95 * T[i] * colors[i] for i in range(3))
    torch.testing.assert_close(out[0, 3, 4], expect)
    torch.testing.assert_close(alpha[0, 3, 4, 0], torch.tensor(1 - 0.05**3, dtype=torch.float64))
    ref_c, ref_a = reference_render(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    torch.testing.assert_close(out, ref_c, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha, ref_a, atol=1e-12, rtol=0)


def test_projection_matches_gsplat_torch_reference():
    """means2d, conics and depths agree with gsplat's own pure-torch projection."""
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    means, quats, scales, opacities, _, viewmats, Ks, W, H = random_scene()
    ours = project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H)
    covars, _ = impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, m2d, depths, conics, _ = impl._fully_fused_projection(means, covars, viewmats, Ks, W, H)
    v = ours["valid"]
    torch.testing.assert_close(ours["means2d"][v], m2d[v])
    torch.testing.assert_close(ours["conics"][v], conics[v])
    torch.testing.assert_close(ours["depths"], depths)


def test_radius_is_opacity_aware_bound():
    means, quats, scales, opacities, _, viewmats, Ks, W, H = random_scene()
    p = project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H)
    a, b, c = p["conics"].unbind(-1)
    det = a * c - b * b  # the blurred covariance is the conic's inverse
    var_x, var_y = c / det, a / det
    extent = torch.clamp(torch.sqrt(2 * torch.log(255 * opacities)), max=3.33)
    expect = torch.stack([torch.ceil(extent * var_x.sqrt()), torch.ceil(extent * var_y.sqrt())], -1)
    v = p["valid"]
    assert torch.equal(p["radii"][v].double(), expect[v])


def test_peak_at_projected_pixel_centre():
    """An isotropic splat renders brightest at the pixel K (w2c x) falls in (centres at +0.5)."""
    W, H = 32, 24
    viewmats = look_at_w2c((2.0, 0.5, 0.7))[None]
    Ks = torch.tensor([[[30.0, 0, 15.3], [0, 30.0, 11.8], [0, 0, 1]]], dtype=torch.float64)
    x = torch.tensor([0.1, -0.05, 0.12], dtype=torch.float64)
    cam = viewmats[0, :3, :3] @ x + viewmats[0, :3, 3]
    uv = (Ks[0] @ cam)[:2] / cam[2]
    ones = torch.ones(1, dtype=torch.float64)
    _, alphas, meta = rasterize(
        x[None], torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), torch.full((1, 3), 0.02, dtype=torch.float64),
        0.9 * ones, torch.ones(1, 3, dtype=torch.float64), viewmats, Ks, W, H,
    )  # fmt: skip
    row, col = divmod(int(alphas[0, ..., 0].argmax()), W)
    assert (col, row) == (int(math.floor(uv[0])), int(math.floor(uv[1])))
    torch.testing.assert_close(meta["means2d"][0, 0], uv)
    # the peak value is the opacity times exp(-sigma) at the distance of the pixel centre
    conic = meta["conics"][0, 0]
    d = torch.tensor([col + 0.5, row + 0.5], dtype=torch.float64) - uv
    sigma = 0.5 * (conic[0] * d[0] ** 2 + conic[2] * d[1] ** 2) + conic[1] * d[0] * d[1]
    torch.testing.assert_close(alphas[0, row, col, 0], 0.9 * torch.exp(-sigma))


def test_empty_scene_gives_background_and_zero_alpha():
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = random_scene()
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]], dtype=torch.float64)
    out_c, out_a, _ = rasterize(means[:0], quats[:0], scales[:0], opacities[:0], colors[:0], viewmats, Ks, W, H,
                                backgrounds=bg)  # fmt: skip
    assert torch.equal(out_a, torch.zeros(2, H, W, 1, dtype=torch.float64))
    assert torch.equal(out_c, bg[:, None, None, :].expand(2, H, W, 3))
    # everything behind the camera: same result
    out_c, out_a, _ = rasterize(-10 * viewmats[0, 2, :3][None].expand(20, 3) + means * 0.01, quats, scales,
                                opacities, colors, viewmats[:1], Ks[:1], W, H, backgrounds=bg[:1])  # fmt: skip
    assert torch.equal(out_a, torch.zeros(1, H, W, 1, dtype=torch.float64))
    assert torch.equal(out_c, bg[:1, None, None, :].expand(1, H, W, 3))


def test_sh_degree_zero_colour():
    means, quats, scales, opacities, _, viewmats, Ks, W, H = random_scene()
    sh = torch.randn(20, 1, 3, dtype=torch.float64)
    rgb = torch.clamp_min(sh[:, 0] * SH_C0 + 0.5, 0.0)
    assert (rgb == 0).any()  # the clamp matters in this scene
    out_sh, a_sh, _ = rasterize(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=0)
    out_rgb, a_rgb, _ = rasterize(means, quats, scales, opacities, rgb, viewmats, Ks, W, H)
    torch.testing.assert_close(out_sh, out_rgb)
    torch.testing.assert_close(a_sh, a_rgb)


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_sh_basis_matches_gsplat(degree):
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(50, 25, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(degree, dirs, coeffs), impl._spherical_harmonics(degree, dirs, coeffs))


def test_sh_view_dependence_uses_camera_centre():
    """Degree 1: colour = max(SH(dir) + 0.5, 0) with dir = mean - camera centre."""
    means, quats, scales, opacities, _, viewmats, Ks, W, H = random_scene()
    sh = 0.3 * torch.randn(20, 4, 3, dtype=torch.float64)
    out, _, _ = rasterize(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1)
    centre = torch.linalg.inv(viewmats)[:, :3, 3]
    for cam in range(2):
        rgb = torch.clamp_min(eval_sh(1, means - centre[cam], sh) + 0.5, 0)
        expect, _, _ = rasterize(means, quats, scales, opacities, rgb, viewmats[cam : cam + 1], Ks[cam : cam + 1], W, H)
        torch.testing.assert_close(out[cam : cam + 1], expect)


def test_depth_modes():
    scene = random_scene()
    rgb, alpha, meta = rasterize(*scene)
    rgbd, alpha_d, _ = rasterize(*scene, render_mode="RGB+D")
    rgbed, _, _ = rasterize(*scene, render_mode="RGB+ED")
    ed, _, _ = rasterize(*scene, render_mode="ED")
    torch.testing.assert_close(rgbd[..., :3], rgb)
    torch.testing.assert_close(alpha_d, alpha)
    torch.testing.assert_close(rgbed[..., 3:], rgbd[..., 3:] / alpha.clamp(min=1e-10))
    torch.testing.assert_close(ed, rgbed[..., 3:])
    covered = alpha[..., 0] > 0.5
    depths = meta["depths"][meta["radii"][..., 0] > 0]
    assert ((ed[..., 0][covered] >= depths.min() - 1e-9) & (ed[..., 0][covered] <= depths.max() + 1e-9)).all()


def test_antialiased_mode_scales_opacity_by_compensation():
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = random_scene()
    out, _, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, rasterize_mode="antialiased")
    plain = project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H)
    comp = meta["opacities"] / opacities
    assert ((comp > 0) & (comp < 1)).all()
    # the compensation is sqrt(det(cov2d) / det(cov2d + eps I)); recompute from the conic
    a, b, c = plain["conics"].unbind(-1)
    det_blur = 1.0 / (a * c - b * b)
    var_x, var_y, cov_xy = c * det_blur, a * det_blur, -b * det_blur
    det_orig = (var_x - 0.3) * (var_y - 0.3) - cov_xy**2
    torch.testing.assert_close(comp, torch.sqrt(det_orig / det_blur))
    assert out.shape == (2, H, W, 3)


def test_covars_and_radius_clip():
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = random_scene()
    out, alpha, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    covars = splat._quat_scale_to_covar(quats, scales)  # R S S^T R^T, checked by the reference tests
    out_cov, alpha_cov, _ = rasterize(means, None, None, opacities, colors, viewmats, Ks, W, H, covars=covars)
    torch.testing.assert_close(out_cov, out)
    torch.testing.assert_close(alpha_cov, alpha)
    # radius_clip culls splats whose radii are both <= the clip
    clip = float(meta["radii"].max())
    _, alpha_clip, meta_clip = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, radius_clip=clip)
    assert (meta_clip["radii"] == 0).all() and (alpha_clip == 0).all()


@pytest.mark.parametrize(
    "option",
    [
        {"packed": True},
        {"sparse_grad": True},
        {"absgrad": True},
        {"distributed": True},
        {"camera_model": "fisheye"},
        {"with_ut": True},
        {"with_eval3d": True},
        {"radial_coeffs": torch.zeros(2, 6)},
        {"rolling_shutter": "ROLLING_TOP_TO_BOTTOM"},
    ],
)
def test_unsupported_options_raise(option):
    name = next(iter(option))
    with pytest.raises(NotImplementedError, match=name):
        rasterize(*random_scene(n=8), **option)


def test_unknown_keyword_and_bad_mode_raise():
    with pytest.raises(TypeError, match="no_such_option"):
        rasterize(*random_scene(n=8), no_such_option=1)
    with pytest.raises(ValueError, match="render_mode"):
        rasterize(*random_scene(n=8), render_mode="RGBA")


# --------------------------------------------------------------------------- gradients


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    n, W, H = 4, 8, 6
    means = (0.3 * (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5)).requires_grad_()
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64).requires_grad_()
    scales = (0.1 + 0.1 * torch.rand(n, 3, generator=g, dtype=torch.float64)).requires_grad_()
    opacities = (0.3 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64).requires_grad_()
    viewmats = torch.stack([look_at_w2c((2.0, 0.3, 0.4)), look_at_w2c((-0.3, 2.0, -0.5))])
    Ks = intrinsics(10.0, W, H).expand(2, 3, 3)
    bg = torch.tensor([[0.3, 0.5, 0.7], [0.0, 0.1, 0.2]], dtype=torch.float64)

    def render(m, q, s, o, c):
        out, alpha, _ = rasterize(m, q, s, o, c, viewmats, Ks, W, H, backgrounds=bg, render_mode="RGB+ED")
        return out, alpha

    assert torch.autograd.gradcheck(render, (means, quats, scales, opacities, colors), eps=1e-6, atol=1e-6)


def test_gradcheck_sh_colours():
    g = torch.Generator().manual_seed(11)
    n, W, H = 3, 6, 5
    means = (0.3 * (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5)).requires_grad_()
    sh = (0.3 * torch.randn(n, 4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = 0.1 + 0.1 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    opacities = 0.3 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    viewmats = look_at_w2c((2.0, 0.3, 0.4))[None]
    Ks = intrinsics(8.0, W, H)[None]

    def render(m, c):
        return rasterize(m, quats, scales, opacities, c, viewmats, Ks, W, H, sh_degree=1)[0]

    assert torch.autograd.gradcheck(render, (means, sh), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [64, 2])
def test_gradcheck_through_the_stop_rule(monkeypatch, block):
    """Gradients with a stopped pixel, also when the stop falls in a later compositing block."""
    monkeypatch.setattr(splat, "CPU_K_BLOCK", block)
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = stop_rule_scene()
    means = means + torch.tensor([0.01, -0.005, 0.0], dtype=torch.float64)  # off the peak
    inputs = [t.clone().requires_grad_() for t in (means, scales, opacities, colors)]

    def render(m, s, o, c):
        out, alpha, _ = rasterize(m, quats, s, o, c, viewmats, Ks, W, H)
        return out, alpha

    alpha = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)[1]
    assert 0.999 < alpha.max() < 0.9995  # the stop applies after three (five would give ~1 - 6e-6)
    assert torch.autograd.gradcheck(render, tuple(inputs), eps=1e-7, atol=1e-6)


def test_gradients_reach_every_visible_gaussian():
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = random_scene(dtype=torch.float32)
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
    out, alpha, meta = rasterize(*params, viewmats.float(), Ks.float(), W, H)
    meta["means2d"].retain_grad()
    target = torch.rand(out.shape, generator=torch.Generator().manual_seed(0))
    ((out - target) ** 2).sum().add(alpha.sum()).backward()
    drawn = torch.zeros(20, dtype=torch.bool)
    ref_without = reference_render(means, quats, scales, opacities, colors, viewmats, Ks, W, H)[1]
    for i in range(20):  # a Gaussian is drawn if removing it changes the render
        keep = torch.arange(20) != i
        sub = reference_render(means[keep], quats[keep], scales[keep], opacities[keep], colors[keep],
                               viewmats, Ks, W, H)[1]  # fmt: skip
        drawn[i] = (sub - ref_without).abs().max() > 1e-6
    assert drawn.sum() >= 10
    # rotating an isotropic Gaussian (random_scene's first six) changes nothing: its quaternion's
    # gradient is 0 up to float rounding, never a test of being reached
    isotropic = (scales.amax(dim=1) - scales.amin(dim=1)) < 1e-9
    assert 0 < (drawn & isotropic).sum() < drawn.sum()
    for name, p in zip(("means", "quats", "scales", "opacities", "colors"), params):
        assert torch.isfinite(p.grad).all()
        flat = p.grad.reshape(20, -1)
        reached = drawn & ~isotropic if name == "quats" else drawn
        assert (flat[reached].abs().sum(dim=1) > 0).all(), name
        assert (flat[~drawn] == 0).all(), name
    assert (params[1].grad[drawn & isotropic].abs() < 1e-5).all()
    assert meta["means2d"].grad is not None and meta["means2d"].grad.abs().sum() > 0


# --------------------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares against gsplat's CUDA rasterizer")
def test_cuda_matches_torch_path():
    import gsplat

    scene = list(random_scene(n=200, seed=5, dtype=torch.float32, width=64, height=48))
    scene[2] = scene[2] * 0.3
    bg = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    ours_c, ours_a, ours_meta = rasterize(*scene, backgrounds=bg, render_mode="RGB+ED")
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in scene]
    ref_c, ref_a, ref_meta = gsplat.rasterization(*dev, backgrounds=bg.cuda(), render_mode="RGB+ED", packed=False)
    torch.testing.assert_close(ours_c, ref_c.cpu(), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours_a, ref_a.cpu(), atol=1e-3, rtol=0)
    # radii agree up to the odd ceil() flip from CUDA's fast-math log/sqrt
    radius_diff = (ours_meta["radii"] - ref_meta["radii"].cpu()).abs()
    assert radius_diff.max() <= 1 and (radius_diff > 0).float().mean() < 0.01
    # our rasterize forwards CUDA tensors to gsplat
    via_c, via_a, _ = rasterize(*dev, backgrounds=bg.cuda(), render_mode="RGB+ED")
    torch.testing.assert_close(via_c, ref_c)
    # a batch of scenes (leading batch dims) on both paths
    other = list(random_scene(n=200, seed=6, dtype=torch.float32, width=64, height=48))
    other[2] = other[2] * 0.3
    batch = [torch.stack([a, b]) for a, b in zip(scene[:7], other[:7])] + scene[7:]
    ours_c, ours_a, _ = rasterize(*batch, backgrounds=torch.stack([bg, bg]), render_mode="RGB+ED")
    ref_c, ref_a, _ = rasterize(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in batch),
                                backgrounds=torch.stack([bg, bg]).cuda(), render_mode="RGB+ED")  # fmt: skip
    torch.testing.assert_close(ours_c, ref_c.cpu(), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours_a, ref_a.cpu(), atol=1e-3, rtol=0)
