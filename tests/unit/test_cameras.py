"""Camera conventions: every test here pins down one thing the rest of the pipeline relies on."""

import json
import math

import numpy as np
import pytest
import torch

from geco.cameras import (
    ZERO123PP_AZIMUTH_OFFSETS,
    Camera,
    fov_from_intrinsics,
    intrinsics_from_fov,
    look_at_c2w_opengl,
    object_rng,
    opencv_to_opengl,
    opengl_to_opencv,
    orbit_position,
    plucker_rays,
    project_points,
    sample_object_cameras,
    zero123pp_cameras,
    zero123pp_grid_position,
)

R = 2.0


def _cam(az, el, kind="random", w=64, h=64, fov=40.0, r=R):
    return Camera(kind=kind, width=w, height=h, fov_deg=fov, radius=r, azimuth_deg=az, elevation_deg=el)


@pytest.mark.parametrize(
    "az, el, expected",
    [
        (0, 0, (R, 0, 0)),
        (90, 0, (0, R, 0)),
        (180, 0, (-R, 0, 0)),
        (270, 0, (0, -R, 0)),
        (0, 90, (0, 0, R)),
        (0, -90, (0, 0, -R)),
        (45, 30, (R * math.cos(math.radians(30)) / math.sqrt(2),) * 2 + (R * 0.5,)),
    ],
)
def test_orbit_position_known_angles(az, el, expected):
    np.testing.assert_allclose(orbit_position(az, el, R), expected, atol=1e-12)


def test_blender_pose_matches_known_euler():
    # A Blender camera at (0, -r, 0) looking at the origin with z up has rotation Euler XYZ (90°, 0, 0).
    c2w = _cam(270, 0).c2w_opengl
    rx90 = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float)
    np.testing.assert_allclose(c2w[:3, :3], rx90, atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 3], (0, -R, 0), atol=1e-12)


@pytest.mark.parametrize("el", [-90.0, -89.999, -30.0, 0.0, 45.0, 89.999, 90.0])
@pytest.mark.parametrize("az", [0.0, 77.0, 200.0])
def test_pose_is_rigid_and_looks_at_origin(az, el):
    cam = _cam(az, el)
    for c2w in (cam.c2w_opengl, cam.c2w_opencv):
        rot = c2w[:3, :3]
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
    # OpenCV looks down +z, OpenGL down -z: both at the origin.
    np.testing.assert_allclose(cam.c2w_opencv[:3, 2], -cam.position / R, atol=1e-12)
    np.testing.assert_allclose(cam.c2w_opengl[:3, 2], cam.position / R, atol=1e-12)
    # World +z never points down in the image (OpenGL camera y is up).
    assert cam.c2w_opengl[2, 1] >= -1e-12


def test_pose_is_continuous_through_the_pole():
    near = _cam(40, 89.99).c2w_opengl[:3, :3]
    at = _cam(40, 90).c2w_opengl[:3, :3]
    np.testing.assert_allclose(near, at, atol=1e-3)


def test_look_at_degenerate_up_still_valid():
    c2w = look_at_c2w_opengl((0, 0, 3))  # looking straight down, up = +z parallel to the view
    assert np.all(np.isfinite(c2w))
    np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 2], (0, 0, 1), atol=1e-12)


def test_opengl_opencv_round_trip():
    c2w = _cam(123, 17).c2w_opengl
    cv = opengl_to_opencv(c2w)
    assert not np.allclose(cv, c2w)
    np.testing.assert_allclose(cv[:3, 0], c2w[:3, 0])  # x kept
    np.testing.assert_allclose(cv[:3, 1:3], -c2w[:3, 1:3])  # y, z flipped
    np.testing.assert_allclose(cv[:3, 3], c2w[:3, 3])  # centre kept
    np.testing.assert_allclose(opencv_to_opengl(cv), c2w)
    # torch and batched inputs work the same way
    t = torch.from_numpy(np.stack([c2w, c2w]))
    np.testing.assert_allclose(opengl_to_opencv(t).numpy(), np.stack([cv, cv]))


def test_w2c_inverts_c2w():
    cam = _cam(311, -12)
    np.testing.assert_allclose(cam.w2c_opencv @ cam.c2w_opencv, np.eye(4), atol=1e-12)


