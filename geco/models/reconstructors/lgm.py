"""Reconstructor kind "lgm": LGM's U-Net, V views + Plücker rays -> per-pixel 3D Gaussians.

The network is LGM's asymmetric multi-view U-Net (3DTopia/LGM ``core/unet.py`` + ``core/models.py``),
re-implemented here with the **same parameter names and shapes**, so LGM's released
``model_fp16_fixrot.safetensors`` loads into :class:`GaussianReconstructor` as is
(:func:`load`). Written from reading LGM's code; nothing is copied.

Architecture (names are state-dict keys)
    ``unet.conv_in``           3x3 conv, 9 -> down_channels[0]. Input per view: ImageNet-normalised
                               RGB + Plücker rays (o x d, d), pixel centres at +0.5.
    ``unet.down_blocks.{i}``   ``nets.{j}`` (j < layers_per_block) ResNets; ``attns.{j}`` multi-view
                               attention after each ResNet where ``down_attention[i]``;
                               ``downsample`` 3x3 stride-2 conv, except on the last block.
    ``unet.mid_block``         ``nets.0`` ResNet, ``attns.0`` attention (``mid_attention``), ``nets.1``.
    ``unet.up_blocks.{i}``     ``nets.{j}`` (j <= layers_per_block) ResNets on [x, skip] concatenated,
                               ``attns.{j}`` where ``up_attention[i]``; ``upsample`` = nearest x2 then
                               3x3 conv, except on the last block. up_channels[i] must equal
                               down_channels[-1 - i] (the skips' widths), len(up) <= len(down).
    ``unet.norm_out``, ``unet.conv_out``   GroupNorm, SiLU, 3x3 conv -> 14 channels.
    ``conv``                   a top-level 1x1 conv 14 -> 14 (LGM's "last conv").
    ResNet: norm1, SiLU, conv1 (3x3), norm2, SiLU, conv2 (3x3), plus ``shortcut`` (1x1 conv) only
    where the channel count changes; output (h + shortcut(x)) * skip_scale.
    Attention: GroupNorm ``norm``, then ``attn.qkv`` (Linear C -> 3C, no bias; features laid out
    [3, heads, head_dim]) and ``attn.proj`` (Linear C -> C, with bias): softmax self-attention over
    the tokens of **all views of one object jointly**, scale head_dim^-0.5; output
    (attn + x) * skip_scale. skip_scale = sqrt(0.5) everywhere. GroupNorm eps 1e-5.
    No parameter depends on the number of views: the same weights take 4 or 6 views.

Gaussian channels (per output pixel; LGM's activations, the "fixrot" weights)
    0-2 position clamp(-1, 1); 3 opacity sigmoid; 4-6 scale 0.1 softplus; 7-10 rotation (wxyz),
    L2-normalised over the last dim; 11-13 colour 0.5 tanh + 0.5. (LGM's older
    ``model_fp16.safetensors`` was trained with a rotation-normalisation bug: use the fixrot file.)
    Gaussians are ordered view-major, then row, then column: V x (output res)^2 in all.

Frames (DESIGN.md "Conventions")
    Our world is Blender's, z up, azimuth counter-clockwise from +x seen from above. LGM's is y up
    with kiui's orbit cameras: azimuth 0 on +z, azimuth 90 on +x (also counter-clockwise seen from
    above), and kiui's elevation sign is flipped (negative = above). :data:`OURS_TO_LGM` re-axes our
    world into LGM's (x_lgm = y, y_lgm = z, z_lgm = x), so our (azimuth a, elevation e) camera becomes
    kiui's (elevation -e, azimuth a). On top of it, ``pose_normalization="first_view"`` applies LGM's
    own canonicalisation (``T(0, 0, r) @ inverse(c2w_0)`` in OpenGL, as LGM trains and GECO infers),
    which moves view 0 to kiui's (0, 0) pose; the re-axing then cancels out entirely. The input rays
    are built in that frame and the predicted Gaussians (positions and rotations) are mapped back
    into our world by the inverse transform, so :class:`Gaussians` are always in our world.

Config: the shared fields of ``models.reconstructor`` (input_size, fovy_deg, radius, dtype,
background, ...) plus the architecture in ``models.reconstructor.lgm`` (:class:`geco.config.LGMConfig`).
This module's :func:`build`, :func:`load`, :func:`save` are the registry entry of kind "lgm"
(:mod:`geco.models.reconstructors`); call sites use the registry, not these names.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geco import storage
from geco.cameras import plucker_rays
from geco.gaussians import Gaussians, matrix_to_quat, quat_multiply
from geco.models.reconstructors.base import ReconstructorLoadError, zero123_input_cameras
from geco.render.splat import render_gaussians

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LGM_CHANNELS",
    "OURS_TO_LGM",
    "GaussianReconstructor",
    "LGMUNet",
    "build",
    "expected_state_dict_layout",
    "gaussians_from_lgm_frame",
    "input_cameras",
    "load",
    "load_state_dict_checked",
    "reconstruction_loss",
    "save",
    "to_lgm_frame",
    "validate_architecture",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LGM_CHANNELS = 14  # 3 position + 1 opacity + 3 scale + 4 rotation + 3 colour
SKIP_SCALE = math.sqrt(0.5)  # LGM's UNet default skip_scale=np.sqrt(0.5), passed to every block
NORM_EPS = 1e-5

# Our world (Blender, z up) -> LGM's world (y up, kiui azimuth 0 on +z, azimuth 90 on +x):
#   x_lgm = y, y_lgm = z, z_lgm = x.   A cyclic permutation of the axes, so a proper rotation
# (det +1). Our +x (azimuth 0) -> LGM +z (kiui azimuth 0); our +y (azimuth 90) -> LGM +x (kiui
# azimuth 90); our up +z -> LGM up +y. Rows are LGM's axes expressed in our coordinates.
OURS_TO_LGM = torch.tensor(
    [
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],
    ],
    dtype=torch.float64,
)

# OpenCV <-> OpenGL camera axes (flip the camera's y and z columns of a camera-to-world matrix).
_FLIP_YZ = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)


# =============================================================================== frame adapter


def _rigid_inverse(m: Tensor) -> Tensor:
    r, t = m[..., :3, :3], m[..., :3, 3:]
    inv = torch.zeros_like(m)
    inv[..., :3, :3] = r.transpose(-1, -2)
    inv[..., :3, 3:] = -r.transpose(-1, -2) @ t
    inv[..., 3, 3] = 1
    return inv


def to_lgm_frame(c2w_opencv: Tensor, normalization: str = "first_view", radius: float = 1.5) -> tuple[Tensor, Tensor]:
    """Map cameras from our world into the frame LGM's network reads.

    c2w_opencv [B, V, 4, 4] (our world, OpenCV cameras). Returns (c2w_opencv in LGM's input frame
    [B, V, 4, 4], world transform W [B, 4, 4] with p_lgm = W p_ours), both float64.

    W = OURS_TO_LGM (re-axing, see the module docstring), then for ``"first_view"`` LGM's
    canonicalisation N = T(0, 0, radius) @ inverse(c2w_gl of view 0 in LGM's frame): view 0 ends at
    LGM's default pose (identity rotation, centre (0, 0, radius), i.e. kiui azimuth 0, elevation 0).
    For an orbit camera at distance ``radius`` looking at the origin N is a pure rotation.
    """
    if normalization not in ("first_view", "absolute"):
        raise ValueError(f"pose normalization must be 'first_view' or 'absolute', got {normalization!r}")
    c2w = c2w_opencv.to(torch.float64)
    B = c2w.shape[0]
    W = torch.eye(4, dtype=torch.float64, device=c2w.device).repeat(B, 1, 1)
    W[:, :3, :3] = OURS_TO_LGM.to(c2w.device)
    if normalization == "first_view":
        first_gl = (W @ c2w[:, 0]) * _FLIP_YZ.to(c2w.device)  # OpenCV -> OpenGL camera axes
        T = torch.eye(4, dtype=torch.float64, device=c2w.device)
        T[2, 3] = radius
        W = T @ _rigid_inverse(first_gl) @ W
    return W[:, None] @ c2w, W


def gaussians_from_lgm_frame(means: Tensor, quats: Tensor, world_to_lgm: Tensor) -> tuple[Tensor, Tensor]:
    """Positions [B,N,3] and wxyz rotations [B,N,4] from LGM's input frame back into our world.

    p_ours = W^-1 p_lgm; a Gaussian's rotation R becomes A R with A = rotation part of W^-1, i.e.
    q_ours = q(A) * q_lgm, so the covariance A R S^2 R^T A^T moves with its mean.
    """
    inv = _rigid_inverse(world_to_lgm.to(torch.float64))
    A = inv[:, :3, :3].to(means.dtype)
    t = inv[:, :3, 3].to(means.dtype)
    means = means @ A.transpose(-1, -2) + t[:, None]
    qa = matrix_to_quat(inv[:, :3, :3]).to(quats.dtype)
    quats = quat_multiply(qa[:, None].expand_as(quats), quats)
    return means, quats


# =============================================================================== network


class _ResnetBlock(nn.Module):
    """LGM's ResnetBlock (no resampling): keys norm1, conv1, norm2, conv2[, shortcut]."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # only where the width changes (LGM keeps an nn.Identity, which has no parameters)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * SKIP_SCALE


class _SelfAttention(nn.Module):
    """Keys qkv (no bias) and proj (bias); LGM's MemEffAttention without dropout."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, C]
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _MultiViewAttention(nn.Module):
    """LGM's MVAttention: keys norm, attn.{qkv,proj}; all views' tokens attend jointly."""

    def __init__(self, dim: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=NORM_EPS)
        self.attn = _SelfAttention(dim, num_heads)

    def forward(self, x: Tensor, num_views: int) -> Tensor:  # [B*V, C, H, W]
        BV, C, H, W = x.shape
        B = BV // num_views
        h = self.norm(x).reshape(B, num_views, C, H, W).permute(0, 1, 3, 4, 2).reshape(B, num_views * H * W, C)
        h = self.attn(h)
        h = h.reshape(B, num_views, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W)
        return (h + x) * SKIP_SCALE


def _attn_list(n: int, enabled: bool, dim: int, heads: int, groups: int) -> nn.ModuleList:
    # LGM fills disabled slots with None (no keys); an empty list gives the same state dict.
    return nn.ModuleList([_MultiViewAttention(dim, heads, groups) for _ in range(n)] if enabled else [])


class _DownBlock(nn.Module):
    def __init__(self, cin, cout, layers, downsample, attention, heads, groups):
        super().__init__()
        self.nets = nn.ModuleList([_ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.attns = _attn_list(layers, attention, cout, heads, groups)
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor, num_views: int) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, net in enumerate(self.nets):
            x = net(x)
            if len(self.attns):
                x = self.attns[j](x, num_views)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class _MidBlock(nn.Module):
    def __init__(self, dim, attention, heads, groups):
        super().__init__()
        self.nets = nn.ModuleList([_ResnetBlock(dim, dim, groups), _ResnetBlock(dim, dim, groups)])
        self.attns = _attn_list(1, attention, dim, heads, groups)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        x = self.nets[0](x)
        if len(self.attns):
            x = self.attns[0](x, num_views)
        return self.nets[1](x)


class _UpBlock(nn.Module):
    def __init__(self, cin, cskip_last, cout, layers, upsample, attention, heads, groups):
        super().__init__()
        nets = []
        for j in range(layers):
            c_x = cin if j == 0 else cout
            c_skip = cskip_last if j == layers - 1 else cout
            nets.append(_ResnetBlock(c_x + c_skip, cout, groups))
        self.nets = nn.ModuleList(nets)
        self.attns = _attn_list(layers, attention, cout, heads, groups)
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], num_views: int) -> Tensor:
        for j, net in enumerate(self.nets):
            x = net(torch.cat([x, skips.pop()], dim=1))
            if len(self.attns):
                x = self.attns[j](x, num_views)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class LGMUNet(nn.Module):
    """LGM's asymmetric multi-view U-Net (``core/unet.py`` UNet), 9 -> 14 channels per view."""

    def __init__(
        self,
        in_channels=9,
        out_channels=LGM_CHANNELS,
        down_channels=(64, 128, 256, 512, 1024, 1024),
        down_attention=(False, False, False, True, True, True),
        mid_attention=True,
        up_channels=(1024, 1024, 512, 256, 128),
        up_attention=(True, True, True, False, False),
        layers_per_block=2,
        num_heads=16,
        norm_groups=32,
    ):
        super().__init__()
        _check_architecture(
            down_channels, down_attention, up_channels, up_attention, num_heads, norm_groups, mid_attention
        )
        D, U = len(down_channels), len(up_channels)
        self.conv_in = nn.Conv2d(in_channels, down_channels[0], 3, padding=1)
        blocks, cin = [], down_channels[0]
        for i, cout in enumerate(down_channels):
            blocks.append(
                _DownBlock(cin, cout, layers_per_block, i != D - 1, down_attention[i], num_heads, norm_groups)
            )
            cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _MidBlock(down_channels[-1], mid_attention, num_heads, norm_groups)
        blocks, cin = [], up_channels[0]
        for i, cout in enumerate(up_channels):
            cskip = down_channels[max(-2 - i, -D)]  # the skip taken before block i's last ResNet
            blocks.append(
                _UpBlock(cin, cskip, cout, layers_per_block + 1, i != U - 1, up_attention[i], num_heads, norm_groups)
            )
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_groups, up_channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(up_channels[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor, num_views: int) -> Tensor:  # [B*V, 9, H, W] -> [B*V, 14, h, w]
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, num_views)
            skips.extend(s)
        x = self.mid_block(x, num_views)
        for block in self.up_blocks:
            n = len(block.nets)
            x = block(x, skips[-n:], num_views)
            del skips[-n:]
        return self.conv_out(F.silu(self.norm_out(x)))


def _check_architecture(down, down_attn, up, up_attn, heads, groups, mid_attn=True, input_size=None):
    problems = []
    D, U = len(down), len(up)
    if D < 1 or U < 1:
        problems.append("down_channels and up_channels must be non-empty")
    if len(down_attn) != D:
        problems.append(f"down_attention has {len(down_attn)} entries for {D} down_channels")
    if len(up_attn) != U:
        problems.append(f"up_attention has {len(up_attn)} entries for {U} up_channels")
    if U > D:
        problems.append(f"{U} up blocks need at most as many down blocks (got {D})")
    for i in range(min(U, D)):
        if up[i] != down[-1 - i]:
            problems.append(
                f"up_channels[{i}]={up[i]} must equal down_channels[{-1 - i}]={down[-1 - i]} (the width of the skips it reads)"
            )
    for c in sorted(set(down) | set(up)):
        if c % groups:
            problems.append(f"channel count {c} is not divisible by norm_groups={groups}")
    attn_widths = {c for c, a in zip(down, down_attn) if a} | {c for c, a in zip(up, up_attn) if a}
    if mid_attn and D:
        attn_widths.add(down[-1])
    for c in sorted(attn_widths):
        if c % heads:
            problems.append(f"attention width {c} is not divisible by num_heads={heads}")
    if input_size is not None and D and input_size % (2 ** (D - 1)):
        problems.append(f"input_size={input_size} must be divisible by 2^{D - 1} (the {D - 1} downsamples)")
    if problems:
        raise ValueError("invalid reconstructor architecture:\n  " + "\n  ".join(problems))


def validate_architecture(cfg) -> None:
    """Raise ValueError listing every inconsistency in a ReconstructorConfig's ``lgm`` section."""
    a = cfg.lgm
    _check_architecture(
        a.down_channels,
        a.down_attention,
        a.up_channels,
        a.up_attention,
        a.num_heads,
        a.norm_groups,
        a.mid_attention,
        cfg.input_size,
    )


# =============================================================================== model


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GaussianReconstructor(nn.Module):
    """LGM: ``unet`` + top-level 1x1 ``conv``; cameras in our world, Gaussians out in our world."""

    def __init__(self, cfg):
        super().__init__()
        validate_architecture(cfg)
        self.cfg = cfg
        a = cfg.lgm
        self.unet = LGMUNet(
            9,
            LGM_CHANNELS,
            tuple(a.down_channels),
            tuple(a.down_attention),
            a.mid_attention,
            tuple(a.up_channels),
            tuple(a.up_attention),
            a.layers_per_block,
            a.num_heads,
            a.norm_groups,
        )
        self.conv = nn.Conv2d(LGM_CHANNELS, LGM_CHANNELS, kernel_size=1)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- sizes
    @property
    def input_size(self) -> int:
        return int(self.cfg.input_size)

    @property
    def output_size(self) -> int:
        """Side of each view's Gaussian map: input / 2^(downsamples) * 2^(upsamples)."""
        D, U = len(self.cfg.lgm.down_channels), len(self.cfg.lgm.up_channels)
        return self.input_size // 2 ** (D - 1) * 2 ** (U - 1)

    def num_gaussians(self, num_views: int) -> int:
        return num_views * self.output_size**2

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    # -- inputs
    def prepare_inputs(self, images: Tensor, Ks: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor]:
        """The network's input [B, V, 9, S, S] and the world transform W [B,4,4] (ours -> LGM input frame).

        images [B,V,3,H,W] in [0,1] on the configured background; Ks [B,V,3,3] (or [V,3,3]) in
        pixels of those images; c2w [B,V,4,4] (or [V,4,4]) OpenCV in our world. Views are resized
        to input_size (bilinear, as LGM) and K is rescaled with them.
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, V, 3, H, W], got {tuple(images.shape)}")
        B, V, _, H, W = images.shape
        S = self.input_size
        Ks = torch.as_tensor(Ks).to(device=images.device, dtype=torch.float64)
        c2w = torch.as_tensor(c2w).to(device=images.device, dtype=torch.float64)
        if Ks.dim() == 3:
            Ks = Ks.expand(B, *Ks.shape)
        if c2w.dim() == 3:
            c2w = c2w.expand(B, *c2w.shape)
        if Ks.shape != (B, V, 3, 3) or c2w.shape != (B, V, 4, 4):
            raise ValueError(
                f"cameras must be K [B,V,3,3] and c2w [B,V,4,4] for {B}x{V} views, "
                f"got {tuple(Ks.shape)} and {tuple(c2w.shape)}"
            )
        x = images.reshape(B * V, 3, H, W).to(torch.float32)
        if (H, W) != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
            Ks = Ks.clone()
            Ks[..., 0, :] *= S / W
            Ks[..., 1, :] *= S / H
        x = (x - self._mean.float()) / self._std.float()
        c2w_lgm, world_to_lgm = to_lgm_frame(c2w, self.cfg.lgm.pose_normalization, self.cfg.radius)
        rays = plucker_rays(Ks.reshape(-1, 3, 3), c2w_lgm.reshape(-1, 4, 4), S, S).to(torch.float32)
        return torch.cat([x, rays], dim=1).reshape(B, V, 9, S, S), world_to_lgm

    # -- network
    def forward_raw(self, inputs: Tensor) -> Tensor:
        """[B, V, 9, S, S] -> activated LGM Gaussians [B, V*h*w, 14] in LGM's input frame (LGM's layout)."""
        B, V = inputs.shape[:2]
        x = inputs.reshape(B * V, *inputs.shape[2:]).to(self.dtype)
        x = self.conv(self.unet(x, V))  # [B*V, 14, h, w]
        h, w = x.shape[-2:]
        x = x.reshape(B, V, LGM_CHANNELS, h, w).permute(0, 1, 3, 4, 2).reshape(B, V * h * w, LGM_CHANNELS).float()
        return torch.cat(
            [
                x[..., 0:3].clamp(-1, 1),  # position
                torch.sigmoid(x[..., 3:4]),  # opacity
                0.1 * F.softplus(x[..., 4:7]),  # scale
                F.normalize(x[..., 7:11], dim=-1),  # rotation, wxyz ("fixrot": over the last dim)
                0.5 * torch.tanh(x[..., 11:14]) + 0.5,  # colour
            ],
            dim=-1,
        )

    def forward(self, images: Tensor, Ks: Tensor, c2w: Tensor) -> Gaussians:
        """images [B,V,3,H,W] in [0,1]; Ks [B,V,3,3]; c2w [B,V,4,4] OpenCV, our world -> Gaussians (float32, our world)."""
        inputs, world_to_lgm = self.prepare_inputs(images, Ks, c2w)
        g = self.forward_raw(inputs)
        means, quats = gaussians_from_lgm_frame(g[..., 0:3], g[..., 7:11], world_to_lgm)
        return Gaussians(means=means, quats=quats, scales=g[..., 4:7], opacities=g[..., 3], rgb=g[..., 11:14])

    # -- rendering and loss
    def render(
        self,
        gaussians: Gaussians,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
        background=None,
        **raster_kwargs,
    ) -> tuple[Tensor, Tensor]:
        """Render through geco.render.splat (default background: the config's): (rgb [B,C,3,H,W], alpha [B,C,1,H,W])."""
        return render_gaussians(
            gaussians,
            viewmats,
            Ks,
            width,
            height,
            self.cfg.background if background is None else background,
            **raster_kwargs,
        )

    def loss(
        self, pred_rgb, pred_alpha, gt_rgb, gt_alpha, lpips: Callable | None = None, lambda_lpips: float | None = None
    ) -> dict[str, Tensor]:
        lam = self.cfg.lambda_lpips if lambda_lpips is None else lambda_lpips
        return reconstruction_loss(pred_rgb, pred_alpha, gt_rgb, gt_alpha, lpips=lpips, lambda_lpips=lam)


def reconstruction_loss(
    pred_rgb: Tensor,
    pred_alpha: Tensor,
    gt_rgb: Tensor,
    gt_alpha: Tensor,
    lpips: Callable | None = None,
    lambda_lpips: float = 1.0,
) -> dict[str, Tensor]:
    """LGM's training loss: MSE(rgb) + MSE(alpha) [+ lambda * LPIPS].

    Shapes [B,V,3,H,W] / [B,V,1,H,W]; ``gt_rgb`` already composited on the render background.
    ``lpips(pred, gt)`` gets [N,3,h,w] in [-1,1] at most 256 px (bilinear, as LGM) and returns a
    per-image or scalar distance; without it (or with lambda 0) the term is left out. With
    ``geco.models.lpips``: an ``LPIPS(..., input_range="[-1,1]")`` model, or an ``LPIPSLoss`` whose
    own weight is 1 (it already returns 0 when its weights are unavailable).
    Returns {"loss", "mse_rgb", "mse_alpha", "psnr"[, "lpips"]}.
    """
    out = {"mse_rgb": F.mse_loss(pred_rgb, gt_rgb), "mse_alpha": F.mse_loss(pred_alpha, gt_alpha)}
    loss = out["mse_rgb"] + out["mse_alpha"]
    if lpips is not None and lambda_lpips > 0:
        H, W = pred_rgb.shape[-2:]
        p, g = pred_rgb.reshape(-1, 3, H, W) * 2 - 1, gt_rgb.reshape(-1, 3, H, W) * 2 - 1
        if max(H, W) > 256:
            size = (min(H, 256), min(W, 256))
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
        out["lpips"] = lpips(p, g).mean()
        loss = loss + lambda_lpips * out["lpips"]
    with torch.no_grad():
        out["psnr"] = -10 * torch.log10(out["mse_rgb"].detach().clamp_min(1e-10))
    out["loss"] = loss
    return out


# =============================================================================== factories and weights


def build(cfg) -> GaussianReconstructor:
    """A randomly initialised reconstructor sized by ``cfg`` (ReconstructorConfig), in ``cfg.dtype``.

    Builds on the current default device (use ``with torch.device("meta"):`` to size a big one)."""
    return GaussianReconstructor(cfg).to(_DTYPES[cfg.dtype])


def expected_state_dict_layout(model: nn.Module) -> str:
    """A compact description of the keys a model expects (for error messages)."""
    sd = model.state_dict()
    heads: dict[str, int] = {}
    for k in sd:
        parts = k.split(".")
        if parts[0] != "unet":
            head = parts[0]
        elif parts[1] in ("down_blocks", "up_blocks"):
            head = ".".join(parts[:3])
        else:
            head = ".".join(parts[:2])
        heads[head] = heads.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n})" for h, n in heads.items())


