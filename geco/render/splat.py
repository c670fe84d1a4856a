"""Gaussian splat rasterizer with gsplat's ``rasterization`` signature, on CPU and GPU.

``rasterize`` takes the arguments of ``gsplat.rasterization`` (gsplat 1.5.3) and returns what it
returns. On CUDA tensors it calls gsplat itself (imported lazily; every option is passed
through). On CPU it runs a pure-torch path of our own that follows gsplat's CUDA kernels rule for
rule, so the two paths agree to float rounding. An option the torch path does not implement
raises ``NotImplementedError`` naming it; none is silently ignored.

Conventions (DESIGN.md "Conventions")
    means [N, 3] world; quats [N, 4] **wxyz** (normalised here); scales [N, 3] and opacities [N]
    already activated. colors [N, D] (or per camera [C, N, D]) used as given, or with
    ``sh_degree`` set SH coefficients [N, K, 3] (or [C, N, K, 3]) with (sh_degree+1)^2 <= K,
    in the 3DGS basis; colour = max(SH(dir) + 0.5, 0), dir = mean - camera centre.
    viewmats [C, 4, 4] world-to-camera **OpenCV** (x right, y down, z forward); Ks [C, 3, 3]
    in pixels; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
    Returns render_colors [C, H, W, X] (X = D, 1 for "D"/"ED", D + 1 for "RGB+D"/"RGB+ED",
    the depth last), render_alphas [C, H, W, 1] and a meta dict.
    Batches of scenes, as gsplat: every tensor may carry the same leading batch dims [...]
    (means [..., N, 3], viewmats [..., C, 4, 4], backgrounds [..., C, D], ...; scene b is seen
    by its own C cameras only); the results get them too ([..., C, H, W, X], meta [..., C, N, ...]).
    The torch path treats B scenes of C cameras as B * C cameras, each with its scene's N
    Gaussians: an image is the one its scene renders alone (to float rounding, should the
    tile edge picked from the whole batch's radii differ from the scene's own).

The rules (read from gsplat 1.5.3's CUDA kernels: ProjectionEWA3DGSFused.cu, IntersectTile.cu,
RasterizeToPixels3DGSFwd.cu / Bwd.cu, include/Utils.cuh)
    Projection (EWA): Sigma = R S S^T R^T; in camera space R_cam Sigma R_cam^T; 2D covariance
    J Sigma_cam J^T with J the Jacobian of the pinhole projection at the mean, where x/z and y/z
    inside J are clamped to the image extent plus 30 % of the half field of view on each side
    (the mean itself is not clamped); mean2d = (fx x/z + cx, fy y/z + cy).
    eps2d is added to the diagonal of the 2D covariance; conic = its inverse (a, b, c).
    "antialiased" multiplies the opacity by sqrt(max(0, det(cov2d) / det(cov2d + eps2d I))).
    Culling (radii = 0): z < near_plane or z > far_plane; det <= 0; opacity < 1/255;
    both radii <= radius_clip; bounding box entirely off the image.
    Radius (per axis, integer pixels): ceil(e * sqrt(cov2d_xx)), ceil(e * sqrt(cov2d_yy)) with
    the opacity-aware extent e = min(3.33, sqrt(2 ln(255 opacity))).
    Compositing, per pixel, front to back in increasing camera z (ties by Gaussian index):
    sigma = 1/2 (a dx^2 + c dy^2) + b dx dy; alpha = min(0.999, opacity exp(-sigma)); a
    Gaussian with sigma < 0 or alpha < 1/255 is skipped; if the transmittance after it would
    be <= 1e-4 the pixel stops **before** it (that Gaussian is excluded). colour = sum w_i c_i
    + T bg, w_i = alpha_i T_i, alpha = 1 - T. "ED" divides the depth channel by
    max(alpha, 1e-10); depth modes composite camera z with a zero background.
    Gradients follow gsplat's: none through the radii, the culling or the clamp at 0.999
    (clamped alphas pass no gradient) or into Gaussians after a pixel stopped. viewmats and Ks
    get plain autograd gradients here (gsplat gives viewmats one and Ks none; not compared).

Implementation of the torch path
    All cameras at once: project, bin each visible Gaussian into the square tiles its bounding
    box touches (gsplat's tile rule; the tile edge, 4-16 px, is picked from the mean radius and
    does not change the output), order each tile's list front to back, and composite chunks of
    tiles with similar list lengths as dense [tiles, pixels, K] blocks of up to CPU_K_BLOCK
    Gaussians, carrying T and the stopped state from block to block; a tile leaves its chunk
    once all its pixels have stopped (about a third of the work at the pseudo-GT benchmark's
    size). The compositing is a custom autograd function whose backward walks the
    same blocks, recomputes the alphas and applies the closed-form gradient (as gsplat's
    backward kernel does), so memory stays bounded by one block. Blocks are kept small
    (CPU_CHUNK_ELEMENTS): on this machine large temporaries cost page faults on every call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geco.gaussians import SH_C0, Gaussians, quat_to_matrix

__all__ = [
    "ALPHA_THRESHOLD",
    "MAX_ALPHA",
    "RENDER_MODES",
    "SH_C0",
    "TRANSMITTANCE_MIN",
    "eval_sh",
    "project_gaussians",
    "rasterize",
    "render_gaussians",
]

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat ALPHA_THRESHOLD: alphas below it are skipped
MAX_ALPHA = 0.999  # alphas are clamped to this
TRANSMITTANCE_MIN = 1e-4  # a pixel stops before the Gaussian that would take T to <= this
RADIUS_EXTENT = 3.33  # upper bound on the bounding-box extent, in standard deviations
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")

# Tile edges the CPU path picks from (pixels), by the Gaussians' mean radius: small tiles waste
# less on small splats, larger ones bin faster when splats are big. The output does not depend
# on it (gsplat's does not depend on its tile_size either): a Gaussian's tiles always contain
# every pixel where its alpha >= 1/255 (for opacities <= 1, as in gsplat).
CPU_TILE_SIZES = ((8.0, 4), (24.0, 8), (math.inf, 16))  # (mean radius below, tile edge)
# Upper bound on tiles x pixels x K elements of one dense compositing block.
CPU_CHUNK_ELEMENTS = 1 << 17
# Gaussians composited per step along each tile's list; a chunk of tiles stops early once all
# its pixels have stopped (the 1e-4 rule), so deep lists cost only what is visible.
CPU_K_BLOCK = 64

# gsplat.rasterization options beyond those named in `rasterize`, with their defaults. The torch
# path accepts them only at these defaults; the CUDA path passes them on.
_GSPLAT_EXTRA_DEFAULTS: dict[str, Any] = {
    "radial_coeffs": None,
    "tangential_coeffs": None,
    "thin_prism_coeffs": None,
    "ftheta_coeffs": None,
    "rolling_shutter": "GLOBAL",
    "viewmats_rs": None,
}


# --------------------------------------------------------------------------- entry point


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Tensor | None = None,
    render_mode: str = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    channel_chunk: int = 32,
    distributed: bool = False,
    camera_model: str = "pinhole",
    segmented: bool = False,
    covars: Tensor | None = None,
    with_ut: bool = False,
    with_eval3d: bool = False,
    **unsupported: Any,
) -> tuple[Tensor, Tensor, dict]:
    """Render Gaussians into C images; gsplat.rasterization's arguments and results.

    Differs from gsplat only in the default ``packed=False`` (both paths then return meta
    tensors shaped [..., C, N, ...]). ``tile_size``, ``channel_chunk`` and ``segmented`` only tune
    gsplat's kernels; the torch path accepts and ignores them (they do not change the output).
    See the module docstring for shapes, conventions and the exact rules.
    """
    unknown = sorted(set(unsupported) - set(_GSPLAT_EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"rasterize() got unexpected keyword arguments {unknown}")
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")

    if means.is_cuda:
        import gsplat  # lazily: it compiles its CUDA kernels on first use

        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
            sh_degree=sh_degree, packed=packed, tile_size=tile_size, backgrounds=backgrounds,
            render_mode=render_mode, sparse_grad=sparse_grad, absgrad=absgrad,
            rasterize_mode=rasterize_mode, channel_chunk=channel_chunk,
            distributed=distributed, camera_model=camera_model, segmented=segmented,
            covars=covars, with_ut=with_ut, with_eval3d=with_eval3d,
            **{name: value for name, value in unsupported.items() if value is not None},
        )  # fmt: skip

    _refuse_unimplemented(
        packed=packed, sparse_grad=sparse_grad, absgrad=absgrad, distributed=distributed,
        camera_model=camera_model, with_ut=with_ut, with_eval3d=with_eval3d, extras=unsupported,
    )  # fmt: skip
    return _rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height),
        near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
        sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
        antialiased=rasterize_mode == "antialiased", covars=covars,
    )  # fmt: skip


def render_gaussians(
    gaussians: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int, background=1.0, **raster_kwargs
) -> tuple[Tensor, Tensor]:
    """Render :class:`~geco.gaussians.Gaussians` (batched [B,N,...] or one object's [N,...]) through
    one :func:`rasterize` call (the objects as its batch dim), with cameras viewmats [B,C,4,4] (or
    shared [C,4,4]) world-to-camera OpenCV and Ks [B,C,3,3] (or [C,3,3]). ``background``: a float,
    [3] or [B,3]. Returns rgb [B,C,3,H,W] and alpha [B,C,1,H,W]."""
    g = gaussians if gaussians.batched else gaussians[None]
    B = len(g)
    dev, dt = g.means.device, g.means.dtype
    viewmats = torch.as_tensor(viewmats).to(dev, dt)
    Ks = torch.as_tensor(Ks).to(dev, dt)
    if viewmats.dim() == 3:
        viewmats = viewmats.expand(B, *viewmats.shape)
    if Ks.dim() == 3:
        Ks = Ks.expand(B, *Ks.shape)
    C = viewmats.shape[1]
    bg = torch.as_tensor(background, dtype=dt, device=dev)
    bg = bg.expand(B, 3) if bg.dim() < 2 else bg
    colors, alpha, _ = rasterize(
        g.means, g.quats, g.scales, g.opacities, g.rgb, viewmats, Ks, int(width), int(height),
        backgrounds=bg[:, None, :].expand(B, C, 3), **raster_kwargs,
    )  # fmt: skip
    return colors.permute(0, 1, 4, 2, 3), alpha.permute(0, 1, 4, 2, 3)


def _refuse_unimplemented(*, packed, sparse_grad, absgrad, distributed, camera_model,
                          with_ut, with_eval3d, extras) -> None:  # fmt: skip
    flags = {
        "packed": packed,
        "sparse_grad": sparse_grad,
        "absgrad": absgrad,
        "distributed": distributed,
        "with_ut": with_ut,
        "with_eval3d": with_eval3d,
    }
    for name, value in flags.items():
        if value:
            raise NotImplementedError(f"rasterize torch path: {name}={value!r} is not implemented")
    if camera_model != "pinhole":
        raise NotImplementedError(
            f"rasterize torch path: camera_model={camera_model!r} is not implemented (pinhole only)"
        )
    for name, value in extras.items():
        default = _GSPLAT_EXTRA_DEFAULTS[name]
        if value is None or (name == "rolling_shutter" and getattr(value, "name", value) == default):
            continue
        shown = f"<tensor {tuple(value.shape)}>" if isinstance(value, Tensor) else repr(value)
        raise NotImplementedError(f"rasterize torch path: {name}={shown} is not implemented")


# --------------------------------------------------------------------------- torch path


def _rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                     near_plane, far_plane, radius_clip, eps2d, sh_degree, backgrounds,
                     render_mode, antialiased, covars) -> tuple[Tensor, Tensor, dict]:  # fmt: skip
    if means.dim() < 2 or viewmats.dim() < 3:
        raise ValueError(f"means must be [..., N, 3] and viewmats [..., C, 4, 4], got {tuple(means.shape)} "
                         f"and {tuple(viewmats.shape)}")
    batch = tuple(means.shape[:-2])
    N, C = means.shape[-2], viewmats.shape[-3]
    _check_shape("means", means, batch + (N, 3))
    if covars is None:
        _check_shape("quats", quats, batch + (N, 4))
        _check_shape("scales", scales, batch + (N, 3))
    else:
        _check_shape("covars", covars, batch + (N, 3, 3))
    _check_shape("opacities", opacities, batch + (N,))
    _check_shape("viewmats", viewmats, batch + (C, 4, 4))
    _check_shape("Ks", Ks, batch + (C, 3, 3))

    proj = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d=eps2d,
        near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip,
        antialiased=antialiased, covars=covars,
    )  # fmt: skip

    colors = _gaussian_colors(colors, sh_degree, means, viewmats, batch, N, C)  # [..., C, N, D]
    # from here on B scenes of C cameras are BC = B * C cameras, camera k seeing its scene's N Gaussians
    BC = math.prod(batch) * C
    colors = colors.reshape(BC, N, colors.shape[-1])
    flat = {k: v.reshape((BC, N) + v.shape[len(batch) + 2:]) for k, v in proj.items()}
    depths = flat["depths"]
    if render_mode in ("RGB+D", "RGB+ED"):
        colors = torch.cat([colors, depths[..., None]], dim=-1)
    elif render_mode in ("D", "ED"):
        colors = depths[..., None]
    D = colors.shape[-1]
    if backgrounds is not None:
        backgrounds = backgrounds.to(colors.dtype)
        if render_mode in ("RGB+D", "RGB+ED"):
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(backgrounds.shape[:-1] + (1,))], -1)
        elif render_mode in ("D", "ED"):
            backgrounds = backgrounds.new_zeros(backgrounds.shape[:-1] + (1,))
        backgrounds = torch.broadcast_to(backgrounds, batch + (C, D)).reshape(BC, D)

    tile = _pick_tile_size(flat["radii"])
    bins = _bin_to_tiles(flat["means2d"].detach(), flat["radii"], depths.detach(), width, height, tile)
    acc, transmittance = _Composite.apply(
        flat["means2d"].reshape(BC * N, 2),
        flat["conics"].reshape(BC * N, 3),
        flat["opacities"].reshape(BC * N),
        colors.reshape(BC * N, D),
        bins,
    )  # [BC, H, W, D], [BC, H, W, 1]
    render_alphas = 1.0 - transmittance
    render_colors = acc if backgrounds is None else acc + transmittance * backgrounds[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    render_colors = render_colors.reshape(batch + (C,) + render_colors.shape[-3:])
    render_alphas = render_alphas.reshape(batch + (C,) + render_alphas.shape[-3:])

    meta = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": proj["radii"],
        "means2d": proj["means2d"],
        "depths": proj["depths"],
        "conics": proj["conics"],
        "opacities": proj["opacities"],
        "tile_width": bins["tiles_x"],
        "tile_height": bins["tiles_y"],
        "tiles_per_gauss": bins["tiles_per_gauss"].reshape(batch + (C, N)),
        "width": width,
        "height": height,
        "tile_size": bins["tile"],
        "n_batches": math.prod(batch),
        "n_cameras": C,
    }
    return render_colors, render_alphas, meta


def _check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------- projection


def _quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances R S S^T R^T [N, 3, 3] from wxyz quaternions (normalised here) and scales."""
    R = quat_to_matrix(quats)
    M = R * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, *,
                      eps2d=0.3, near_plane=0.01, far_plane=1e10, radius_clip=0.0,
                      antialiased=False, covars=None) -> dict[str, Tensor]:  # fmt: skip
    """EWA-project N Gaussians into C pinhole cameras (gsplat's fused projection, unpacked).

    means [..., N, 3] (quats, scales, opacities, covars alike), viewmats [..., C, 4, 4], Ks
    [..., C, 3, 3], the same leading batch dims on all (a batch of scenes, each with its cameras).
    Returns a dict of [..., C, N, ...] tensors: ``means2d`` [.., 2] (pixels), ``conics`` [.., 3]
    (a, b, c of the inverse blurred 2D covariance), ``depths`` (camera z), ``opacities``
    (times the antialiasing compensation when asked), ``radii`` [.., 2] int32 (0 = culled) and
    ``valid`` (bool). Culled entries keep finite values and receive no gradient.
    """
    if covars is None:
        covars = _quat_scale_to_covar(quats, scales)
    R, t = viewmats[..., :3, :3], viewmats[..., :3, 3]
    means_c = torch.einsum("...cij,...nj->...cni", R, means) + t[..., None, :]  # [..., C, N, 3]
    covars_c = torch.einsum("...cij,...njk,...clk->...cnil", R, covars, R)  # [..., C, N, 3, 3]
    x, y, z = means_c.unbind(-1)
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keep culled entries finite

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [..., C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    margin_x, margin_y = 0.3 * (0.5 * width / fx), 0.3 * (0.5 * height / fy)
    # Jacobian of (fx x/z + cx, fy y/z + cy) with x/z, y/z clamped to the widened frustum
    tx = z * torch.minimum(torch.maximum(x / z, -(cx / fx + margin_x)), (width - cx) / fx + margin_x)
    ty = z * torch.minimum(torch.maximum(y / z, -(cy / fy + margin_y)), (height - cy) / fy + margin_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], dim=-1)
    J = J.reshape(z.shape + (2, 3))
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [..., C, N, 2, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    c00, c01, c10, c11 = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 0], cov2d[..., 1, 1]
    det_orig = c00 * c11 - c01 * c10
    c00, c11 = c00 + eps2d, c11 + eps2d
    det = c00 * c11 - c01 * c10
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c11 / det_safe, -0.5 * (c01 + c10) / det_safe, c00 / det_safe], dim=-1)

    opac = torch.broadcast_to(opacities[..., None, :], z.shape)
    if antialiased:
        opac = opac * torch.sqrt(torch.clamp(det_orig / det_safe, min=0.0))

    with torch.no_grad():
        o = opac.detach()
        extent = torch.sqrt(2.0 * torch.log(torch.clamp(o, min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = torch.clamp(extent, max=RADIUS_EXTENT)
        rx = torch.ceil(extent * torch.sqrt(c00.detach().clamp(min=0)))
        ry = torch.ceil(extent * torch.sqrt(c11.detach().clamp(min=0)))
        mx, my = means2d.detach().unbind(-1)
        valid = in_depth & (det > 0) & (o >= ALPHA_THRESHOLD)
        valid &= ~((rx <= radius_clip) & (ry <= radius_clip))
        valid &= (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        radii = torch.stack([rx, ry], dim=-1) * valid[..., None]
        radii = radii.to(torch.int32)

    return {
        "means2d": means2d,
        "conics": conics,
        "depths": means_c[..., 2],
        "opacities": opac,
        "radii": radii,
        "valid": valid,
    }


# --------------------------------------------------------------------------- colours


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate real SH (3DGS basis and signs, degrees 0-4) along ``dirs`` [..., 3] (any length).

    coeffs [..., K, 3] with K >= (degree + 1)^2; returns [..., 3] (without the +0.5 offset).
    """
    if not 0 <= degree <= 4:
        raise NotImplementedError(f"SH degree {degree} is not implemented (0-4)")
    n_bases = (degree + 1) ** 2
    if coeffs.shape[-2] < n_bases:
        raise ValueError(f"sh_degree={degree} needs K >= {n_bases} coefficients, got {coeffs.shape[-2]}")
    bases = [torch.full_like(dirs[..., 0], SH_C0)]
    if degree >= 1:
        x, y, z = torch.nn.functional.normalize(dirs, dim=-1).unbind(-1)
        c1 = 0.4886025119029199
        bases += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        bases += [
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.31539156525252005 * (2 * zz - xx - yy),
            -1.0925484305920792 * xz,
            0.5462742152960396 * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            -0.5900435899266435 * y * (3 * xx - yy),
            2.890611442640554 * xy * z,
            -0.4570457994644658 * y * (4 * zz - xx - yy),
            0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
            -0.4570457994644658 * x * (4 * zz - xx - yy),
            1.445305721320277 * z * (xx - yy),
            -0.5900435899266435 * x * (xx - 3 * yy),
        ]
    if degree >= 4:
        bases += [
            2.5033429417967046 * xy * (xx - yy),
            -1.7701307697799304 * yz * (3 * xx - yy),
            0.9461746957575601 * xy * (7 * zz - 1),
            -0.6690465435572892 * yz * (7 * zz - 3),
            0.10578554691520431 * (zz * (35 * zz - 30) + 3),
            -0.6690465435572892 * xz * (7 * zz - 3),
            0.47308734787878004 * (xx - yy) * (7 * zz - 1),
            -1.7701307697799304 * xz * (xx - 3 * yy),
            0.6258357354491761 * (xx * (xx - 3 * yy) - yy * (3 * xx - yy)),
        ]
    basis = torch.stack(bases, dim=-1)  # [..., n_bases]
    return (basis[..., None] * coeffs[..., :n_bases, :]).sum(dim=-2)


def _gaussian_colors(colors, sh_degree, means, viewmats, batch, N, C) -> Tensor:
    """Per-camera colours [..., C, N, D]: as given, or max(SH + 0.5, 0) seen from each camera."""
    nb, shape = len(batch), tuple(colors.shape)
    if sh_degree is None:
        if colors.dim() == nb + 2 and shape[:-1] == batch + (N,):
            return torch.broadcast_to(colors[..., None, :, :], batch + (C,) + shape[-2:])
        if colors.dim() == nb + 3 and shape[:-1] == batch + (C, N):
            return colors
        raise ValueError(f"colors must be [..., N, D] or [..., C, N, D] without sh_degree, got {shape}")
    if colors.dim() == nb + 3 and shape[:-2] == batch + (N,) and shape[-1] == 3:
        coeffs = torch.broadcast_to(colors[..., None, :, :, :], batch + (C,) + shape[-3:])
    elif colors.dim() == nb + 4 and shape[:-2] == batch + (C, N) and shape[-1] == 3:
        coeffs = colors
    else:
        raise ValueError(f"SH colors must be [..., N, K, 3] or [..., C, N, K, 3], got {shape}")
    campos = torch.linalg.inv(viewmats)[..., :3, 3]  # [..., C, 3]
    dirs = means[..., None, :, :] - campos[..., :, None, :]  # [..., C, N, 3]
    return torch.clamp_min(eval_sh(sh_degree, dirs, coeffs) + 0.5, 0.0)


# --------------------------------------------------------------------------- tiles


def _pick_tile_size(radii: Tensor) -> int:
    visible = (radii > 0).all(dim=-1)
    mean_radius = float(radii[visible].amax(dim=-1).float().mean()) if visible.any() else 0.0
    return next(tile for below, tile in CPU_TILE_SIZES if mean_radius < below)


@torch.no_grad()
def _bin_to_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile: int) -> dict:
    """Bin visible Gaussians of C cameras into tiles; each tile's list ordered front to back.

    A Gaussian covers tiles [floor((m - r) / tile), ceil((m + r) / tile)) per axis, clamped to
    the image (gsplat's rule). Returns flat Gaussian ids (into C * N) grouped by global tile id
    (camera * tiles_per_image + row * tiles_x + column), with per-tile offsets and counts.
    """
    C, N = depths.shape
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    n_tiles = tiles_x * tiles_y
    flat_m2d, flat_r = means2d.reshape(-1, 2), radii.reshape(-1, 2).to(means2d.dtype)
    visible = (radii > 0).all(dim=-1).reshape(-1)

    lo = torch.floor((flat_m2d - flat_r) / tile)
    hi = torch.ceil((flat_m2d + flat_r) / tile)
    limit = torch.tensor([tiles_x, tiles_y], dtype=lo.dtype)
    lo = torch.minimum(lo.clamp(min=0), limit).long()
    hi = torch.minimum(hi.clamp(min=0), limit).long()
    span = (hi - lo).clamp(min=0)
    tiles_per_gauss = span[:, 0] * span[:, 1] * visible

    # front to back: stable sort by depth keeps the Gaussian index order on ties (as gsplat)
    ids = torch.nonzero(visible & (tiles_per_gauss > 0)).squeeze(1)
    ids = ids[torch.sort(depths.reshape(-1)[ids], stable=True).indices]
    counts = tiles_per_gauss[ids]
    owner = torch.repeat_interleave(torch.arange(len(ids)), counts)  # rank in depth order
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(owner)) - first[owner]
    g = ids[owner]
    wx = span[g, 0]
    col = lo[g, 0] + local % wx
    row = lo[g, 1] + local // wx
    tile_id = (g // N) * n_tiles + row * tiles_x + col
    # group by tile, depth order inside each tile (keys are unique)
    order = torch.sort(tile_id * max(len(ids), 1) + owner).indices
    tile_id, gauss = tile_id[order], g[order]
    tile_counts = torch.bincount(tile_id, minlength=C * n_tiles)
    tile_offsets = torch.cumsum(tile_counts, 0) - tile_counts
    return {
        "C": C,
        "N": N,
        "width": width,
        "height": height,
        "tile": tile,
        "tiles_x": tiles_x,
        "tiles_y": tiles_y,
        "gauss": gauss,
        "counts": tile_counts,
        "offsets": tile_offsets,
        "tiles_per_gauss": tiles_per_gauss.reshape(C, N).int(),
    }


def _chunks(bins: dict, elements: int = CPU_CHUNK_ELEMENTS, block: int = CPU_K_BLOCK):
    """Yield (tile ids [T], padded Gaussian ids [T, K]) for non-empty tiles, longest lists first.

    T * pixels * min(K, block) stays under ``elements``. Padding slots hold the id C * N, a
    dummy Gaussian with zero opacity.
    """
    counts = bins["counts"]
    tiles = torch.nonzero(counts).squeeze(1)
    if len(tiles) == 0:
        return
    tiles = tiles[torch.sort(counts[tiles], descending=True, stable=True).indices]
    pixels = bins["tile"] ** 2
    dummy = bins["C"] * bins["N"]
    gauss, offsets = bins["gauss"], bins["offsets"]
    start = 0
    while start < len(tiles):
        K = int(counts[tiles[start]])
        n = max(1, elements // (pixels * min(K, block)))
        chunk = tiles[start : start + n]
        slot = torch.arange(K)
        idx = offsets[chunk, None] + slot
        inside = slot < counts[chunk, None]
        yield chunk, torch.where(inside, gauss[idx.clamp(max=len(gauss) - 1)], dummy)
        start += n


def _tile_pixels(bins: dict, chunk: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates [T, P] (x and y) of the tiles in ``chunk``."""
    tile, tiles_x = bins["tile"], bins["tiles_x"]
    local = chunk % (bins["tiles_x"] * bins["tiles_y"])
    p = torch.arange(tile * tile)
    px = (local % tiles_x * tile)[:, None] + (p % tile)[None] + 0.5
    py = (local // tiles_x * tile)[:, None] + (p // tile)[None] + 0.5
    return px.to(dtype), py.to(dtype)


def _tiled_to_image(tiled: Tensor, bins: dict) -> Tensor:
    """[C * tiles, P, X] -> [C, H, W, X]."""
    C, t, X = bins["C"], bins["tile"], tiled.shape[-1]
    img = tiled.reshape(C, bins["tiles_y"], bins["tiles_x"], t, t, X).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(C, bins["tiles_y"] * t, bins["tiles_x"] * t, X)
    return img[:, : bins["height"], : bins["width"]]


def _image_to_tiled(img: Tensor, bins: dict) -> Tensor:
    """[C, H, W, X] -> [C * tiles, P, X] (zero padded at the right and bottom edges)."""
    C, t, X = bins["C"], bins["tile"], img.shape[-1]
    H, W = bins["tiles_y"] * t, bins["tiles_x"] * t
    img = torch.nn.functional.pad(img, (0, 0, 0, W - bins["width"], 0, H - bins["height"]))
    img = img.reshape(C, bins["tiles_y"], t, bins["tiles_x"], t, X).permute(0, 1, 3, 2, 4, 5)
    return img.reshape(C * bins["tiles_y"] * bins["tiles_x"], t * t, X)


# --------------------------------------------------------------------------- compositing


def _mask(compare, x: Tensor, threshold: float) -> Tensor:
    """compare(x, threshold) as a 0/1 tensor of x's dtype. Masks are kept as floats and applied
    by multiplication: on CPU, bool comparisons, torch.where and masked_fill are several times
    slower than a float multiply."""
    return compare(x, threshold, out=torch.empty_like(x))


def _alphas(px, py, params):
    """Per pixel and Gaussian of a block: dx, dy, exp(-sigma), o exp(-sigma), alpha.

    px, py [T, P]; params [T, K, 6 + D] packed as in _pack  ->  [T, P, K] tensors. alpha is
    clamped to 0.999 and 0 where the Gaussian is skipped (sigma < 0 or alpha < 1/255).
    """
    mx, my, a, b, c, opac = (params[:, None, :, i] for i in range(6))
    dx = px[:, :, None] - mx
    dy = py[:, :, None] - my
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    gauss = torch.exp(-sigma)
    raw = opac * gauss
    alpha = torch.clamp_max(raw, MAX_ALPHA)
    alpha *= _mask(torch.ge, alpha, ALPHA_THRESHOLD) * _mask(torch.ge, sigma, 0.0)
    return dx, dy, gauss, raw, alpha


def _pack(means2d, conics, opacities, colors) -> Tensor:
    """One row per Gaussian, [M + 1, 6 + D]: mx, my, a, b, c, opacity, colour. The extra last
    row is the padding Gaussian (zero opacity, so its alpha is 0 and it is skipped)."""
    packed = torch.cat([means2d, conics, opacities[:, None], colors], dim=1).detach()
    return torch.cat([packed, packed.new_zeros(1, packed.shape[1])])


def _blocks(bins: dict, packed: Tensor):
    """Walk every chunk front to back in blocks of Gaussians, carrying the transmittance.

    Yields, per block: the tile ids still composited [T], Gaussian ids [T, B], their packed
    rows [T, B, 6 + D], the _alphas tuple, T before each Gaussian, the kept mask as 0/1 (the
    1e-4 stop rule: T after a kept Gaussian is > 1e-4; a prefix since T never increases) and the
    weights alpha * T * kept. A tile whose pixels have
    all stopped leaves its chunk after that block (what follows would have weight 0, and no
    gradient); the chunk ends once none is left. The last item is T after the block [T, P]:
    a tile's final transmittance in the last block that yields it.
    """
    for chunk, ids in _chunks(bins):
        px, py = _tile_pixels(bins, chunk, packed.dtype)
        trans = torch.ones_like(px)  # [T, P]
        running = torch.ones_like(px)  # 0 once a pixel has stopped: it takes nothing more
        for k0 in range(0, ids.shape[1], CPU_K_BLOCK):
            blk = ids[:, k0 : k0 + CPU_K_BLOCK]
            params = packed[blk]  # [T, B, 6 + D]
            terms = _alphas(px, py, params)
            alpha = terms[-1]
            after = trans[..., None] * torch.cumprod(1.0 - alpha, dim=-1)
            keep = _mask(torch.gt, after, TRANSMITTANCE_MIN) * running[..., None]
            before = torch.cat([trans[..., None], after[..., :-1]], dim=-1)
            weights = alpha * before * keep
            trans = torch.minimum(trans, (after * keep + (1.0 - keep)).amin(dim=-1))
            running = keep[..., -1]
            yield chunk, blk, params, terms, before, keep, weights, trans
            live = running.amax(dim=1) > 0  # tiles with a pixel still running
            if not bool(live.all()):
                if not bool(live.any()):
                    break
                chunk, ids, px, py, trans, running = (t[live] for t in (chunk, ids, px, py, trans, running))


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of binned 2D Gaussians with a closed-form backward.

    Inputs flat over C * N: means2d [M, 2], conics [M, 3], opacities [M], colors [M, D] and the
    tile bins. Outputs the accumulated colour [C, H, W, D] (no background) and the final
    transmittance T [C, H, W, 1]. The backward recomputes the alphas block by block (nothing
    per pixel and Gaussian is stored) and applies, for u = dL/dacc . c and w = alpha T:
      dL/dc_k     = sum_pixels w_k dL/dacc
      dL/dalpha_k = T_k u_k - (sum_{j>k} w_j u_j + dL/dT_final T_final) / (1 - alpha_k)
    then alpha = o exp(-sigma) down to opacities, conics and means2d (no gradient where alpha
    was skipped, stopped or clamped, as in gsplat).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, bins):
        packed = _pack(means2d, conics, opacities, colors)
        n_tiles = bins["C"] * bins["tiles_x"] * bins["tiles_y"]
        P, D = bins["tile"] ** 2, colors.shape[-1]
        acc = colors.new_zeros(n_tiles, P, D)
        trans = colors.new_ones(n_tiles, P)
        for chunk, _, params, _, _, _, weights, chunk_trans in _blocks(bins, packed):
            acc[chunk] += torch.einsum("tpk,tkd->tpd", weights, params[..., 6:])
            trans[chunk] = chunk_trans
        ctx.bins = bins
        ctx.save_for_backward(means2d, conics, opacities, colors, acc, trans)
        return _tiled_to_image(acc, bins), _tiled_to_image(trans[..., None], bins)

    @staticmethod
    def backward(ctx, grad_acc, grad_trans):
        bins = ctx.bins
        means2d, conics, opacities, colors, acc, trans = ctx.saved_tensors
        packed = _pack(means2d, conics, opacities, colors)
        dtype, D = colors.dtype, colors.shape[-1]
        shape = (bins["C"], bins["height"], bins["width"])
        grad_acc = colors.new_zeros(shape + (D,)) if grad_acc is None else grad_acc.to(dtype)
        grad_trans = colors.new_zeros(shape + (1,)) if grad_trans is None else grad_trans.to(dtype)
        g_acc = _image_to_tiled(grad_acc, bins)  # [tiles, P, D]
        g_trans = _image_to_tiled(grad_trans, bins)[..., 0]  # [tiles, P]
        total = (g_acc * acc).sum(dim=-1)  # sum_j w_j u_j over each pixel's whole list
        trans_term = g_trans * trans  # dL/dT_final * T_final

        grads = torch.zeros_like(packed)  # same packing: mx, my, a, b, c, opacity, colour
        carried = torch.zeros_like(total)  # per pixel, sum_{j <= k} w_j u_j over the blocks so far
        for chunk, blk, params, terms, before, keep, weights, _ in _blocks(bins, packed):
            dx, dy, gauss, raw, alpha = terms
            g = g_acc[chunk]
            u = torch.einsum("tpd,tkd->tpk", g, params[..., 6:])
            prefix = carried[chunk][..., None] + torch.cumsum(weights * u, dim=-1)
            carried[chunk] = prefix[..., -1]
            behind = total[chunk][..., None] - prefix
            v_alpha = before * u - (behind + trans_term[chunk][..., None]) / (1.0 - alpha)
            # gradient only where alpha was used and not clamped (gsplat: o * G <= 0.999)
            v_alpha *= keep * _mask(torch.gt, alpha, 0.0) * _mask(torch.le, raw, MAX_ALPHA)
            v_sigma = -v_alpha * raw
            a, b, c = (params[:, None, :, i] for i in range(2, 5))
            block_grads = torch.stack(
                [
                    -(v_sigma * (a * dx + b * dy)).sum(dim=1),
                    -(v_sigma * (c * dy + b * dx)).sum(dim=1),
                    0.5 * (v_sigma * dx * dx).sum(dim=1),
                    (v_sigma * dx * dy).sum(dim=1),
                    0.5 * (v_sigma * dy * dy).sum(dim=1),
                    (v_alpha * gauss).sum(dim=1),
                ],
                dim=-1,
            )  # [T, B, 6]
            block_grads = torch.cat([block_grads, torch.einsum("tpk,tpd->tkd", weights, g)], dim=-1)
            grads.index_add_(0, blk.reshape(-1), block_grads.reshape(-1, 6 + D))
        M = means2d.shape[0]
        return grads[:M, 0:2], grads[:M, 2:5], grads[:M, 5], grads[:M, 6:], None
