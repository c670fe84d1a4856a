"""LGM-style reconstructor: LGM's state-dict layout, weights I/O, activations, frames, gradients.

References re-derived from 3DTopia/LGM (core/unet.py, core/models.py, core/utils.py get_rays,
core/provider_objaverse.py), kiui.cam.orbit_camera / look_at, and GECO's infer.py (six Zero123++
views, poses canonicalised on view 0).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geco.cameras import Camera, intrinsics_from_fov
from geco.config import LGMConfig, ReconstructorConfig
from geco.gaussians import Gaussians, quat_to_matrix
from geco.models.reconstructors import build_reconstructor, load_reconstructor, save_reconstructor
from geco.models.reconstructors import input_cameras as zero123_input_cameras
from geco.models.reconstructors.base import ReconstructorLoadError
from geco.models.reconstructors.lgm import (
    OURS_TO_LGM,
    gaussians_from_lgm_frame,
    reconstruction_loss,
    to_lgm_frame,
)
from geco.render.splat import render_gaussians

TINY = dict(
    input_size=16,
    down_channels=(8, 16, 32),
    down_attention=(False, False, True),
    up_channels=(32, 16),
    up_attention=(True, False),
    num_heads=2,
    norm_groups=4,
)


def tiny_cfg(**kw) -> ReconstructorConfig:
    """TINY updated by ``kw``; LGM's architecture fields go into the ``lgm`` section."""
    d = {**TINY, **kw}
    lgm = {k: d.pop(k) for k in list(d) if k in LGMConfig.model_fields}
    return ReconstructorConfig(**d, lgm=LGMConfig(**lgm))


def orbit_views(azimuths, elevations, cfg, size=None):
    size = size or cfg.input_size
    cams = [Camera("random", size, size, cfg.fovy_deg, cfg.radius, a, e) for a, e in zip(azimuths, elevations)]
    K = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)
    c2w = torch.tensor(np.stack([c.c2w_opencv for c in cams]), dtype=torch.float32)
    return K, c2w


# ----------------------------------------------------------------------------- LGM references


def kiui_orbit_camera(elevation, azimuth, radius):
    """kiui.cam.orbit_camera (OpenGL, y up; elevation negative = above; azimuth 0 on +z)."""
    el, az = math.radians(elevation), math.radians(azimuth)
    pos = np.array([radius * math.cos(el) * math.sin(az), -radius * math.sin(el), radius * math.cos(el) * math.cos(az)])
    forward = pos / np.linalg.norm(pos)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    up /= np.linalg.norm(up)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, up, forward, pos
    return T


def lgm_plucker(pose_gl, size, fovy):
    """LGM core/utils.get_rays (opengl=True) + Plücker (o x d, d) -> [6, size, size]."""
    pose = torch.as_tensor(pose_gl, dtype=torch.float64)
    x, y = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="xy"
    )
    focal = size * 0.5 / math.tan(0.5 * math.radians(fovy))
    dirs = torch.stack([(x - size * 0.5 + 0.5) / focal, -(y - size * 0.5 + 0.5) / focal, -torch.ones_like(x)], -1)
    d = F.normalize(dirs.reshape(-1, 3) @ pose[:3, :3].T, dim=-1)
    o = pose[:3, 3].expand_as(d)
    return torch.cat([torch.cross(o, d, dim=-1), d], -1).reshape(size, size, 6).permute(2, 0, 1)


def lgm_canonicalise(poses, radius):
    """LGM/GECO: transform = T(0,0,r) @ inverse(poses[0]); poses = transform @ poses."""
    T = np.eye(4)
    T[2, 3] = radius
    transform = T @ np.linalg.inv(poses[0])
    return [transform @ p for p in poses]


# ----------------------------------------------------------------------------- state dict layout

