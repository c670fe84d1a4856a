"""Real Blender renders through geco.render.blender.worker.BlenderRenderer.

bpy is never imported in this (pytest) process: every render runs in the renderer's child.
Objects are made here: a textured .obj (+.mtl + PNG), and .glb files written by hand.
Tiny images (32-64 px) and few samples keep this file fast on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geco import faults
from geco.cameras import Camera, project_points
from geco.config import RenderConfig
from geco.render.views import blender_settings, cameras_for

pytestmark = [
    pytest.mark.blender,
    pytest.mark.skipif(
        importlib.util.find_spec("bpy") is None or importlib.util.find_spec("blenderproc") is None,
        reason="needs bpy + blenderproc (pip install -e .[render])",
    ),
]

RES = 48


def _render_config(res: int = RES, n_random: int = 2, samples: int = 8, cond_res: int | None = None) -> RenderConfig:
    return RenderConfig.model_validate({
        "cond": {"resolution": cond_res or res},
        "zero123": {"resolution": res},
        "random": {"resolution": res, "count": n_random},
        "blender": {"samples": samples, "threads": 2},
    })


# ------------------------------------------------------------------------------ geometry


def _orient_outward(verts: np.ndarray, faces: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Flip triangles whose winding does not point away from ``centre`` (a convex shape)."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = np.cross(b - a, c - a)
    out = (a + b + c) / 3 - centre
    flip = (n * out).sum(1) < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return faces


def uv_sphere(centre, radius, n_lat=12, n_lon=24):
    centre = np.asarray(centre, dtype=np.float64)
    verts = []
    for i in range(n_lat + 1):
        th = math.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * math.pi * j / n_lon
            verts.append([math.sin(th) * math.cos(ph), math.sin(th) * math.sin(ph), math.cos(th)])
    unit = np.array(verts)
    faces = []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = (i + 1) * n_lon + (j + 1) % n_lon, (i + 1) * n_lon + j
            if i > 0:
                faces.append([a, b, c])
            if i < n_lat - 1:
                faces.append([a, c, d])
    v = centre + radius * unit
    return v, _orient_outward(v, np.array(faces), centre), unit


def box(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    tris = np.array([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    return v, _orient_outward(v, tris, (lo + hi) / 2)


def world_to_yup(p: np.ndarray) -> np.ndarray:
    """World (z up) -> y-up file coordinates; the importers map (x, y, z)_file -> (x, -z, y)."""
    p = np.asarray(p, dtype=np.float64)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def write_glb(path: Path, meshes: list[dict]) -> None:
    """Minimal glTF 2.0 binary. meshes: {"v": [N,3] world, "f": [M,3], "n": optional [N,3], "color", "emissive"}."""
    bin_parts, buffer_views, accessors, gl_meshes, materials, nodes = [], [], [], [], [], []
    offset = 0

    def add(array: np.ndarray, target: int, comp: int, typ: str, minmax: bool) -> int:
        nonlocal offset
        data = array.tobytes()
        pad = (-len(data)) % 4
        bin_parts.append(data + b"\0" * pad)
        buffer_views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": target})
        offset += len(data) + pad
        acc = {"bufferView": len(buffer_views) - 1, "componentType": comp, "count": int(array.shape[0]), "type": typ}
        if minmax:
            acc["min"] = array.min(0).tolist()
            acc["max"] = array.max(0).tolist()
        accessors.append(acc)
        return len(accessors) - 1

    for k, m in enumerate(meshes):
        pos = world_to_yup(m["v"]).astype(np.float32)
        attrs = {"POSITION": add(pos, 34962, 5126, "VEC3", True)}
        if m.get("n") is not None:
            attrs["NORMAL"] = add(world_to_yup(m["n"]).astype(np.float32), 34962, 5126, "VEC3", False)
        idx = add(np.asarray(m["f"], dtype=np.uint32).reshape(-1), 34963, 5125, "SCALAR", False)
        materials.append({
            "pbrMetallicRoughness": {"baseColorFactor": list(m.get("color", (0.8, 0.8, 0.8))) + [1.0],
                                     "metallicFactor": 0.0, "roughnessFactor": 1.0},
            "emissiveFactor": list(m.get("emissive", (0.0, 0.0, 0.0))),
        })
        gl_meshes.append({"primitives": [{"attributes": attrs, "indices": idx, "material": k}]})
        nodes.append({"mesh": k})
    binary = b"".join(bin_parts)
    gltf = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": list(range(len(nodes)))}],
        "nodes": nodes, "meshes": gl_meshes, "materials": materials, "accessors": accessors,
        "bufferViews": buffer_views, "buffers": [{"byteLength": len(binary)}],
    }
    js = json.dumps(gltf).encode()
    js += b" " * ((-len(js)) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(binary), 0x004E4942) + binary
    path.write_bytes(struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body)


def write_textured_obj(folder: Path, name: str = "cube", texture: bool = True, missing_texture: bool = False,
                       lo=(-0.3, -0.2, -0.1), hi=(0.5, 0.4, 0.3), y_up: bool = True) -> Path:
    """A box as .obj + .mtl (+ a striped PNG texture), in y-up file coordinates (z-up if not y_up)."""
    folder.mkdir(parents=True, exist_ok=True)
    v, _ = box(lo, hi)
    quads = []
    for q in [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]:
        n = np.cross(v[q[1]] - v[q[0]], v[q[2]] - v[q[0]])
        quads.append(q if n @ (v[q].mean(0) - v.mean(0)) > 0 else q[::-1])  # counter-clockwise from outside
    vf = world_to_yup(v) if y_up else v
    lines = [f"mtllib {name}.mtl", *(f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vf),
             "vt 0 0", "vt 1 0", "vt 1 1", "vt 0 1", "usemtl skin"]
    lines += [f"f {q[0] + 1}/1 {q[1] + 1}/2 {q[2] + 1}/3 {q[3] + 1}/4" for q in quads]
    (folder / f"{name}.obj").write_text("\n".join(lines) + "\n")
    mtl = ["newmtl skin", "Kd 1 1 1", "Ka 0 0 0", "Ks 0 0 0", "illum 1"]
    if texture:
        mtl.append(f"map_Kd {name}_tex.png")
        if not missing_texture:
            check = (np.indices((16, 16)).sum(0) // 4) % 2
            img = np.where(check[..., None] == 1, [230, 40, 30], [30, 60, 220]).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{name}_tex.png")
    (folder / f"{name}.mtl").write_text("\n".join(mtl) + "\n")
    return folder / f"{name}.obj"


def write_plain_glb(path: Path, centre=(0.0, 0.0, 0.0), size=0.6, color=(0.8, 0.7, 0.2)) -> Path:
    c = np.asarray(centre)
    v, f = box(c - size / 2, c + size / 2)
    write_glb(path, [{"v": v, "f": f, "color": color}])
    return path


SPHERE_CENTRE = np.array([0.21, -0.17, 0.12])
SPHERE_RADIUS = 0.07


def write_camera_test_glb(path: Path) -> Path:
    """A bright red sphere at SPHERE_CENTRE plus two tiny green cubes in opposite corners of
    [-0.5, 0.5]^3, so the bounding box is exactly that cube and normalisation is the identity."""
    sv, sf, sn = uv_sphere(SPHERE_CENTRE, SPHERE_RADIUS)
    s = 0.03
    m1v, m1f = box((-0.5, -0.5, -0.5), (-0.5 + s, -0.5 + s, -0.5 + s))
    m2v, m2f = box((0.5 - s, 0.5 - s, 0.5 - s), (0.5, 0.5, 0.5))
    write_glb(path, [
        {"v": sv, "f": sf, "n": sn, "color": (1.0, 0.0, 0.0), "emissive": (1.0, 0.0, 0.0)},
        {"v": m1v, "f": m1f, "color": (0.0, 0.8, 0.0)},
        {"v": m2v, "f": m2f, "color": (0.0, 0.8, 0.0)},
    ])
    return path


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    from geco.render.blender.worker import BlenderRenderer

    r = BlenderRenderer(log_dir=tmp_path_factory.mktemp("logs"), name="shared")
    yield r
    r.close()
    assert r.last_exit_code == 0, "the server must leave with os._exit(0) on shutdown"


def _load_view(out: Path, name: str):
    rgba = np.asarray(Image.open(out / f"{name}.png"))
    depth = np.load(out / f"{name}.depth.npy")
    normal = np.asarray(Image.open(out / f"{name}.normal.png"))
    return rgba, depth, normal


def _unproject(depth: np.ndarray, cam: Camera, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """World points of pixels (rows, cols) from camera z-depth (OpenCV convention, centres at +0.5)."""
    K_inv = np.linalg.inv(cam.K)
    pix = np.stack([cols + 0.5, rows + 0.5, np.ones_like(rows, dtype=float)], -1)
    pts_cam = (pix @ K_inv.T) * depth[rows, cols].astype(np.float64)[:, None]
    c2w = np.linalg.inv(cam.w2c_opencv)
    return pts_cam @ c2w[:3, :3].T + c2w[:3, 3]


# ------------------------------------------------------------------------------ tests


def test_members_shapes_and_conventions(renderer, tmp_path):
    obj = write_textured_obj(tmp_path / "src")
    cfg = _render_config(n_random=2, cond_res=40)  # cond and the other views differ in size
    cams = cameras_for("textured-cube", cfg)
    out = tmp_path / "out"
    res = renderer.render("textured-cube", obj, cams, blender_settings(cfg), out, timeout_s=120)
    assert res.ok, (res.reason, res.log_tail)

    names = ["cond"] + [f"{i:03d}" for i in range(len(cams) - 1)]
    expected = {f"{n}{s}" for n in names for s in (".png", ".depth.npy", ".normal.png")}
    assert expected | {"cameras.json", "meta.json"} == {p.name for p in out.iterdir()}

    # views.cameras_for maps the config onto the cameras
    assert [(c.kind, c.width, c.fov_deg, c.radius) for c in cams[:2]] == [
        ("cond", 40, cfg.cond.fov_deg, cfg.cond.radius), ("zero123", RES, cfg.zero123.fov_deg, cfg.zero123.radius)]
    assert cams == cameras_for("textured-cube", cfg), "poses are seeded by (object id, seed)"

    records = json.loads((out / "cameras.json").read_text())
    assert [r["name"] for r in records] == names
    assert [r["kind"] for r in records] == ["cond"] + ["zero123"] * 6 + ["random"] * 2
    for rec, cam in zip(records, cams, strict=True):
        assert Camera.from_dict(rec) == cam

    saw_texture = False
    for name, cam in zip(names, cams, strict=True):
        rgba, depth, normal = _load_view(out, name)
        assert rgba.shape == (cam.height, cam.width, 4) and rgba.dtype == np.uint8
        assert depth.shape == (cam.height, cam.width) and depth.dtype == np.float16
        assert normal.shape == (cam.height, cam.width, 3) and normal.dtype == np.uint8
        alpha = rgba[..., 3]
        assert (alpha == 0).any() and (alpha == 255).any(), name
        assert np.all(depth[alpha == 0] == 0), name
        solid = alpha == 255
        assert np.all(depth[solid] > 0), name
        # every surface lies within [-0.5, 0.5]^3 seen from `radius`: depth in (r - 0.87, r + 0.87)
        assert depth[solid].min() > cam.radius - 0.87 and depth[solid].max() < cam.radius + 0.87
        n = normal[solid].astype(np.float64) / 255 * 2 - 1
        assert np.all(np.abs(np.linalg.norm(n, axis=-1) - 1) < 0.03), name
        # the checkerboard texture shows: both of its colours appear on the object
        px = rgba[solid][:, :3].astype(int)
        red = ((px[:, 0] > 120) & (px[:, 2] < 90)).mean()
        blue = ((px[:, 2] > 120) & (px[:, 0] < 90)).mean()
        saw_texture |= red > 0.05 and blue > 0.05

        # world-space normals of a box: (nearly) axis-aligned, and facing the camera
        rows, cols = np.nonzero(solid)
        nz = n[np.abs(n).max(-1) > 0.95]
        assert len(nz) > 0.6 * len(n), f"{name}: box normals should be axis-aligned in world space"
        to_cam = cam.position - _unproject(depth, cam, rows, cols)
        assert ((n * to_cam).sum(-1) > 0).mean() > 0.95, f"{name}: normals must face the camera"
    assert saw_texture, "the .obj texture did not load"

    meta = json.loads((out / "meta.json").read_text())
    assert meta == res.meta
    np.testing.assert_allclose(meta["bbox_min"], [-0.3, -0.2, -0.1], atol=1e-5)
    np.testing.assert_allclose(meta["bbox_max"], [0.5, 0.4, 0.3], atol=1e-5)
    assert meta["scale"] == pytest.approx(1 / 0.8)
    np.testing.assert_allclose(np.array(meta["bbox_normalised_max"]) - meta["bbox_normalised_min"],
                               [1.0, 0.75, 0.5], atol=1e-5)
    np.testing.assert_allclose(np.array(meta["bbox_normalised_max"]) + meta["bbox_normalised_min"], 0, atol=1e-5)
    assert meta["polygons"] == 6 and meta["warnings"] == []
    assert meta["images"] == 1


def test_obj_up_axis_z_keeps_file_coordinates(renderer, tmp_path):
    obj = write_textured_obj(tmp_path / "src", name="zup", y_up=False)
    cfg = _render_config(res=32, n_random=0, samples=2)
    settings = {**blender_settings(cfg), "obj_up_axis": "Z"}
    res = renderer.render("zup", obj, cameras_for("zup", cfg), settings, tmp_path / "out", timeout_s=60)
    assert res.ok, (res.reason, res.log_tail)
    np.testing.assert_allclose(res.meta["bbox_min"], [-0.3, -0.2, -0.1], atol=1e-5)
    np.testing.assert_allclose(res.meta["bbox_max"], [0.5, 0.4, 0.3], atol=1e-5)


def test_camera_projection_matches_render(renderer, tmp_path):
    """THE camera test: a sphere at a known world point lands where project_points says, in every view."""
    glb = write_camera_test_glb(tmp_path / "probe.glb")
    cfg = _render_config(res=64, n_random=4)
    cams = cameras_for("camera-probe", cfg)
    out = tmp_path / "out"
    res = renderer.render("camera-probe", glb, cams, blender_settings(cfg), out, timeout_s=120)
    assert res.ok, (res.reason, res.log_tail)
    assert res.meta["scale"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(res.meta["bbox_min"], [-0.5] * 3, atol=1e-6)
    np.testing.assert_allclose(res.meta["bbox_max"], [0.5] * 3, atol=1e-6)

    names = ["cond"] + [f"{i:03d}" for i in range(len(cams) - 1)]
    errors, z_err, dist_err = [], [], []
    for name, cam in zip(names, cams, strict=True):
        rgba, depth, normal = _load_view(out, name)
        rgb = rgba[..., :3].astype(np.float64) / 255
        redness = np.clip(rgb[..., 0] - rgb[..., 1:].max(-1), 0, 1) * rgba[..., 3] / 255
        assert redness.sum() > 5, f"{name}: sphere not visible"
        rows, cols = np.indices(redness.shape)
        centroid = np.array([(redness * (cols + 0.5)).sum(), (redness * (rows + 0.5)).sum()]) / redness.sum()
        uv, _ = project_points(SPHERE_CENTRE[None], cam.w2c_opencv, cam.K)
        err = float(np.linalg.norm(centroid - uv[0]))
        errors.append(err)
        # 0.3 px, not 1: a half-pixel principal-point slip (BlenderProc puts pixel centres at
        # integers, geco.cameras at +0.5) must fail here.
        assert err < 0.3, f"{name} ({cam.kind}): sphere centroid {centroid} vs projection {uv[0]}: {err:.2f} px"

        # depth is camera z-depth and normals are world-space: unprojected sphere pixels lie on the
        # sphere, and their normals point away from its centre.
        core = (redness > 0.7) & (rgba[..., 3] == 255)
        r_, c_ = np.nonzero(core)
        pts = _unproject(depth, cam, r_, c_)
        dist = np.linalg.norm(pts - SPHERE_CENTRE, axis=-1)
        assert np.abs(dist - SPHERE_RADIUS).max() < 0.01, f"{name}: depth is not z-depth? {dist}"
        z_err.append(np.abs(dist - SPHERE_RADIUS).mean())
        # the other reading: depth as distance along the ray
        rays = _unproject(np.ones_like(depth), cam, r_, c_) - cam.position
        pts_d = cam.position + rays / np.linalg.norm(rays, axis=-1, keepdims=True) * depth[r_, c_, None]
        dist_err.append(np.abs(np.linalg.norm(pts_d - SPHERE_CENTRE, axis=-1) - SPHERE_RADIUS).mean())
        n = normal[r_, c_].astype(np.float64) / 255 * 2 - 1
        radial = (pts - SPHERE_CENTRE) / dist[:, None]
        assert (n * radial).sum(-1).min() > 0.95, f"{name}: normals are not world-space"
    assert np.mean(z_err) < 0.5 * np.mean(dist_err), (z_err, dist_err)
    print(f"camera test: max centroid error {max(errors):.3f} px over {len(errors)} views; mean surface error "
          f"reading depth as z {np.mean(z_err):.4f}, as ray distance {np.mean(dist_err):.4f}")


def test_bad_inputs_fail_cleanly_and_child_lives_on(renderer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = write_plain_glb(src / "good.glb")
    (src / "empty.glb").write_bytes(b"")
    data = good.read_bytes()
    (src / "truncated.glb").write_bytes(data[: len(data) // 2])
    (src / "text.glb").write_text("this is not a glTF file\n")
    (src / "model.fbx").write_bytes(b"Kaydara FBX Binary  \x00")
    (src / "model.xyz").write_text("0 0 0\n")
    (src / "nofaces.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    cfg = _render_config(res=32, n_random=0, samples=4)
    settings = blender_settings(cfg)
    renderer.start()
    pid = renderer.pid

    expect = {
        "empty.glb": "empty",
        "truncated.glb": "bad gl",
        "text.glb": "bad gltf: json error",
        "model.fbx": "unsupported",
        "model.xyz": "unsupported",
        "nofaces.obj": "no faces",
    }
    for fname, word in expect.items():
        res = renderer.render(fname, src / fname, cameras_for(fname, cfg), settings, tmp_path / fname, timeout_s=60)
        assert not res.ok, fname
        assert word.lower() in res.reason.lower(), (fname, res.reason)
        assert not (tmp_path / fname / "meta.json").exists()
        assert renderer.pid == pid, f"{fname} must not cost the child"

    res = renderer.render("good", good, cameras_for("good", cfg), settings, tmp_path / "good", timeout_s=60)
    assert res.ok, (res.reason, res.log_tail)
    assert renderer.pid == pid
    # nothing leaks from the previous objects (or the earlier tests' textured object)
    assert res.meta["images"] == 0 and res.meta["materials"] == 1 and res.meta["mesh_objects"] == 1

    missing = write_textured_obj(src / "missing", name="lost", missing_texture=True)
    res = renderer.render("missing-texture", missing, cameras_for("m", cfg), settings, tmp_path / "mt", timeout_s=60)
    assert res.ok, (res.reason, res.log_tail)
    assert any("missing texture" in w and "lost_tex.png" in w for w in res.meta["warnings"]), res.meta["warnings"]
    assert json.loads((tmp_path / "mt" / "meta.json").read_text())["warnings"] == res.meta["warnings"]
    assert renderer.pid == pid


def test_long_lived_child_renders_many_objects_with_one_startup(renderer, tmp_path):
    cfg = _render_config(res=32, n_random=1, samples=4)
    renderer.start()
    pid, startups = renderer.pid, renderer.startups
    seconds = []
    for k in range(3):
        glb = write_plain_glb(tmp_path / f"o{k}.glb", centre=(0.1 * k, 0, 0), size=0.3 + 0.1 * k)
        res = renderer.render(f"o{k}", glb, cameras_for(f"o{k}", cfg), blender_settings(cfg), tmp_path / f"o{k}",
                              timeout_s=60)
        assert res.ok, (res.reason, res.log_tail)
        assert res.startup_seconds == 0
        seconds.append(res.seconds)
    assert renderer.pid == pid and renderer.startups == startups
    print(f"startup {renderer.startup_seconds[0]:.2f}s; per object {np.round(seconds, 2).tolist()}s")


def test_hang_times_out_and_crash_reports_log_then_next_object_renders(tmp_path):
    from geco.render.blender.worker import BlenderRenderer

    cfg = _render_config(res=32, n_random=0, samples=4)
    settings = blender_settings(cfg)
    glb = write_plain_glb(tmp_path / "ok.glb")
    with BlenderRenderer(log_dir=tmp_path / "logs", env={faults.ENV: "hang:stuck,crash:boom"}) as r:
        res = r.render("stuck", glb, cameras_for("stuck", cfg), settings, tmp_path / "stuck", timeout_s=4)
        assert not res.ok and "timed out" in res.reason, res.reason
        assert "hanging on stuck" in res.log_tail
        assert not r.alive and r.startups == 1

        res = r.render("fine", glb, cameras_for("fine", cfg), settings, tmp_path / "fine", timeout_s=60)
        assert res.ok, (res.reason, res.log_tail)
        assert r.startups == 2 and res.startup_seconds > 0

        res = r.render("boom", glb, cameras_for("boom", cfg), settings, tmp_path / "boom", timeout_s=60)
        assert not res.ok and "died" in res.reason and "status 1" in res.reason, res.reason
        assert "crashing mid-render on boom" in res.log_tail
        assert not (tmp_path / "boom" / "meta.json").exists()

        res = r.render("fine2", glb, cameras_for("fine2", cfg), settings, tmp_path / "fine2", timeout_s=60)
        assert res.ok, (res.reason, res.log_tail)
        assert r.startups == 3


def test_fresh_process_and_recycling(tmp_path, monkeypatch):
    """Fresh processes, recycled ones: and none leaves a temporary folder behind (Blender's own
    blender_XXXXXX, which its os._exit never removes, lives inside the renderer's and goes with it)."""
    from geco.render.blender.worker import BlenderRenderer

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    cfg = _render_config(res=32, n_random=0, samples=2)
    settings = blender_settings(cfg)
    glb = write_plain_glb(tmp_path / "ok.glb")
    with BlenderRenderer(log_dir=tmp_path / "a", fresh_process=True) as r:
        for k in range(2):
            res = r.render(f"f{k}", glb, cameras_for(f"f{k}", cfg), settings, tmp_path / f"f{k}", timeout_s=60)
            assert res.ok and res.startup_seconds > 0, res.reason
            assert not r.alive and r.last_exit_code == 0
        assert r.startups == 2
    with BlenderRenderer(log_dir=tmp_path / "b", max_objects_per_process=2) as r:
        for k in range(3):
            res = r.render(f"g{k}", glb, cameras_for(f"g{k}", cfg), settings, tmp_path / f"g{k}", timeout_s=60)
            assert res.ok, res.reason
        assert r.startups == 2
    assert list(tmp.iterdir()) == []


def test_startup_failure_is_a_failed_result_not_an_exception(tmp_path):
    from geco.render.blender.worker import BlenderRenderer

    with BlenderRenderer(log_dir=tmp_path / "logs", python="/bin/false", startup_timeout_s=30) as r:
        res = r.render("x", tmp_path / "x.glb", [], {}, tmp_path / "out", timeout_s=5)
    assert not res.ok and res.reason.startswith("renderer start-up failed"), res.reason


def test_pytest_process_never_imported_bpy():
    import sys

    assert "bpy" not in sys.modules and "blenderproc" not in sys.modules
