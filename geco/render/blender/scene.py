"""Render one object's views with BlenderProc. Runs INSIDE the Blender process (imports ``bpy``).

Entry point: :func:`render_object`. Called by ``geco.render.blender.server``; never imported by
a process that does not mean to host Blender.

Conventions (DESIGN.md "Conventions"; each one checked by tests/integration/test_blender_render.py)
---------------------------------------------------------------------------------------------
* World frame: Blender's, z up. The object is centred and scaled so its bounding box fits
  [-0.5, 0.5]^3 (longest side 1, box centre at the origin).
* Axes on import: ``.glb``/``.gltf`` are y-up by specification; Blender's importer turns them z-up
  with (x, y, z)_file -> (x, -z, y)_world. ``.obj`` has no standard axis; we import it as y-up too
  (``forward_axis="NEGATIVE_Z", up_axis="Y"``, Blender's defaults), i.e. the same mapping as
  glTF, so one model exported to both formats renders identically and the common y-up OBJ
  convention (Blender/Maya exporters, trimesh, Objaverse) stands upright. Sources whose OBJs are
  z-up can pass ``settings["obj_up_axis"] = "Z"`` (then file coordinates are world coordinates).
* Cameras arrive as :meth:`geco.cameras.Camera.to_dict` records; ``K`` (pixel centres at +0.5)
  and ``w2c`` (OpenCV world-to-camera) are the source of truth. BlenderProc takes an OpenGL
  camera-to-world matrix and, in ``set_intrinsics_from_K_matrix``, assumes pixel centres at
  integer coordinates (centred principal point = (W-1)/2): we pass ``cx - 0.5, cy - 0.5``.
* Depth: BlenderProc's ``enable_depth_output(activate_antialiasing=False)`` is Cycles' Z pass,
  which is camera **z-depth** (along the optical axis), not ray distance: stored as is (float16,
  world units), 0 where there is no surface (Z pass = 1e10 there, or alpha = 0).
* Normals: BlenderProc's normal output is the render's world-space Normal pass rotated into the
  **OpenGL camera frame** and encoded as (n + 1) / 2. We undo the encoding and rotate back with the
  camera-to-world rotation: world-space unit normals, stored as 8-bit RGB (n + 1) / 2. Pixels with
  no surface hold n = 0, i.e. (128, 128, 128); mask them with the RGBA alpha.
* Lighting: no lamps; a uniform white world of strength ``light_strength`` lights the object from
  every side. The film is transparent, so the world never shows in the RGBA images.

Blender keeps one resolution and one set of camera intrinsics per scene, so views are rendered in
groups of consecutive cameras sharing (width, height, K); each group is a BlenderProc render of
its poses as animation frames.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from geco.render.blender.adapter import load_blenderproc

SUPPORTED_EXTENSIONS = (".glb", ".gltf", ".obj")
_NO_SURFACE_DEPTH = 1e9  # Cycles writes 1e10 into the Z pass where a ray hits nothing

DEFAULT_SETTINGS = {
    "engine": "CYCLES",
    "samples": 16,
    "device": "CPU",
    "denoiser": "NONE",
    "threads": 0,
    "light_strength": 1.0,
    "depth": True,
    "normals": True,
    "view_transform": "Standard",  # colours as authored (BlenderProc's default is Filmic)
    "obj_up_axis": "Y",
    "clip_start": 0.01,
    "clip_end": 100.0,
}


class UnsupportedObject(ValueError):
    """The file cannot be rendered: unsupported extension, empty file, no faces, ..."""


def view_names(n: int) -> list[str]:
    """Member names of n cameras: "cond", then "000", "001", ..."""
    return ["cond"] + [f"{i:03d}" for i in range(n - 1)]


# --------------------------------------------------------------------------------- scene reset


def _reset_scene(bproc) -> None:
    """Remove every trace of the previous object: data blocks, passes, compositor, registered outputs."""
    import bpy

    # All data blocks (objects, meshes, materials, images, node groups, actions, worlds, ...),
    # then a fresh world and camera; resets keyframes and the frame range.
    bproc.clean_up(clean_up_camera=True)
    for img in list(bpy.data.images):  # belt and braces: images survive if still referenced
        bpy.data.images.remove(img)
    _reset_outputs()


def _reset_outputs() -> None:
    """Compositor back to Render Layers -> Composite; no Z/normal/albedo passes; no outputs."""
    import bpy
    from blenderproc.python.utility.GlobalStorage import GlobalStorage

    scene = bpy.context.scene
    scene.use_nodes = True
    scene.render.use_compositing = True
    tree = scene.node_tree
    tree.nodes.clear()
    rl = tree.nodes.new("CompositorNodeRLayers")
    comp = tree.nodes.new("CompositorNodeComposite")
    tree.links.new(rl.outputs["Image"], comp.inputs["Image"])
    if tree.animation_data is not None:  # keyframed normal-rotation inputs of a previous group
        tree.animation_data_clear()
    vl = bpy.context.view_layer
    vl.use_pass_z = False
    vl.use_pass_normal = False
    vl.use_pass_diffuse_color = False
    vl.use_pass_mist = False
    # BlenderProc remembers enabled outputs in a process-wide store (no public API to forget them).
    for key in ("depth_output_is_enabled", "distance_output_is_enabled", "output"):
        GlobalStorage._storage_dict.pop(key, None)


# --------------------------------------------------------------------------------- loading


def _import_file(path: Path, settings: dict) -> None:
    import bpy

    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise UnsupportedObject(f"unsupported file type {ext or '(none)'!r} for {path.name}; "
                                f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"object file not found: {path}")
    if path.stat().st_size == 0:
        raise UnsupportedObject(f"empty file (0 bytes): {path.name}")
    if ext in (".glb", ".gltf"):
        result = bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        up = str(settings.get("obj_up_axis", "Y")).upper()
        if up not in ("Y", "Z"):
            raise ValueError(f"settings.obj_up_axis must be 'Y' or 'Z', got {up!r}")
        forward = "NEGATIVE_Z" if up == "Y" else "Y"
        result = bpy.ops.wm.obj_import(filepath=str(path), forward_axis=forward, up_axis=up,
                                       validate_meshes=True)
    if "FINISHED" not in result:
        raise RuntimeError(f"Blender's importer returned {sorted(result)} for {path.name}")


def _missing_texture_warnings() -> list[str]:
    import bpy

    warnings = []
    for img in bpy.data.images:
        if img.source not in ("FILE", "SEQUENCE", "TILED") or img.packed_file is not None:
            continue
        fp = bpy.path.abspath(img.filepath) if img.filepath else ""
        if not fp or not os.path.isfile(fp) or tuple(img.size) == (0, 0):
            warnings.append(f"missing texture image {img.name!r} ({img.filepath or 'no path'})")
    return warnings


def _mesh_world_vertices(objs) -> np.ndarray:
    """World-space vertices [N,3] of the evaluated meshes (modifiers and armatures applied)."""
    import bpy

    depsgraph = bpy.context.evaluated_depsgraph_get()
    chunks = []
    for obj in objs:
        ev = obj.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        try:
            n = len(mesh.vertices)
            if n:
                co = np.empty(n * 3, dtype=np.float64)
                mesh.vertices.foreach_get("co", co)
                co = co.reshape(n, 3)
                m = np.array(ev.matrix_world, dtype=np.float64)
                chunks.append(co @ m[:3, :3].T + m[:3, 3])
        finally:
            ev.to_mesh_clear()
    return np.concatenate(chunks) if chunks else np.zeros((0, 3))


def _load_and_normalise(path: Path, settings: dict, camera_obj) -> dict:
    """Import the file, drop its lights/cameras/animation, fit it into [-0.5, 0.5]^3."""
    import bpy
    from mathutils import Matrix

    _import_file(path, settings)
    # Imported lamps and cameras would change the lighting or steal the scene camera.
    for obj in list(bpy.data.objects):
        if obj is not camera_obj and obj.type in ("LIGHT", "CAMERA", "LIGHT_PROBE", "SPEAKER"):
            bpy.data.objects.remove(obj, do_unlink=True)
    bpy.context.scene.camera = camera_obj
    for obj in bpy.data.objects:  # animated objects would move between our "frames"
        if obj is not camera_obj and obj.animation_data is not None:
            obj.animation_data_clear()
    bpy.context.scene.frame_set(0)

    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    polygons = sum(len(o.data.polygons) for o in meshes)
    vertices = sum(len(o.data.vertices) for o in meshes)
    if not meshes:
        raise UnsupportedObject(f"no mesh in {path.name}")
    if polygons == 0:
        raise UnsupportedObject(f"mesh with no faces in {path.name} ({vertices} vertices)")

    pts = _mesh_world_vertices(meshes)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise UnsupportedObject(f"degenerate bounding box {lo.tolist()}..{hi.tolist()} in {path.name}")
    centre = (lo + hi) / 2.0
    scale = 1.0 / extent
    norm = Matrix.Diagonal((scale, scale, scale, 1.0)) @ Matrix.Translation(tuple(-centre))
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not camera_obj:
            obj.matrix_world = norm @ obj.matrix_world
    bpy.context.view_layer.update()
    pts_after = _mesh_world_vertices(meshes)

    return {
        "bbox_min": lo.tolist(),
        "bbox_max": hi.tolist(),
        "centre": centre.tolist(),
        "scale": scale,
        "bbox_normalised_min": pts_after.min(axis=0).tolist(),
        "bbox_normalised_max": pts_after.max(axis=0).tolist(),
        "polygons": int(polygons),
        "vertices": int(vertices),
        "mesh_objects": len(meshes),
        "materials": len(bpy.data.materials),
        "images": len(bpy.data.images),
        "warnings": _missing_texture_warnings(),
    }


# --------------------------------------------------------------------------------- rendering


def _configure_renderer(bproc, settings: dict) -> None:
    import bpy

    scene = bpy.context.scene
    engine = settings["engine"]
    scene.render.engine = engine
    if engine == "CYCLES":
        device = settings["device"].upper()
        if device == "CPU":
            bproc.renderer.set_render_devices(use_only_cpu=True)
        else:
            bproc.renderer.set_render_devices(desired_gpu_device_type=[device])
        bproc.renderer.set_max_amount_of_samples(int(settings["samples"]))
    else:  # EEVEE (Next): samples are its anti-aliasing samples
        scene.eevee.taa_render_samples = int(settings["samples"])
    bproc.renderer.set_cpu_threads(int(settings["threads"]))
    bproc.renderer.set_output_format(file_format="PNG", color_depth=8, enable_transparency=True,
                                     view_transform=settings["view_transform"])
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.film_transparent = True
    bproc.renderer.set_world_background([1.0, 1.0, 1.0], float(settings["light_strength"]))


def _apply_denoiser(bproc, settings: dict) -> None:
    name = str(settings["denoiser"]).upper()
    bproc.renderer.set_denoiser(None if name in ("NONE", "") else name)


def _groups(cameras: list[dict]) -> list[list[int]]:
    """Runs of consecutive cameras sharing resolution and intrinsics (one Blender render each)."""
    groups: list[list[int]] = []
    key_prev = None
    for i, cam in enumerate(cameras):
        key = (int(cam["width"]), int(cam["height"]), json.dumps(np.round(np.asarray(cam["K"]), 9).tolist()))
        if key != key_prev:
            groups.append([])
            key_prev = key
        groups[-1].append(i)
    return groups


def _c2w_opengl(cam: dict) -> np.ndarray:
    w2c = np.asarray(cam["w2c"], dtype=np.float64)
    c2w_cv = np.linalg.inv(w2c)
    return c2w_cv @ np.diag([1.0, -1.0, -1.0, 1.0])


def _encode_normals(normals_cam01: np.ndarray, c2w_gl: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BlenderProc's (n_cam + 1) / 2 (OpenGL camera frame) -> world (n + 1) / 2 as uint8 RGB."""
    n_cam = normals_cam01[..., :3].astype(np.float64) * 2.0 - 1.0
    n_world = n_cam @ c2w_gl[:3, :3].T
    length = np.linalg.norm(n_world, axis=-1, keepdims=True)
    ok = (length[..., 0] > 1e-3) & mask
    n_world = np.where(ok[..., None], n_world / np.maximum(length, 1e-12), 0.0)
    return np.clip(np.round((n_world + 1.0) * 0.5 * 255.0), 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, compress_level=4)


