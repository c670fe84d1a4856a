"""Cameras: the one module that owns poses, intrinsics and their conventions.

Conventions (fixed project-wide; see DESIGN.md "Conventions"):

World frame
    Blender's: right-handed, **z up**. Objects fit in [-0.5, 0.5]^3 around the origin.

Orbit cameras
    A camera at azimuth phi (degrees, counter-clockwise from +x seen from above, i.e. from +z)
    and elevation theta (degrees, positive above the xy plane) at distance r sits at
        r * (cos(theta) cos(phi), cos(theta) sin(phi), sin(theta))
    and looks at the origin with world +z as "up". At elevation exactly +-90 deg "up" is
    undefined; orbit cameras then use the limit of the up vector as theta -> +-90 deg at the
    given azimuth (the tangent d position / d theta), so poses vary continuously with theta.

Camera axes
    * OpenGL / Blender / BlenderProc: camera x right, y up, looking down -z.
    * OpenCV / gsplat / our shards:   camera x right, y down, looking down +z.
    A camera-to-world matrix (c2w) holds the camera axes as its first three columns and the
    camera centre as its fourth. Converting between the two flips the y and z columns; the
    operation is its own inverse. Shards store the **world-to-camera OpenCV** matrix (w2c),
    which is what gsplat's ``viewmats`` wants.

Intrinsics
    K = [[f, 0, cx], [0, f, cy], [0, 0, 1]] in pixels. Pixel (i, j) (row i, column j) covers
    u in [j, j+1], v in [i, i+1]; its centre is at (u, v) = (j + 0.5, i + 0.5). The principal
    point of a W x H image is (W/2, H/2), the image centre. Pixels are square (fx = fy).

Field of view
    ``fov_deg`` is the full angle across the **larger** image dimension (Blender's sensor fit
    AUTO): across the width for square and landscape images, across the height for portrait
    ones. So f = max(W, H) / 2 / tan(fov / 2).

Random poses
    Drawn from a numpy Generator seeded by a SHA-256 hash of (object id, seed), so a re-render
    of the same object with the same config seed gets identical cameras on any machine.

Zero123++ views
    Six views; view k has azimuth cond_azimuth + offset[k] (offsets 30, 90, ..., 330, relative to
    the conditioning view, wrapped to [0, 360)) and absolute elevation +20 / -10 alternating.
    They tile a 3 rows x 2 columns grid, row-major: view k at (row, col) = (k // 2, k % 2).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CAMERA_KINDS",
    "ZERO123PP_AZIMUTH_OFFSETS",
    "Camera",
    "fov_from_intrinsics",
    "intrinsics_from_fov",
    "look_at_c2w_opengl",
    "object_rng",
    "opencv_to_opengl",
    "opengl_to_opencv",
    "orbit_c2w_opengl",
    "orbit_position",
    "plucker_rays",
    "project_points",
    "sample_object_cameras",
    "zero123pp_cameras",
    "zero123pp_grid_position",
]

CAMERA_KINDS = ("cond", "zero123", "random", "orbit", "geometry")  # orbit, geometry: evaluation views (geco.eval)
ZERO123PP_AZIMUTH_OFFSETS = (30, 90, 150, 210, 270, 330)

# Flipping the camera's y and z axes turns an OpenGL camera into an OpenCV one and back.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- poses


def orbit_position(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """Camera centre [3] of an orbit camera (see the module docstring)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def look_at_c2w_opengl(position, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world [4,4] (OpenGL: x right, y up, looking down -z) at ``position`` facing ``target``.

    If ``up`` is (nearly) parallel to the viewing direction, the world axis least aligned with the
    viewing direction is used as up instead, so the result is always a valid rotation.
    """
    position = np.asarray(position, dtype=np.float64)
    forward = _normalize(np.asarray(target, dtype=np.float64) - position)
    up = np.asarray(up, dtype=np.float64)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6 * max(np.linalg.norm(up), 1e-12):
        fallback = np.eye(3)[np.argmin(np.abs(forward))]
        right = np.cross(forward, fallback)
    right = _normalize(right)
    cam_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, position
    return c2w


def orbit_c2w_opengl(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """Camera-to-world [4,4] (OpenGL) of an orbit camera looking at the origin.

    Equals ``look_at_c2w_opengl(orbit_position(...))`` with world +z up, but stays continuous at
    elevation +-90 deg: the up vector is d position / d elevation, which is +z projected onto the
    image plane wherever that is defined.
    """
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    up = np.array([-math.sin(el) * math.cos(az), -math.sin(el) * math.sin(az), math.cos(el)])
    return look_at_c2w_opengl(orbit_position(azimuth_deg, elevation_deg, radius), up=up)


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """Flip the camera y and z axes of camera-to-world matrices [..., 4, 4] (numpy or torch).

    Its own inverse, so it converts OpenCV to OpenGL too. (For world-to-camera matrices flip the
    rows instead: ``_FLIP_YZ @ w2c``.)
    """
    if isinstance(c2w, torch.Tensor):
        return c2w * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device)
    return np.asarray(c2w) @ _FLIP_YZ


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opengl_to_opencv` (the same operation)."""
    return opengl_to_opencv(c2w)


def _rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a rigid [4,4] transform."""
    r, t = m[:3, :3], m[:3, 3]
    inv = np.eye(4)
    inv[:3, :3] = r.T
    inv[:3, 3] = -r.T @ t
    return inv


# --------------------------------------------------------------------------- intrinsics


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> np.ndarray:
    """K [3,3] in pixels; ``fov_deg`` spans the larger image dimension (Blender sensor fit AUTO)."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    f = 0.5 * max(width, height) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def fov_from_intrinsics(K, width: int, height: int) -> float:
    """Full FOV in degrees across the larger image dimension (inverse of :func:`intrinsics_from_fov`)."""
    K = np.asarray(K, dtype=np.float64)
    f = K[0, 0] if width >= height else K[1, 1]
    return math.degrees(2.0 * math.atan(0.5 * max(width, height) / f))


def project_points(points_world: np.ndarray, w2c_cv: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points [N,3] with an OpenCV world-to-camera [4,4] and K [3,3].

    Returns (uv [N,2] in pixels, pixel centres at +0.5; camera z-depth [N], positive in front).
    """
    pts = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    w2c_cv, K = np.asarray(w2c_cv, dtype=np.float64), np.asarray(K, dtype=np.float64)
    cam = pts @ w2c_cv[:3, :3].T + w2c_cv[:3, 3]
    z = cam[:, 2]
    pix = cam @ K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = pix[:, :2] / z[:, None]
    return uv, z


# --------------------------------------------------------------------------- Camera


@dataclass(frozen=True)
class Camera:
    """One orbit camera looking at the origin; everything else is derived from these fields."""

    kind: str  # "cond" | "zero123" | "random"
    width: int
    height: int
    fov_deg: float
    radius: float
    azimuth_deg: float
    elevation_deg: float

    def __post_init__(self):
        if self.kind not in CAMERA_KINDS:
            raise ValueError(f"unknown camera kind {self.kind!r}; expected one of {CAMERA_KINDS}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.radius <= 0:
            raise ValueError(f"radius must be positive, got {self.radius}")

    @property
    def K(self) -> np.ndarray:
        return intrinsics_from_fov(self.fov_deg, self.width, self.height)

    @property
    def c2w_opengl(self) -> np.ndarray:
        return orbit_c2w_opengl(self.azimuth_deg, self.elevation_deg, self.radius)

    @property
    def c2w_opencv(self) -> np.ndarray:
        return opengl_to_opencv(self.c2w_opengl)

    @property
    def w2c_opencv(self) -> np.ndarray:
        return _rigid_inverse(self.c2w_opencv)

    @property
    def position(self) -> np.ndarray:
        return orbit_position(self.azimuth_deg, self.elevation_deg, self.radius)

    def to_dict(self) -> dict:
        """JSON-serialisable record (the ``cameras.json`` entry): fields plus K and w2c (OpenCV)."""
        return {
            "kind": self.kind,
            "width": int(self.width),
            "height": int(self.height),
            "fov_deg": float(self.fov_deg),
            "radius": float(self.radius),
            "azimuth_deg": float(self.azimuth_deg),
            "elevation_deg": float(self.elevation_deg),
            "K": self.K.tolist(),
            "w2c": self.w2c_opencv.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Camera:
        """Rebuild from :meth:`to_dict` output; a stored K / w2c must agree with the fields."""
        cam = cls(
            kind=d["kind"],
            width=int(d["width"]),
            height=int(d["height"]),
            fov_deg=float(d["fov_deg"]),
            radius=float(d["radius"]),
            azimuth_deg=float(d["azimuth_deg"]),
            elevation_deg=float(d["elevation_deg"]),
        )
        for key, derived in (("K", cam.K), ("w2c", cam.w2c_opencv)):
            if key in d and not np.allclose(np.asarray(d[key], dtype=np.float64), derived, atol=1e-4, rtol=1e-5):
                raise ValueError(f"stored {key} disagrees with the camera fields (convention mismatch?)")
        return cam


# --------------------------------------------------------------------------- view sets


def zero123pp_cameras(
    cond_azimuth_deg: float,
    elevations=(20.0, -10.0),
    fov_deg: float = 30.0,
    radius: float = 2.0,
    resolution: int = 320,
    azimuth_offsets=ZERO123PP_AZIMUTH_OFFSETS,
) -> list[Camera]:
    """The Zero123++ target views: azimuth relative to the conditioning view, elevation absolute."""
    return [
        Camera(
            kind="zero123",
            width=resolution,
            height=resolution,
            fov_deg=float(fov_deg),
            radius=float(radius),
            azimuth_deg=float((cond_azimuth_deg + offset) % 360.0),
            elevation_deg=float(elevations[k % len(elevations)]),
        )
        for k, offset in enumerate(azimuth_offsets)
    ]


def zero123pp_grid_position(k: int) -> tuple[int, int]:
    """(row, col) of Zero123++ view k in the 3 rows x 2 columns grid (row-major)."""
    if not 0 <= k < 6:
        raise ValueError(f"Zero123++ view index must be in [0, 6), got {k}")
    return k // 2, k % 2


def object_rng(object_id: str, seed: int) -> np.random.Generator:
    """Generator seeded by SHA-256 of (object id, seed): stable across processes and machines."""
    digest = hashlib.sha256(f"{object_id}\x00{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_object_cameras(
    object_id: str,
    seed: int,
    *,
    cond_fov_deg: float = 49.1,
    cond_radius: float = 1.5,
    cond_resolution: int = 512,
    cond_elevation_range=(-10.0, 40.0),
    z123_fov_deg: float = 30.0,
    z123_radius: float = 2.0,
    z123_resolution: int = 320,
    z123_elevations=(20.0, -10.0),
    num_random: int = 8,
    random_fov_deg: float = 49.1,
    random_radius: float = 1.5,
    random_resolution: int = 256,
    random_elevation_range=(-20.0, 50.0),
) -> list[Camera]:
    """All cameras of one object, in shard order: cond, the 6 Zero123++ views, then the random ones.

    Azimuths are uniform in [0, 360), elevations uniform in the given range. Draw order: cond
    azimuth, cond elevation, then (azimuth, elevation) for each random view.
    """
    rng = object_rng(object_id, seed)
    cond = Camera(
        kind="cond",
        width=cond_resolution,
        height=cond_resolution,
        fov_deg=float(cond_fov_deg),
        radius=float(cond_radius),
        azimuth_deg=float(rng.uniform(0.0, 360.0)),
        elevation_deg=float(rng.uniform(*cond_elevation_range)),
    )
    cams = [cond]
    cams += zero123pp_cameras(
        cond.azimuth_deg, elevations=z123_elevations, fov_deg=z123_fov_deg, radius=z123_radius, resolution=z123_resolution
    )
    for _ in range(num_random):
        azimuth = float(rng.uniform(0.0, 360.0))
        elevation = float(rng.uniform(*random_elevation_range))
        cams.append(
            Camera(
                kind="random",
                width=random_resolution,
                height=random_resolution,
                fov_deg=float(random_fov_deg),
                radius=float(random_radius),
                azimuth_deg=azimuth,
                elevation_deg=elevation,
            )
        )
    return cams


# --------------------------------------------------------------------------- rays


def plucker_rays(K: torch.Tensor, c2w_opencv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel Plücker rays (o x d, d) with unit world direction d through each pixel centre.

    K [3,3] or [B,3,3]; c2w_opencv [4,4] or [B,4,4]. Returns [6,H,W] or [B,6,H,W], in the dtype and
    on the device of ``c2w_opencv``.
    """
    c2w = torch.as_tensor(c2w_opencv)
    if not c2w.is_floating_point():
        c2w = c2w.float()
    K = torch.as_tensor(K, dtype=c2w.dtype, device=c2w.device)
    batched = c2w.dim() == 3
    if not batched:
        c2w, K = c2w[None], K[None]
    K = K.expand(c2w.shape[0], 3, 3)

    v, u = torch.meshgrid(
        torch.arange(height, dtype=c2w.dtype, device=c2w.device) + 0.5,
        torch.arange(width, dtype=c2w.dtype, device=c2w.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)  # [HW,3]
    d_cam = pix @ torch.linalg.inv(K).transpose(-1, -2)  # [B,HW,3]
    d = torch.nn.functional.normalize(d_cam @ c2w[:, :3, :3].transpose(-1, -2), dim=-1)
    o = c2w[:, None, :3, 3].expand_as(d)
    rays = torch.cat([torch.cross(o, d, dim=-1), d], dim=-1)  # [B,HW,6]
    rays = rays.transpose(1, 2).reshape(-1, 6, height, width)
    return rays if batched else rays[0]
