"""From a :class:`geco.config.RenderConfig` to the cameras and Blender settings of one object."""
from __future__ import annotations

from geco.cameras import Camera, sample_object_cameras
from geco.config import RenderConfig


def cameras_for(object_id: str, render: RenderConfig) -> list[Camera]:
    """All cameras of one object in shard order: cond, the 6 Zero123++ views, then the random ones.

    Poses are seeded from (object id, ``render.seed``): a re-render gets identical cameras.
    """
    return sample_object_cameras(
        object_id,
        render.seed,
        cond_fov_deg=render.cond.fov_deg,
        cond_radius=render.cond.radius,
        cond_resolution=render.cond.resolution,
        cond_elevation_range=tuple(render.cond.elevation_range),
        z123_fov_deg=render.zero123.fov_deg,
        z123_radius=render.zero123.radius,
        z123_resolution=render.zero123.resolution,
        z123_elevations=tuple(render.zero123.elevations),
        num_random=render.random.count,
        random_fov_deg=render.random.fov_deg,
        random_radius=render.random.radius,
        random_resolution=render.random.resolution,
        random_elevation_range=tuple(render.random.elevation_range),
    )


def blender_settings(render: RenderConfig) -> dict:
    """The JSON settings ``geco.render.blender.scene.render_object`` needs (everything pixel-relevant).

    Process limits (timeout, recycling) are not here: they belong to the worker.
    """
    b = render.blender
    return {
        "engine": b.engine,
        "samples": int(b.samples),
        "device": b.device,
        "denoiser": b.denoiser,
        "threads": int(b.threads),
        "light_strength": float(b.light_strength),
        "depth": bool(render.depth),
        "normals": bool(render.normals),
        "view_transform": "Standard",
        "obj_up_axis": "Y",
    }