def test_origin_projects_to_image_centre_for_every_view_kind():
    for cam in sample_object_cameras("obj", 0, cond_resolution=100, random_resolution=64):
        uv, z = project_points(np.zeros((1, 3)), cam.w2c_opencv, cam.K)
        np.testing.assert_allclose(uv[0], (cam.width / 2, cam.height / 2), atol=1e-9)
        assert z[0] == pytest.approx(cam.radius)
    assert {c.kind for c in sample_object_cameras("obj", 0)} == {"cond", "zero123", "random"}


@pytest.mark.parametrize(
    "az, right",
    # Facing the origin from +x (looking west) the camera's right is +y (north); from +y it is -x.
    [(0.0, (0, 1, 0)), (90.0, (-1, 0, 0)), (180.0, (0, -1, 0)), (270.0, (1, 0, 0))],
)
def test_handedness_up_and_right(az, right):
    cam = _cam(az, 0.0, w=64, h=48)
    pts = np.array([[0, 0, 0.3], np.array(right) * 0.3])
    uv, z = project_points(pts, cam.w2c_opencv, cam.K)
    assert uv[0, 1] < cam.height / 2  # above the origin -> upper half (v grows downward)
    assert uv[0, 0] == pytest.approx(cam.width / 2)
    assert uv[1, 0] > cam.width / 2  # to the camera's right -> right half
    assert uv[1, 1] == pytest.approx(cam.height / 2)
    assert np.all(z > 0)


def test_fov_spans_image_width():
    # A point at the edge of the FOV cone, on the camera's right, lands on the right image border.
    fov = 40.0
    cam = _cam(0.0, 0.0, w=64, h=64, fov=fov)
    y = R * math.tan(math.radians(fov / 2))
    uv, _ = project_points(np.array([[0, y, 0]]), cam.w2c_opencv, cam.K)
    assert uv[0, 0] == pytest.approx(64.0)


@pytest.mark.parametrize("fov", [10.0, 30.0, 49.1, 90.0, 120.0])
@pytest.mark.parametrize("wh", [(320, 320), (640, 480), (480, 640)])
def test_intrinsics_fov_round_trip(fov, wh):
    K = intrinsics_from_fov(fov, *wh)
    assert fov_from_intrinsics(K, *wh) == pytest.approx(fov)


def test_non_square_intrinsics_fov_spans_larger_dimension():
    landscape = intrinsics_from_fov(60.0, 640, 480)
    portrait = intrinsics_from_fov(60.0, 480, 640)
    f = 320.0 / math.tan(math.radians(30.0))
    np.testing.assert_allclose(landscape, [[f, 0, 320], [0, f, 240], [0, 0, 1]])
    np.testing.assert_allclose(portrait, [[f, 0, 240], [0, f, 320], [0, 0, 1]])
    # the smaller dimension sees a narrower angle
    assert 2 * math.degrees(math.atan(240 / f)) < 60.0