LGM_KEY_PATTERNS = [
    r"unet\.conv_in\.(weight|bias)",
    r"unet\.down_blocks\.\d+\.nets\.\d+\.(norm1|conv1|norm2|conv2|shortcut)\.(weight|bias)",
    r"unet\.down_blocks\.\d+\.attns\.\d+\.norm\.(weight|bias)",
    r"unet\.down_blocks\.\d+\.attns\.\d+\.attn\.qkv\.weight",
    r"unet\.down_blocks\.\d+\.attns\.\d+\.attn\.proj\.(weight|bias)",
    r"unet\.down_blocks\.\d+\.downsample\.(weight|bias)",
    r"unet\.mid_block\.nets\.[01]\.(norm1|conv1|norm2|conv2)\.(weight|bias)",
    r"unet\.mid_block\.attns\.0\.(norm\.(weight|bias)|attn\.qkv\.weight|attn\.proj\.(weight|bias))",
    r"unet\.up_blocks\.\d+\.nets\.[012]\.(norm1|conv1|norm2|conv2|shortcut)\.(weight|bias)",
    r"unet\.up_blocks\.\d+\.attns\.[012]\.(norm\.(weight|bias)|attn\.qkv\.weight|attn\.proj\.(weight|bias))",
    r"unet\.up_blocks\.\d+\.upsample\.(weight|bias)",
    r"unet\.(norm_out|conv_out)\.(weight|bias)",
    r"conv\.(weight|bias)",
]


@pytest.fixture(scope="module")
def big_meta_model():
    with torch.device("meta"):
        return build_reconstructor(ReconstructorConfig())


def test_big_config_matches_lgm_state_dict_names(big_meta_model):
    sd = big_meta_model.state_dict()
    bad = [k for k in sd if not any(re.fullmatch(p, k) for p in LGM_KEY_PATTERNS)]
    assert not bad, bad
    assert {k.split(".")[0] for k in sd} == {"unet", "conv"}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["unet.conv_in.weight"] == (64, 9, 3, 3)
    assert shapes["conv.weight"] == (14, 14, 1, 1)
    assert shapes["unet.conv_out.weight"] == (14, 128, 3, 3)
    assert shapes["unet.mid_block.attns.0.attn.qkv.weight"] == (3072, 1024)
    assert "unet.mid_block.attns.0.attn.qkv.bias" not in sd  # qkv without bias
    assert shapes["unet.mid_block.attns.0.attn.proj.bias"] == (1024,)
    # shortcuts only where the width changes: not in down block 0 (64->64) nor 5 (1024->1024) nor mid
    assert "unet.down_blocks.0.nets.0.shortcut.weight" not in sd
    assert "unet.down_blocks.5.nets.0.shortcut.weight" not in sd
    assert shapes["unet.down_blocks.1.nets.0.shortcut.weight"] == (128, 64, 1, 1)
    assert "unet.down_blocks.1.nets.1.shortcut.weight" not in sd
    assert not any(k.startswith("unet.mid_block.nets") and "shortcut" in k for k in sd)
    # up blocks: 3 ResNets on [x, skip]: every one changes width (e.g. 1024 + 1024 -> 1024; the last 1024 + 1024 skip)
    assert shapes["unet.up_blocks.0.nets.0.conv1.weight"] == (1024, 2048, 3, 3)
    assert shapes["unet.up_blocks.2.nets.2.conv1.weight"] == (512, 512 + 256, 3, 3)
    assert shapes["unet.up_blocks.4.nets.2.conv1.weight"] == (128, 128 + 64, 3, 3)
    # attention levels: down 3,4,5; up 0,1,2; every ResNet slot of those blocks
    for i in range(6):
        assert ("unet.down_blocks.%d.attns.1.norm.weight" % i in sd) == (i >= 3)
    for i in range(5):
        assert ("unet.up_blocks.%d.attns.2.norm.weight" % i in sd) == (i <= 2)
    # resampling: every down block but the last, every up block but the last
    assert [f"unet.down_blocks.{i}.downsample.weight" in sd for i in range(6)] == [True] * 5 + [False]
    assert [f"unet.up_blocks.{i}.upsample.weight" in sd for i in range(5)] == [True] * 4 + [False]
    assert shapes["unet.down_blocks.0.downsample.weight"] == (64, 64, 3, 3)
    n = sum(p.numel() for p in big_meta_model.parameters())
    print(f"LGM big reconstructor: {n:,} parameters")
    assert 410e6 < n < 420e6  # LGM's released big model: ~415 M
    assert big_meta_model.output_size == 128 and big_meta_model.num_gaussians(4) == 65536


