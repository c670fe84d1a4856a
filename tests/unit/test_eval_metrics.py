"""geco.eval: geometry metrics on shapes with known answers, the depth -> points -> occupancy path on
analytic depth maps, the image metrics' "unavailable" LPIPS, leakage and result aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geco.cameras import project_points
from geco.eval import geometry as G
from geco.eval.image_metrics import ImageMetrics
from geco.eval.leakage import check_leakage, normalise_name
from geco.eval.results import aggregate, rows_for
from geco.metrics import psnr, ssim
from geco.models.lpips import LPIPS, LPIPSMetric


def fibonacci_sphere(n: int, radius: float = 1.0) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return radius * np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


def cube_occupancy(offset: float = 0.0, grid: int = 64, extent: float = 1.0) -> np.ndarray:
    c = G.grid_centres(grid, extent) - np.array([offset, 0.0, 0.0])
    return (np.abs(c) < 0.5).all(1).reshape(grid, grid, grid)


# -- known shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [0.0, 0.125, 0.25, 0.5])
def test_iou_of_two_unit_cubes_offset_by_d(d):
    """Unit cubes offset by d along x (d a multiple of the 1/32 voxel): IoU = (1 - d) / (1 + d) exactly."""
    iou = G.volume_iou(cube_occupancy(0.0), cube_occupancy(d))
    assert iou == pytest.approx((1 - d) / (1 + d), abs=1e-12)


def test_iou_edge_cases():
    empty = np.zeros((4, 4, 4), bool)
    assert math.isnan(G.volume_iou(empty, empty))
    with pytest.raises(ValueError, match="shape"):
        G.volume_iou(empty, np.zeros((4, 4, 5), bool))


def test_chamfer_and_fscore_on_spheres():
    """A sphere against itself: CD 0, F 1. Concentric spheres r and r + d sampled along the same
    directions: every nearest neighbour is the radial partner, so CD = d exactly."""
    s = fibonacci_sphere(2000, 0.4)
    assert G.chamfer_distance(s, s) == 0.0
    assert G.fscore(s, s, 0.01) == 1.0
    d = 0.03
    bigger = s * (0.4 + d) / 0.4
    assert G.chamfer_distance(s, bigger) == pytest.approx(d, abs=1e-12)
    assert G.fscore(s, bigger, 0.05) == 1.0
    assert G.fscore(s, bigger, 0.02) == 0.0
    assert math.isnan(G.chamfer_distance(s, np.zeros((0, 3))))
    assert G.fscore(np.zeros((0, 3)), s, 0.1) == 0.0


def test_voxel_downsample_averages_each_voxel():
    pts = np.array([[0.0, 0, 0], [0.004, 0, 0], [0.1, 0.1, 0.1], [0.104, 0.1, 0.1], [0.5, 0.5, 0.5]])
    out = G.voxel_downsample(pts, 0.01)
    assert len(out) == 3
    assert sorted(map(tuple, np.round(out, 6))) == [(0.002, 0, 0), (0.102, 0.1, 0.1), (0.5, 0.5, 0.5)]


# -- depth maps -> points / occupancy -------------------------------------------------------------
def sphere_depths(cams, radius: float, centre=(0.0, 0.0, 0.0)):
    """Analytic z-depth maps of a sphere (ray casting through pixel centres)."""
    depths, masks, Ks, w2cs = [], [], [], []
    for c in cams:
        K, c2w = c.K, c.c2w_opencv
        v, u = np.mgrid[0:c.height, 0:c.width] + 0.5
        dirs_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
        dirs = dirs_cam @ c2w[:3, :3].T  # not unit: t along it is the z-depth
        o = c2w[:3, 3] - np.asarray(centre)
        a = (dirs ** 2).sum(-1)
        b = 2 * (dirs @ o)
        cc = o @ o - radius ** 2
        disc = b ** 2 - 4 * a * cc
        hit = disc > 0
        t = np.where(hit, (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a), 0.0)
        depths.append(t)
        masks.append(hit)
        Ks.append(K)
        w2cs.append(c.w2c_opencv)
    return {"depths": depths, "masks": masks, "Ks": Ks, "w2cs": w2cs}


def test_backprojection_inverts_projection():
    cam = G.geometry_cameras(16, resolution=32)[5]
    d = sphere_depths([cam], 0.4)
    pts = G.backproject_depth(d["depths"][0], cam.K, cam.w2c_opencv, d["masks"][0])
    assert len(pts) > 50
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 0.4, atol=1e-9)  # on the sphere
    uv, z = project_points(pts, cam.w2c_opencv, cam.K)
    assert ((uv % 1.0) == pytest.approx(0.5, abs=1e-6))  # back at pixel centres
    assert (z > 0).all()


def test_geometry_metrics_from_analytic_depth_maps():
    """The whole path on exact depth maps: a sphere against itself scores CD 0 / IoU 1 / F 1; its
    points lie on the sphere; the carved occupancy is close to the true ball; a shifted sphere
    scores worse on every metric, by about the shift."""
    cams = G.geometry_cameras(16, (30.0, -30.0), resolution=64)
    ball = sphere_depths(cams, 0.4)
    settings = G.GeometrySettings(fscore_thresholds=(0.05, 0.02))
    same = G.geometry_metrics(ball, ball, settings)
    assert same["cd"] == 0.0 and same["viou"] == 1.0 and same["fscore"] == 1.0 and same["fscore_0.02"] == 1.0
    pts = G.points_from_depths(ball["depths"], ball["masks"], ball["Ks"], ball["w2cs"])
    assert np.abs(np.linalg.norm(pts, axis=1) - 0.4).max() < 0.01
    occ = G.carve_occupancy(ball["depths"], ball["masks"], ball["Ks"], ball["w2cs"])
    truth = (np.linalg.norm(G.grid_centres(), axis=1) < 0.4).reshape(64, 64, 64)
    assert G.volume_iou(occ, truth) > 0.85  # the depth-refined visual hull of a ball from 16 views
    shifted = G.geometry_metrics(sphere_depths(cams, 0.4, (0.1, 0.0, 0.0)), ball, settings)
    assert 0.03 < shifted["cd"] < 0.1
    assert shifted["viou"] < 0.8 and shifted["fscore_0.02"] < shifted["fscore"] < 1.0


def test_geometry_cameras_follow_syncdreamer_layout():
    cams = G.geometry_cameras(16, (30.0,), radius=1.5, fov_deg=49.1, resolution=256)
    assert [c.azimuth_deg for c in cams] == [22.5 * k for k in range(16)]
    assert {c.elevation_deg for c in cams} == {30.0} and {c.kind for c in cams} == {"geometry"}
    alt = G.geometry_cameras(4, (30.0, -30.0))
    assert [c.elevation_deg for c in alt] == [30.0, -30.0, 30.0, -30.0]


# -- image metrics --------------------------------------------------------------------------------
def _pair(seed=0, shape=(3, 3, 24, 24)):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    return a, (a + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)


def test_image_metrics_without_lpips_weights_report_unavailable():
    a, b = _pair()
    m = ImageMetrics(LPIPSMetric(None, "no alex backbone weights in /nowhere"))
    out = m(b, a)
    assert out["psnr"] == pytest.approx(psnr(b, a).tolist()) and out["ssim"] == pytest.approx(ssim(b, a).tolist())
    assert out["lpips"] is None
    assert "lpips" in m.unavailable and "/nowhere" in m.unavailable["lpips"]


def test_image_metrics_with_an_lpips_model():
    a, b = _pair(1, (3, 3, 40, 40))
    torch.manual_seed(0)
    model = LPIPS("alex")
    m = ImageMetrics(LPIPSMetric(model), batch=2)
    out = m(b, a)
    assert m.unavailable == {}
    assert out["lpips"] == pytest.approx(model(b, a).flatten().tolist(), abs=1e-6)
    assert m(a, a)["lpips"] == pytest.approx([0.0] * 3, abs=1e-6)
    small = _pair(2, (1, 3, 16, 16))
    assert m(*small)["lpips"] is None and "below AlexNet" in m.unavailable["lpips"]


# -- leakage and aggregation ----------------------------------------------------------------------
def _hash(content: str, settings: str) -> str:
    return f"{content}:{settings}"


def _manifest(samples, settings="s1"):
    return {"settings_hash": settings, "shards": [{"samples": samples}]}


def test_leakage_by_content_hash_and_by_name():
    objs = [{"object_id": "gso-chicken", "name": "chicken", "content_hash": "c1"},
            {"object_id": "gso-teapot", "name": "teapot", "content_hash": "c2"}]
    clean = check_leakage(objs, [_manifest([{"key": "procedural-0001", "content_hash": "c9:s1"}])], _hash, "d")
    assert clean["clean"] and clean["checked"] and not clean["names"] and not clean["hashes"]
    # the teapot's bytes were rendered for training under another name, with an older render setting
    by_hash = check_leakage(objs, [_manifest([], "s0"), _manifest([{"key": "x-17", "content_hash": "c2:s0"}])],
                            _hash, "d")
    assert not by_hash["clean"] and by_hash["hashes"] == ["gso-teapot"] and "LEAKAGE" in by_hash["detail"]
    by_name = check_leakage(objs, [_manifest([{"key": "gso-Chicken", "content_hash": "zz"}])], _hash, "d")
    assert not by_name["clean"] and by_name["names"] == ["gso-chicken ~ gso-Chicken"]
    unchecked = check_leakage(objs, [], _hash, "outputs/shards")
    assert unchecked["clean"] is False and unchecked["checked"] is False and "not checked" in unchecked["detail"]
    assert normalise_name("gso-CHICKEN_NESTING") == normalise_name("chicken-nesting") == "chickennesting"


def test_aggregate_means_over_objects_and_keeps_unavailable_null():
    rows = []
    for obj, p, cd in (("a", 10.0, 0.1), ("b", 20.0, float("nan"))):
        scores = {"zero123": {"psnr": p, "ssim": 0.5, "lpips": None}, "orbit": {"psnr": p + 1, "ssim": 0.4, "lpips": None},
                  "geometry": {"cd": cd, "viou": 0.5, "fscore": 0.7}}
        rows += rows_for(obj, "stage1", scores, {"seconds_generate": 1.0, "seconds_reconstruct": 0.5}, ["zero123", "orbit"])
    assert len(rows) == 4 and rows[1]["view_set"] == "orbit" and rows[3]["cd"] is None
    metrics, missing = aggregate(rows, ["stage1"], ["zero123", "orbit"])
    m = metrics["stage1"]
    assert m["gso/zero123/psnr"] == 15.0 and m["gso/orbit/psnr"] == 16.0
    assert m["gso/zero123/lpips"] is None
    assert m["gso/orbit/cd"] == pytest.approx(0.1) and missing["stage1"]["gso/orbit/cd"] == 1
    assert m["gso/zero123/seconds_generate"] == 1.0