def test_zero123pp_layout():
    cams = zero123pp_cameras(100.0)
    assert len(cams) == 6 and all(c.kind == "zero123" for c in cams)
    assert [c.azimuth_deg for c in cams] == [130.0, 190.0, 250.0, 310.0, 10.0, 70.0]
    assert [c.elevation_deg for c in cams] == [20.0, -10.0] * 3
    assert all((c.width, c.height, c.fov_deg, c.radius) == (320, 320, 30.0, 2.0) for c in cams)
    assert ZERO123PP_AZIMUTH_OFFSETS == (30, 90, 150, 210, 270, 330)
    assert [zero123pp_grid_position(k) for k in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(ValueError):
        zero123pp_grid_position(6)


def test_sample_object_cameras_deterministic_and_in_range():
    a = sample_object_cameras("abc123", 7)
    assert a == sample_object_cameras("abc123", 7)
    assert a != sample_object_cameras("abc124", 7)
    assert a != sample_object_cameras("abc123", 8)
    assert object_rng("x", 1).random() == object_rng("x", 1).random()
    # object_rng must not depend on Python's per-process hash(): pin one value.
    assert object_rng("x", 1).integers(0, 2**31) == np.random.default_rng(
        int.from_bytes(__import__("hashlib").sha256(b"x\x001").digest(), "little")
    ).integers(0, 2**31)

    assert [c.kind for c in a] == ["cond"] + ["zero123"] * 6 + ["random"] * 8
    cond, z123, rand = a[0], a[1:7], a[7:]
    assert (cond.width, cond.fov_deg, cond.radius) == (512, 49.1, 1.5)
    for k, c in enumerate(z123):
        assert c.azimuth_deg == pytest.approx((cond.azimuth_deg + ZERO123PP_AZIMUTH_OFFSETS[k]) % 360)
    assert all((c.width, c.fov_deg, c.radius) == (256, 49.1, 1.5) for c in rand)
    many = [sample_object_cameras(f"obj{i}", 0, num_random=4) for i in range(50)]
    conds = [cams[0] for cams in many]
    rands = [c for cams in many for c in cams[7:]]
    assert all(0 <= c.azimuth_deg < 360 and -10 <= c.elevation_deg <= 40 for c in conds)
    assert all(0 <= c.azimuth_deg < 360 and -20 <= c.elevation_deg <= 50 for c in rands)
    assert len({round(c.azimuth_deg, 6) for c in rands}) == len(rands)  # actually random


def test_plucker_rays():
    cam = _cam(60.0, 25.0, w=8, h=6, fov=50.0)
    c2w = torch.tensor(cam.c2w_opencv)
    K = torch.tensor(cam.K)
    rays = plucker_rays(K, c2w, 6, 8)
    assert rays.shape == (6, 6, 8)
    m, d = rays[:3], rays[3:]
    torch.testing.assert_close(d.norm(dim=0), torch.ones(6, 8, dtype=torch.float64))
    o = torch.tensor(cam.position)[:, None, None].expand_as(d)
    torch.testing.assert_close(m, torch.linalg.cross(o, d, dim=0))
    # every ray goes through its pixel centre: a point along it projects back to (j + .5, i + .5)
    pts = (o + 1.3 * d).permute(1, 2, 0).reshape(-1, 3).numpy()
    uv, _ = project_points(pts, cam.w2c_opencv, cam.K)
    jj, ii = np.meshgrid(np.arange(8) + 0.5, np.arange(6) + 0.5)
    np.testing.assert_allclose(uv, np.stack([jj.ravel(), ii.ravel()], -1), atol=1e-9)

    # the ray through the image centre points at the origin (its moment vanishes)
    even = _cam(60.0, 25.0, w=8, h=8)
    centre = plucker_rays(torch.tensor(even.K), torch.tensor(even.c2w_opencv), 8, 8)
    d_centre = centre[3:, 3:5, 3:5].mean(dim=(1, 2))  # the image centre lies between 4 pixels
    torch.testing.assert_close(
        torch.nn.functional.normalize(d_centre, dim=0), torch.tensor(-even.position / R), atol=1e-12, rtol=0
    )
    odd = _cam(200.0, -5.0, w=9, h=9)
    r_odd = plucker_rays(torch.tensor(odd.K), torch.tensor(odd.c2w_opencv), 9, 9)[:, 4, 4]
    torch.testing.assert_close(r_odd[3:], torch.tensor(-odd.position / R))
    torch.testing.assert_close(r_odd[:3], torch.zeros(3, dtype=torch.float64))

    # batched input gives the per-camera result stacked
    batch = plucker_rays(torch.stack([K, K]), torch.stack([c2w, c2w]), 6, 8)
    assert batch.shape == (2, 6, 6, 8)
    torch.testing.assert_close(batch[1], rays)


def test_camera_dict_round_trip_through_json():
    cams = sample_object_cameras("roundtrip", 3)
    text = json.dumps([c.to_dict() for c in cams])
    back = [Camera.from_dict(d) for d in json.loads(text)]
    assert back == cams
    d = json.loads(text)[0]
    assert set(d) == {"kind", "width", "height", "fov_deg", "radius", "azimuth_deg", "elevation_deg", "K", "w2c"}
    np.testing.assert_allclose(d["w2c"], cams[0].w2c_opencv)
    np.testing.assert_allclose(d["K"], cams[0].K)
    d["w2c"] = opencv_to_opengl(np.linalg.inv(np.array(d["w2c"]))).tolist()  # wrong convention stored
    with pytest.raises(ValueError):
        Camera.from_dict(d)


def test_camera_rejects_unknown_kind():
    with pytest.raises(ValueError):
        _cam(0, 0, kind="side")