def test_architecture_validation():
    with pytest.raises(ValueError, match=r"up_channels\[1\]=8 must equal down_channels\[-2\]=16"):
        build_reconstructor(tiny_cfg(up_channels=(32, 8)))
    with pytest.raises(ValueError, match="norm_groups"):
        build_reconstructor(tiny_cfg(norm_groups=32))
    with pytest.raises(ValueError, match="down_attention has 2 entries"):
        build_reconstructor(tiny_cfg(down_attention=(False, True)))
    with pytest.raises(ValueError, match="num_heads=3"):
        build_reconstructor(tiny_cfg(num_heads=3))
    with pytest.raises(ValueError, match="input_size=18"):
        build_reconstructor(tiny_cfg(input_size=18))
    with pytest.raises(ValueError, match="at most as many down blocks"):
        build_reconstructor(tiny_cfg(up_channels=(32, 16, 8, 8), up_attention=(False,) * 4))


# ----------------------------------------------------------------------------- forward


def _inputs(cfg, V=4, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, V, 3, cfg.input_size, cfg.input_size, generator=g)
    K, c2w = orbit_views([20.0 + 360.0 * k / V for k in range(V)], [15.0 * (-1) ** k for k in range(V)], cfg)
    return images, K, c2w


def test_forward_shapes_ranges_and_view_counts():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_reconstructor(cfg)
    with torch.no_grad():  # push the raw outputs into saturation to exercise the activations
        model.conv.weight.mul_(40.0)
        model.conv.bias.uniform_(-20, 20)
    for V in (4, 6):  # the same weights take 4 or 6 views
        images, K, c2w = _inputs(cfg, V=V)
        with torch.no_grad():
            g = model(images, K, c2w)
            raw = model.forward_raw(model.prepare_inputs(images, K, c2w)[0])
        N = V * model.output_size**2
        assert model.output_size == 8 and g.num_gaussians == N == model.num_gaussians(V)
        assert g.means.shape == (2, N, 3) and g.quats.shape == (2, N, 4) and g.scales.shape == (2, N, 3)
        assert g.opacities.shape == (2, N) and g.rgb.shape == (2, N, 3)
        assert raw[..., 0:3].abs().max() <= 1.0 and raw[..., 0:3].abs().max() == 1.0  # clamp reached
        assert g.means.norm(dim=-1).max() <= math.sqrt(3) + 1e-5  # the [-1,1]^3 box, rotated
        assert ((g.opacities >= 0) & (g.opacities <= 1)).all()
        assert (g.scales >= 0).all() and (g.scales > 0).any()
        assert ((g.rgb >= 0) & (g.rgb <= 1)).all()
        torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(2, N), atol=1e-5, rtol=0)
        assert torch.isfinite(g.means).all()