def render_object(object_path: str, cameras: list[dict], settings: dict, out_dir: str) -> dict:
    """Render ``object_path`` from ``cameras`` (Camera.to_dict() records, cond first) into ``out_dir``.

    Writes ``cond.png``, ``cond.depth.npy``, ``cond.normal.png``, ``000.png``, ... (the n-th camera
    after cond is ``{n:03d}``), ``cameras.json`` and, last, ``meta.json``. Returns the meta dict.
    Raises on a file that cannot be rendered (the message says why).
    """
    import bpy

    t0 = time.perf_counter()
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if not cameras:
        raise ValueError("no cameras given")
    bproc = load_blenderproc()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = view_names(len(cameras))

    _reset_scene(bproc)
    camera_obj = bpy.context.scene.camera
    _configure_renderer(bproc, settings)
    load_t = time.perf_counter()
    info = _load_and_normalise(Path(object_path), settings, camera_obj)
    load_s = time.perf_counter() - load_t

    from blenderproc.python.utility.Utility import Utility

    scratch = Path(Utility.temp_dir) / f"render-{os.getpid()}-{time.monotonic_ns()}"
    render_t = time.perf_counter()
    try:
        for g, idx in enumerate(_groups(cameras)):
            _reset_outputs()
            bproc.utility.reset_keyframes()
            _apply_denoiser(bproc, settings)
            first = cameras[idx[0]]
            w, h = int(first["width"]), int(first["height"])
            K = np.asarray(first["K"], dtype=np.float64).copy()
            K[0, 2] -= 0.5  # BlenderProc: pixel centres at integers
            K[1, 2] -= 0.5
            bproc.camera.set_intrinsics_from_K_matrix(K, w, h, clip_start=float(settings["clip_start"]),
                                                      clip_end=float(settings["clip_end"]))
            poses = [_c2w_opengl(cameras[i]) for i in idx]
            for pose in poses:
                bproc.camera.add_camera_pose(pose)
            gdir = scratch / f"group{g}"
            gdir.mkdir(parents=True, exist_ok=True)
            # After the poses: the normal output bakes each frame's camera rotation into keyframes.
            if settings["depth"]:
                bproc.renderer.enable_depth_output(activate_antialiasing=False, output_dir=str(gdir))
            if settings["normals"]:
                bproc.renderer.enable_normals_output(output_dir=str(gdir))
            data = bproc.renderer.render(output_dir=str(gdir))
            for j, i in enumerate(idx):
                rgba = np.asarray(data["colors"][j])
                if rgba.shape != (h, w, 4):
                    raise RuntimeError(f"render gave colours of shape {rgba.shape}, expected {(h, w, 4)}")
                _write_png(out / f"{names[i]}.png", rgba.astype(np.uint8))
                mask = rgba[..., 3] > 0
                if settings["depth"]:
                    z = np.asarray(data["depth"][j], dtype=np.float64)
                    if z.ndim == 3:
                        z = z[..., 0]
                    valid = mask & np.isfinite(z) & (z < _NO_SURFACE_DEPTH) & (z > 0)
                    np.save(out / f"{names[i]}.depth.npy", np.where(valid, z, 0.0).astype(np.float16))
                if settings["normals"]:
                    _write_png(out / f"{names[i]}.normal.png",
                               _encode_normals(np.asarray(data["normals"][j]), poses[j], mask))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    render_s = time.perf_counter() - render_t

    records = [{**cam, "name": name} for cam, name in zip(cameras, names, strict=True)]
    (out / "cameras.json").write_text(json.dumps(records))
    meta = {
        **info,
        "source_path": str(object_path),
        "views": len(cameras),
        "settings": settings,
        "blender_version": bpy.app.version_string,
        "blenderproc_version": bproc.__version__,
        "seconds": {"load": load_s, "render": render_s, "total": time.perf_counter() - t0},
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out / "meta.json")
    return meta