def _fmt_keys(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_checked(
    model: GaussianReconstructor, state: dict[str, Tensor], source: str = "<state dict>"
) -> None:
    """Load LGM-layout weights (any float dtype, cast to the model's) or raise ReconstructorLoadError."""
    state = {k: v for k, v in state.items() if not k.startswith("lpips_loss.")}  # LGM training extras
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: weights do not match the reconstructor's LGM layout"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
            prefixes = {k.split(".", 1)[0] for k in unexpected}
            if missing and not prefixes & {"unet", "conv"}:
                lines.append(
                    f"  (keys carry a prefix {sorted(prefixes)}: strip it; LGM's file has only unet.* and conv.*)"
                )
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched, 6)}")
            lines.append("  (the architecture fields of models.reconstructor do not match the file's)")
        lines.append(f"  expected layout: {expected_state_dict_layout(model)}")
        raise ReconstructorLoadError("\n".join(lines))
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True)


def input_cameras(cfg, cond_azimuth: float = 0.0) -> tuple[Tensor, Tensor]:
    """LGM takes the six Zero123++ views (GECO's use): see :func:`base.zero123_input_cameras`."""
    return zero123_input_cameras(cfg, cond_azimuth)


def load(cfg, device: torch.device | str | None = None) -> GaussianReconstructor:
    """Build from ``cfg`` and load ``cfg.pretrained`` (a local path or s3:// URI to a safetensors file
    in LGM's released layout, e.g. ``model_fp16_fixrot.safetensors``; S3 objects are cached by
    :func:`geco.storage.local_copy`); fp16 weights are cast to ``cfg.dtype``. With ``cfg.pretrained``
    empty, returns a randomly initialised model."""
    model = build(cfg)
    if cfg.pretrained:
        uri = cfg.pretrained
        if storage.basename(uri) == "model_fp16.safetensors":
            log.warning(
                "%s: LGM's pre-fixrot weights (trained with a rotation-normalisation bug); "
                "use model_fp16_fixrot.safetensors",
                uri,
            )
        try:
            path = storage.local_copy(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"models.reconstructor.pretrained: no such file {uri}") from None
        if not path.is_file():
            raise FileNotFoundError(f"models.reconstructor.pretrained: {uri} is a folder, not a .safetensors file")
        load_state_dict_checked(model, load_file(str(path)), source=uri)
    if device is not None:
        model = model.to(device)
    return model.eval() if cfg.pretrained else model


def save(model: GaussianReconstructor, path: str, dtype: torch.dtype | None = torch.float16) -> None:
    """Write the weights as safetensors in LGM's released layout (fp16 by default); local or s3://."""
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in model.state_dict().items()}
    if storage.is_s3(path):
        with tempfile.TemporaryDirectory(prefix="geco-reconstructor-") as tmp:
            local = Path(tmp) / "model.safetensors"
            save_file(state, str(local))
            storage.upload(local, str(path))
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
