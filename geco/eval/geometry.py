"""Geometry metrics of the GSO protocol: Chamfer distance, volume IoU and F-score from depth maps.

SyncDreamer's ``eval_mesh.py`` (the protocol GECO, Wonder3D and SyncDreamer report) compares a
predicted and a ground-truth shape through **points back-projected from depth maps** seen by 16
fixed cameras, voxel-downsampled at 0.01:

    CD     = ( mean_p min_g |p - g| + mean_g min_p |g - p| ) / 2      plain L2 distances
    vIoU   = |occ_pred & occ_gt| / |occ_pred | occ_gt|                  on a 64^3 occupancy grid
    F(t)   = 2 P R / (P + R), P = share of predicted points within t of a GT point,
             R = share of GT points within t of a predicted point     (SF3D / SPAR3D; not in the paper)

Objects are in our frame (z up) and normalised as SyncDreamer does (largest bounding-box side 1,
centred: the renderer already does it, :mod:`geco.render.blender.scene`), so distances are in units
of the object's largest side. SyncDreamer also rotates 19 of its GT meshes about z to match its own
predictions' canonical pose; our models are conditioned on a view at azimuth 0 and predict in the
input camera's frame, which is the GT's frame, so no rotation is applied.

**How Gaussians become depth.** The predicted Gaussians are rasterized
(:func:`geco.render.splat.render_gaussians`, gsplat's rules) at the same cameras with render mode
``RGB+ED``: the depth of a pixel is the **expected camera z-depth** of the splats it composites,
``sum_i w_i z_i / sum_i w_i``, and the pixel counts as surface where the accumulated opacity
``1 - T`` exceeds :data:`SURFACE_ALPHA` (0.5). Ground-truth depth is Blender's z pass at the same
cameras (exact surface z-depth, 0 where no surface), masked by the render's alpha the same way.
Back-projection: pixel centres ``(j + 0.5, i + 0.5)`` at z-depth ``z`` go to
``c2w (z K^-1 [u, v, 1])`` (OpenCV cameras, :mod:`geco.cameras`).

**How depth becomes occupancy.** SyncDreamer takes occupancy from the SDF of a watertight mesh
(``mesh2sdf``); Gaussians have no such surface. So both shapes - prediction and ground truth alike -
get occupancy by **carving with their depth maps**: a voxel centre is occupied iff, in every camera,
it projects into the image onto a surface pixel and lies at or behind that pixel's depth (minus
half a voxel). This is the visual hull refined by depth; concavities no camera sees into stay
filled, for both shapes. The grid has 64^3 cells over ``[-extent, extent]^3`` (``extent`` 1, as
``mesh2sdf.compute(vertices, faces, 64)`` covers [-1, 1]^3 for SyncDreamer's unit-size objects).
Carving needs cameras above *and* below the object: the configured camera set
(``evaluate.geometry_elevations``) alternates elevations; SyncDreamer's own 16 cameras all sit at
30 deg, reproduced with ``geometry_elevations: [30]``.

Shapes and units: depth maps [H, W] (z-depth in world units, 0 = none), masks [H, W] bool,
K [3, 3] in pixels, w2c [4, 4] world-to-camera OpenCV. Points [N, 3] float64 in our world.
Nearest neighbours: ``scipy.spatial.cKDTree``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from geco.cameras import Camera

SURFACE_ALPHA = 0.5  # a rendered pixel is surface where its accumulated opacity exceeds this
VOXEL_SIZE = 0.01  # SyncDreamer's voxel_down_sample size
IOU_GRID = 64  # SyncDreamer's mesh2sdf grid
IOU_EXTENT = 1.0  # the grid spans [-extent, extent]^3

__all__ = [
    "IOU_EXTENT",
    "IOU_GRID",
    "SURFACE_ALPHA",
    "VOXEL_SIZE",
    "GeometrySettings",
    "backproject_depth",
    "carve_occupancy",
    "chamfer_distance",
    "fscore",
    "geometry_cameras",
    "geometry_metrics",
    "grid_centres",
    "nearest_distances",
    "points_from_depths",
    "volume_iou",
    "voxel_downsample",
]


@dataclass(frozen=True)
class GeometrySettings:
    """What the geometry metrics depend on (``evaluate`` config fields of the same names)."""

    voxel_size: float = VOXEL_SIZE
    iou_grid: int = IOU_GRID
    iou_extent: float = IOU_EXTENT
    fscore_thresholds: tuple[float, ...] = (0.1, 0.05)


def geometry_cameras(count: int = 16, elevations: Sequence[float] = (30.0, -30.0), radius: float = 1.5,
                     fov_deg: float = 49.1, resolution: int = 256) -> list[Camera]:
    """The fixed cameras whose depth maps give the points and occupancy: ``count`` azimuths
    ``360 k / count`` (k = 0..count-1), elevation ``elevations[k % len(elevations)]``, looking at the
    origin (SyncDreamer's camera-16: 16 azimuths at elevation 30, radius 1.5, FOV 49.1, 256 px)."""
    if count < 1 or not elevations:
        raise ValueError("geometry cameras: need at least one camera and one elevation")
    return [Camera("geometry", resolution, resolution, float(fov_deg), float(radius), 360.0 * k / count,
                   float(elevations[k % len(elevations)])) for k in range(count)]


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------
def backproject_depth(depth: np.ndarray, K: np.ndarray, w2c: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """World points [N, 3] of the surface pixels (``mask`` and depth > 0) of one z-depth map."""
    depth = np.asarray(depth, dtype=np.float64)
    keep = depth > 0
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(keep)
    z = depth[rows, cols]
    K = np.asarray(K, dtype=np.float64)
    x = (cols + 0.5 - K[0, 2]) / K[0, 0] * z
    y = (rows + 0.5 - K[1, 2]) / K[1, 1] * z
    cam = np.stack([x, y, z], 1)
    w2c = np.asarray(w2c, dtype=np.float64)
    R, t = w2c[:3, :3], w2c[:3, 3]
    return (cam - t) @ R  # R^T (cam - t), row vectors


def points_from_depths(depths: Sequence[np.ndarray], masks: Sequence[np.ndarray], Ks: Sequence[np.ndarray],
                       w2cs: Sequence[np.ndarray], voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """All cameras' back-projected surface points, voxel-downsampled (SyncDreamer's point sets)."""
    pts = [backproject_depth(d, K, w, m) for d, m, K, w in zip(depths, masks, Ks, w2cs)]
    pts = np.concatenate(pts, 0) if pts else np.zeros((0, 3))
    return voxel_downsample(pts, voxel_size)


def voxel_downsample(points: np.ndarray, voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """One point per occupied voxel, the mean of its points (Open3D's ``voxel_down_sample``: voxels
    of side ``voxel_size`` anchored half a voxel below the points' minimum)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or voxel_size <= 0:
        return points
    origin = points.min(0) - voxel_size / 2
    idx = np.floor((points - origin) / voxel_size).astype(np.int64)
    _, inverse, counts = np.unique(idx, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(counts), 3))
    np.add.at(sums, inverse, points)
    return sums / counts[:, None]


def nearest_distances(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each point of ``src`` [N, 3], the L2 distance to its nearest point of ``dst`` [M, 3]
    (``inf`` for every point when ``dst`` is empty)."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if len(dst) == 0:
        return np.full(len(src), np.inf)
    if len(src) == 0:
        return np.zeros(0)
    return cKDTree(dst).query(src, k=1)[0]


def chamfer_distance(pred: np.ndarray, gt: np.ndarray) -> float:
    """SyncDreamer's CD: the mean of the two mean nearest-neighbour distances (not squared).
    NaN when either point set is empty (no surface to compare)."""
    if len(pred) == 0 or len(gt) == 0:
        return math.nan
    return float((nearest_distances(pred, gt).mean() + nearest_distances(gt, pred).mean()) / 2)


def fscore(pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """F-score at ``threshold``: harmonic mean of precision (predicted points within the threshold
    of the GT) and recall (GT points within it of the prediction); 0 when either set is empty."""
    if len(pred) == 0 or len(gt) == 0:
        return 0.0
    precision = float((nearest_distances(pred, gt) < threshold).mean())
    recall = float((nearest_distances(gt, pred) < threshold).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# occupancy
# ---------------------------------------------------------------------------------------------
def grid_centres(grid: int = IOU_GRID, extent: float = IOU_EXTENT) -> np.ndarray:
    """Voxel centres [grid^3, 3] of a ``grid``^3 grid over [-extent, extent]^3 (x slowest)."""
    step = 2 * extent / grid
    c = -extent + step * (np.arange(grid) + 0.5)
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


def carve_occupancy(depths: Sequence[np.ndarray], masks: Sequence[np.ndarray], Ks: Sequence[np.ndarray],
                    w2cs: Sequence[np.ndarray], grid: int = IOU_GRID, extent: float = IOU_EXTENT) -> np.ndarray:
    """Occupancy [grid, grid, grid] bool by depth carving (module docstring): a voxel centre is kept
    iff every camera sees it on a surface pixel at or behind that pixel's depth (less half a voxel)."""
    centres = grid_centres(grid, extent)
    keep = np.ones(len(centres), dtype=bool)
    tol = extent / grid  # half a voxel
    for depth, mask, K, w2c in zip(depths, masks, Ks, w2cs):
        depth = np.asarray(depth, dtype=np.float64)
        surface = (depth > 0) & np.asarray(mask, dtype=bool)
        h, w = depth.shape
        K, w2c = np.asarray(K, dtype=np.float64), np.asarray(w2c, dtype=np.float64)
        cam = centres @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = K[0, 0] * cam[:, 0] / z + K[0, 2]
            v = K[1, 1] * cam[:, 1] / z + K[1, 2]
        inside = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        col = np.clip(np.floor(np.nan_to_num(u)).astype(np.int64), 0, w - 1)
        row = np.clip(np.floor(np.nan_to_num(v)).astype(np.int64), 0, h - 1)
        seen = inside & surface[row, col]
        keep &= seen & (z >= depth[row, col] - tol)
    return keep.reshape(grid, grid, grid)


def volume_iou(occ_a: np.ndarray, occ_b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean grids of one shape (NaN when both are empty)."""
    a, b = np.asarray(occ_a, dtype=bool), np.asarray(occ_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"occupancy grids differ in shape: {a.shape} vs {b.shape}")
    union = int((a | b).sum())
    return math.nan if union == 0 else int((a & b).sum()) / union


# ---------------------------------------------------------------------------------------------
# all of them
# ---------------------------------------------------------------------------------------------
def geometry_metrics(pred: dict, gt: dict, settings: GeometrySettings = GeometrySettings()) -> dict[str, float]:
    """``{"cd", "viou", "fscore", "fscore_<t>" per threshold}`` from two depth-map sets at the same
    cameras. ``pred`` / ``gt``: ``{"depths": [V x [H,W]], "masks": [...], "Ks": [...], "w2cs": [...]}``.
    ``fscore`` is the F-score at the first threshold. NaN where a shape has no surface at all."""
    def pts(d):
        return points_from_depths(d["depths"], d["masks"], d["Ks"], d["w2cs"], settings.voxel_size)

    def occ(d):
        return carve_occupancy(d["depths"], d["masks"], d["Ks"], d["w2cs"], settings.iou_grid, settings.iou_extent)

    p, g = pts(pred), pts(gt)
    out = {"cd": chamfer_distance(p, g), "viou": volume_iou(occ(pred), occ(gt))}
    for i, t in enumerate(settings.fscore_thresholds):
        f = fscore(p, g, t)
        if i == 0:
            out["fscore"] = f
        out[f"fscore_{t:g}"] = f
    return out