def test_views_are_exchangeable_and_attend_jointly():
    """No per-view parameters: permuting the views permutes the Gaussians (view-major order);
    multi-view attention: changing one view's image changes the Gaussians of another."""
    torch.manual_seed(1)
    cfg = tiny_cfg(pose_normalization="absolute")
    model = build_reconstructor(cfg).eval()
    images, K, c2w = _inputs(cfg, V=6, B=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    n = model.output_size**2
    with torch.no_grad():
        g = model(images, K, c2w)
        gp = model(images[:, perm], K[perm], c2w[perm])
        for name in ("means", "quats", "scales", "opacities", "rgb"):
            a = getattr(g, name).reshape(1, 6, n, -1)[:, perm]
            torch.testing.assert_close(getattr(gp, name).reshape(1, 6, n, -1), a, atol=2e-5, rtol=1e-4)
        changed = images.clone()
        changed[:, 3] = torch.rand_like(changed[:, 3])
        g2 = model(changed, K, c2w)
    assert (g2.rgb[:, :n] - g.rgb[:, :n]).abs().max() > 1e-5  # view 0 saw view 3 through attention


def test_resized_views_get_rescaled_intrinsics():
    cfg = tiny_cfg()
    model = build_reconstructor(cfg)
    images, K, c2w = _inputs(cfg, V=4, B=1)
    big = F.interpolate(images[0], scale_factor=2, mode="nearest")[None]
    K2, c2w2 = orbit_views([20.0, 110.0, 200.0, 290.0], [15.0, -15.0, 15.0, -15.0], cfg, size=2 * cfg.input_size)
    x1, W1 = model.prepare_inputs(images, K, c2w)
    x2, W2 = model.prepare_inputs(big, K2, c2w2)
    torch.testing.assert_close(x2[:, :, 3:], x1[:, :, 3:], atol=1e-5, rtol=0)  # same rays at input_size
    torch.testing.assert_close(W1, W2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(x1[:, :, :3], (images - mean) / std)  # ImageNet normalisation


def _ref_unet(sd, x, V, heads, groups):
    """A functional LGM U-Net forward read straight off a state dict, following LGM's core/unet.py
    literally (flat skip list popped per block, MVAttention's reshapes, q * head_dim^-0.5 softmax)."""
    s = math.sqrt(0.5)

    def gn(h, p):
        return F.group_norm(h, groups, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def resnet(h, p):
        y = conv(
            F.silu(gn(conv(F.silu(gn(h, p + ".norm1")), p + ".conv1", padding=1), p + ".norm2")),
            p + ".conv2",
            padding=1,
        )
        return (y + (conv(h, p + ".shortcut") if p + ".shortcut.weight" in sd else h)) * s

    def attn(h, p):
        BV, C, H, W = h.shape
        B = BV // V
        t = gn(h, p + ".norm").reshape(B, V, C, H, W).permute(0, 1, 3, 4, 2).reshape(B, -1, C)
        qkv = (t @ sd[p + ".attn.qkv.weight"].T).reshape(B, t.shape[1], 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] * (C // heads) ** -0.5) @ qkv[1].transpose(-2, -1)).softmax(-1)
        t = (a @ qkv[2]).transpose(1, 2).reshape(B, -1, C) @ sd[p + ".attn.proj.weight"].T + sd[p + ".attn.proj.bias"]
        return (t.reshape(B, V, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W) + h) * s

    def count(prefix):
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    h = conv(x, "unet.conv_in", padding=1)
    xss = [h]
    for i in range(count("unet.down_blocks.")):
        p = f"unet.down_blocks.{i}"
        for j in range(count(p + ".nets.")):
            h = resnet(h, f"{p}.nets.{j}")
            if f"{p}.attns.{j}.norm.weight" in sd:
                h = attn(h, f"{p}.attns.{j}")
            xss.append(h)
        if p + ".downsample.weight" in sd:
            h = conv(h, p + ".downsample", stride=2, padding=1)
            xss.append(h)
    h = resnet(h, "unet.mid_block.nets.0")
    if "unet.mid_block.attns.0.norm.weight" in sd:
        h = attn(h, "unet.mid_block.attns.0")
    h = resnet(h, "unet.mid_block.nets.1")
    for i in range(count("unet.up_blocks.")):
        p = f"unet.up_blocks.{i}"
        n = count(p + ".nets.")
        xs, xss = xss[-n:], xss[:-n]
        for j in range(n):
            h = resnet(torch.cat([h, xs[-1]], 1), f"{p}.nets.{j}")
            xs = xs[:-1]
            if f"{p}.attns.{j}.norm.weight" in sd:
                h = attn(h, f"{p}.attns.{j}")
        if p + ".upsample.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), p + ".upsample", padding=1)
    h = conv(F.silu(gn(h, "unet.norm_out")), "unet.conv_out", padding=1)
    return conv(h, "conv")


@pytest.mark.parametrize(
    "arch",
    [
        {},
        dict(
            down_channels=(8, 16, 32, 32),
            down_attention=(False, True, False, True),
            up_channels=(32, 32, 16),
            up_attention=(True, False, True),
            layers_per_block=1,
            mid_attention=False,
        ),
    ],
)
def test_unet_matches_functional_lgm_reference(arch):
    torch.manual_seed(7)
    cfg = tiny_cfg(**arch)
    model = build_reconstructor(cfg).eval()
    with torch.no_grad():  # make GroupNorm affines and biases non-trivial
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2 * 6, 9, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        ours = model.conv(model.unet(x, 6))
        ref = _ref_unet(model.state_dict(), x, 6, cfg.lgm.num_heads, cfg.lgm.norm_groups)
    assert ours.shape == (12, 14, model.output_size, model.output_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- weights I/O


def _fp16_exact(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_released_layout_round_trip(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(2)
    cfg = tiny_cfg()
    model = _fp16_exact(build_reconstructor(cfg)).eval()
    path = tmp_path / "model_fp16_fixrot.safetensors"
    save_reconstructor(model, str(path))
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert keys == set(model.state_dict())
    loaded = load_reconstructor(cfg.model_copy(update={"pretrained": str(path)}))
    assert loaded.dtype == torch.float32 and not loaded.training
    images, K, c2w = _inputs(cfg, V=6)
    with torch.no_grad():
        a, b = model(images, K, c2w), loaded(images, K, c2w)
    for name in ("means", "quats", "scales", "opacities", "rgb"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=0, rtol=0)


def test_fp16_file_is_cast_to_the_configured_dtype(tmp_path):
    torch.manual_seed(8)
    cfg = tiny_cfg()
    path = tmp_path / "w.safetensors"
    save_reconstructor(build_reconstructor(cfg), str(path))
    model = load_reconstructor(cfg.model_copy(update={"pretrained": str(path), "dtype": "bfloat16"}))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    images, K, c2w = _inputs(cfg, V=4, B=1)
    with torch.no_grad():
        g = model(images, K, c2w)
    assert g.means.dtype == torch.float32 and torch.isfinite(g.means).all()


def test_load_errors_name_missing_unexpected_and_mismatched_keys(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    state = {k: v.half() for k, v in build_reconstructor(cfg).state_dict().items()}
    broken = dict(state)
    broken.pop("unet.mid_block.attns.0.attn.qkv.weight")
    broken["unet.mid_block.attns.0.attn.qkv.bias"] = torch.zeros(96, dtype=torch.float16)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ReconstructorLoadError) as err:
        load_reconstructor(cfg.model_copy(update={"pretrained": str(tmp_path / "broken.safetensors")}))
    msg = str(err.value)
    assert "missing keys (1): unet.mid_block.attns.0.attn.qkv.weight" in msg
    assert "unexpected keys (1): unet.mid_block.attns.0.attn.qkv.bias" in msg
    assert "expected layout: unet.conv_in" in msg and "conv.* (2)" in msg

    save_file({"module." + k: v for k, v in state.items()}, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(ReconstructorLoadError, match=r"prefix \['module'\]"):
        load_reconstructor(cfg.model_copy(update={"pretrained": str(tmp_path / "prefixed.safetensors")}))

    other = tiny_cfg(down_channels=(16, 16, 32), up_channels=(32, 16))
    with pytest.raises(ReconstructorLoadError, match="shape mismatches"):
        load_reconstructor(other.model_copy(update={"pretrained": str(tmp_path / "broken.safetensors")}))

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_reconstructor(cfg.model_copy(update={"pretrained": str(tmp_path / "absent.safetensors")}))


@pytest.mark.s3
def test_load_from_s3(s3_bucket):
    torch.manual_seed(3)
    cfg = tiny_cfg()
    model = _fp16_exact(build_reconstructor(cfg))
    uri = f"{s3_bucket}/lgm/model_fp16_fixrot.safetensors"
    save_reconstructor(model, uri)
    loaded = load_reconstructor(cfg.model_copy(update={"pretrained": uri}))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ----------------------------------------------------------------------------- frames


def test_ours_to_lgm_is_a_rotation_that_maps_up_and_azimuth_zero():
    R = OURS_TO_LGM
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=R.dtype))
    assert torch.det(R).item() == pytest.approx(1.0)
    assert R @ torch.tensor([0.0, 0, 1], dtype=R.dtype) == pytest.approx(torch.tensor([0.0, 1, 0], dtype=R.dtype))
    # LGM's default camera (kiui elevation 0, azimuth 0, radius 1.5) sits where our convention puts
    # azimuth 0, elevation 0: on +x at the radius.
    lgm_default = torch.tensor(kiui_orbit_camera(0.0, 0.0, 1.5))
    ours = R.T @ lgm_default[:3, 3]
    np.testing.assert_allclose(ours.numpy(), Camera("random", 8, 8, 49.1, 1.5, 0.0, 0.0).position, atol=1e-12)


@pytest.mark.parametrize("az", [0.0, 30.0, 90.0, 150.0, 270.0, 333.0])
@pytest.mark.parametrize("el", [-40.0, -10.0, 0.0, 20.0, 60.0])
def test_our_orbit_cameras_are_kiui_cameras_in_lgm_frame(az, el):
    """Our (azimuth a, elevation e) OpenGL camera, re-axed, is kiui's orbit_camera(-e, a): same centre
    and the same camera axes."""
    ours = torch.tensor(Camera("random", 8, 8, 49.1, 1.5, az, el).c2w_opengl)
    R4 = torch.eye(4, dtype=torch.float64)
    R4[:3, :3] = OURS_TO_LGM
    np.testing.assert_allclose((R4 @ ours).numpy(), kiui_orbit_camera(-el, az, 1.5), atol=1e-12)


@pytest.mark.parametrize("mode", ["first_view", "absolute"])
def test_four_orthogonal_views_give_lgm_default_rays(mode):
    """Our azimuth 0/90/180/270, elevation 0 views -> exactly LGM's prepare_default_rays."""
    cfg = tiny_cfg(input_size=32, pose_normalization=mode)
    model = build_reconstructor(cfg)
    K, c2w = orbit_views([0.0, 90.0, 180.0, 270.0], [0.0] * 4, cfg)
    x, _ = model.prepare_inputs(torch.zeros(1, 4, 3, 32, 32), K, c2w)
    for v, az in enumerate([0, 90, 180, 270]):
        ref = lgm_plucker(kiui_orbit_camera(0.0, az, 1.5), 32, 49.1).float()
        torch.testing.assert_close(x[0, v, 3:], ref, atol=2e-6, rtol=0)


def test_zero123_views_give_geco_rays():
    """GECO's infer.py: Zero123++ v1.1 views (kiui elevations -30/20, azimuths 30..330), radius 1.5,
    fovy 47.1, poses canonicalised on view 0 -> our zero123_input_cameras + "first_view"."""
    cfg = tiny_cfg(input_size=32, fovy_deg=47.1, zero123_elevations=(30.0, -20.0))
    K, c2w = zero123_input_cameras(cfg, cond_azimuth=0.0)
    assert K.shape == (6, 3, 3) and c2w.shape == (6, 4, 4)
    torch.testing.assert_close(c2w[:, :3, 3].norm(dim=-1), torch.full((6,), 1.5))
    torch.testing.assert_close(K[0], torch.tensor(intrinsics_from_fov(47.1, 32, 32), dtype=torch.float32))
    model = build_reconstructor(cfg)
    x, _ = model.prepare_inputs(torch.zeros(1, 6, 3, 32, 32), K, c2w)
    poses = lgm_canonicalise([kiui_orbit_camera(e, a, 1.5) for e, a in zip([-30, 20] * 3, range(30, 360, 60))], 1.5)
    for v in range(6):
        torch.testing.assert_close(x[0, v, 3:], lgm_plucker(poses[v], 32, 47.1).float(), atol=2e-6, rtol=0)
    # the condition azimuth only rotates the world: canonicalised rays do not depend on it
    x2, _ = model.prepare_inputs(torch.zeros(1, 6, 3, 32, 32), *zero123_input_cameras(cfg, cond_azimuth=123.0))
    torch.testing.assert_close(x2, x, atol=2e-6, rtol=0)


def test_first_view_normalisation_puts_view_zero_at_lgm_canonical_pose():
    cfg = tiny_cfg()
    _, c2w = orbit_views([77.0, 137.0], [25.0, -5.0], cfg)
    c2w_lgm, W = to_lgm_frame(c2w[None].double(), "first_view", 1.5)
    first_gl = c2w_lgm[0, 0] * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    expected = torch.eye(4, dtype=torch.float64)
    expected[2, 3] = 1.5
    torch.testing.assert_close(first_gl, expected)
    torch.testing.assert_close(W[0, :3, :3] @ W[0, :3, :3].T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(W[0, :3, 3], torch.zeros(3, dtype=torch.float64))  # a pure rotation here


def test_gaussians_convert_back_consistently_with_positions():
    """Gaussians predicted in LGM's frame, rendered by the LGM-frame cameras, look the same as the
    converted Gaussians rendered by our cameras; covariances rotate with the means."""
    g = torch.Generator().manual_seed(5)
    N = 300
    means_l = (torch.rand(1, N, 3, generator=g) - 0.5) * 0.8
    quats_l = F.normalize(torch.randn(1, N, 4, generator=g), dim=-1)
    scales = 0.01 + 0.06 * torch.rand(1, N, 3, generator=g)
    scales[..., 0] *= 3  # anisotropic, so a wrong rotation shows
    opac = 0.8 * torch.ones(1, N)
    rgb = torch.rand(1, N, 3, generator=g)
    cfg = tiny_cfg()
    K, c2w = orbit_views([40.0, 130.0, 250.0], [30.0, -20.0, 10.0], cfg, size=32)
    for mode in ("first_view", "absolute"):
        c2w_lgm, W = to_lgm_frame(c2w[None].double(), mode, 1.5)
        means_o, quats_o = gaussians_from_lgm_frame(means_l, quats_l, W)
        A = W[0, :3, :3].T.float()
        cov = lambda q, s: quat_to_matrix(q) @ torch.diag_embed(s**2) @ quat_to_matrix(q).transpose(-1, -2)  # noqa: E731
        torch.testing.assert_close(cov(quats_o, scales), A @ cov(quats_l, scales) @ A.T, atol=1e-6, rtol=1e-5)
        img_l, a_l = render_gaussians(Gaussians(means_l, quats_l, scales, opac, rgb),
                                      torch.linalg.inv(c2w_lgm[0]).float(), K, 32, 32, background=0.5)  # fmt: skip
        img_o, a_o = render_gaussians(Gaussians(means_o, quats_o, scales, opac, rgb),
                                      torch.linalg.inv(c2w), K, 32, 32, background=0.5)  # fmt: skip
        assert a_l.max() > 0.5
        torch.testing.assert_close(img_o, img_l, atol=2e-4, rtol=0)
        torch.testing.assert_close(a_o, a_l, atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------- render, loss, gradients


def test_render_loss_gradient_reaches_unet():
    torch.manual_seed(6)
    cfg = tiny_cfg(background=0.5)
    model = build_reconstructor(cfg)
    images, K, c2w = _inputs(cfg, V=4, B=2)
    g = model(images, K, c2w)
    Kr, c2w_r = orbit_views([0.0, 180.0], [10.0, 10.0], cfg, size=16)
    rgb, alpha = model.render(g, torch.linalg.inv(c2w_r), Kr, 16, 16)
    assert rgb.shape == (2, 2, 3, 16, 16) and alpha.shape == (2, 2, 1, 16, 16)
    assert alpha.max() > 0.1
    target = torch.rand_like(rgb)
    calls = []

    def fake_lpips(p, t):
        calls.append((p.shape, float(p.detach().min()), float(p.detach().max())))
        return (p - t).abs().mean(dim=(1, 2, 3))

    out = model.loss(rgb, alpha, target, torch.ones_like(alpha), lpips=fake_lpips)
    assert set(out) == {"loss", "mse_rgb", "mse_alpha", "psnr", "lpips"}
    torch.testing.assert_close(out["loss"], out["mse_rgb"] + out["mse_alpha"] + 1.0 * out["lpips"])
    assert calls[0][0] == (4, 3, 16, 16) and -1.0 <= calls[0][1] and calls[0][2] <= 1.0
    out["loss"].backward()
    for name in (
        "unet.conv_in.weight",
        "unet.down_blocks.2.attns.0.attn.qkv.weight",
        "unet.conv_out.weight",
        "conv.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    no_lpips = reconstruction_loss(
        rgb.detach(), alpha.detach(), target, torch.ones_like(alpha), lpips=fake_lpips, lambda_lpips=0.0
    )
    assert "lpips" not in no_lpips and len(calls) == 1


def test_registry_dispatches_on_kind():
    from types import SimpleNamespace

    from geco.models.reconstructors import KINDS, Reconstructor, input_cameras

    assert set(KINDS) == {"lgm"}
    model = build_reconstructor(tiny_cfg())
    assert isinstance(model, Reconstructor) and model.input_size == 16
    K, c2w = input_cameras(tiny_cfg())
    assert K.shape == (6, 3, 3) and c2w.shape == (6, 4, 4)
    with pytest.raises(ValueError, match="models.reconstructor.kind='mesh': no such reconstructor"):
        build_reconstructor(SimpleNamespace(kind="mesh"))
