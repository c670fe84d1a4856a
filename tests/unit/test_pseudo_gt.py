"""geco.pseudo_gt without Ray: the cameras, the checks, the hashes, and what a pseudo-GT sample holds
(decoded with decode_sample, its .ply rendered again at its cameras); `geco pseudo-gt` refusing bad
input in one line before any work."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from geco.cameras import Camera
from geco.config import load_config
from geco.data.schema import decode_sample
from geco.export import load_ply
from geco.gaussians import Gaussians
from geco.pseudo_gt import (
    DEPTH_MIN_ALPHA,
    PseudoGT,
    PseudoGTError,
    PseudoGTSetupError,
    check_fit,
    initial_noise,
    view_cameras,
)
from geco.render.splat import render_gaussians
from tests.fake_renders import render_sample, write_render_shards

TINY = ["models.teacher.tile_size=16", "models.teacher.cond_size=32", "models.reconstructor.input_size=16",
        "models.reconstructor.lgm.down_channels=[8,16,32]", "models.reconstructor.lgm.down_attention=[false,false,true]",
        "models.reconstructor.lgm.up_channels=[32,16]", "models.reconstructor.lgm.up_attention=[true,false]",
        "models.reconstructor.lgm.num_heads=2", "models.reconstructor.lgm.norm_groups=4",
        "models.reconstructor.lgm.layers_per_block=1", "pseudo_gt.steps=3", "pseudo_gt.num_views=10",
        "pseudo_gt.resolution=24", "tracking.enabled=false"]


def source_cameras(key: str) -> list[dict]:
    return json.loads(render_sample(key)["cameras.json"])


def test_views_are_the_render_samples_zero123_poses_then_seeded_random_ones():
    cfg = load_config(None, TINY + ["pseudo_gt.random_elevation_range=[-90,90]", "pseudo_gt.random_radius=1.5"]).pseudo_gt
    src = source_cameras("obj-a")
    cams = view_cameras("obj-a", src, cfg)
    assert len(cams) == 10 and [c.kind for c in cams] == ["zero123"] * 6 + ["random"] * 4
    for c, s in zip(cams[:6], src[1:7]):  # the render sample's poses (relative to its cond view), at our size
        assert (c.azimuth_deg, c.elevation_deg, c.fov_deg, c.radius) == (
            s["azimuth_deg"], s["elevation_deg"], s["fov_deg"], s["radius"])
        assert (c.width, c.height) == (24, 24) and s["width"] == 32
    assert all(-90 <= c.elevation_deg < 90 and 0 <= c.azimuth_deg < 360 and c.radius == 1.5 for c in cams[6:])
    assert view_cameras("obj-a", src, cfg) == cams  # seeded by (key, seed)
    assert view_cameras("obj-a", src, cfg.model_copy(update={"seed": 1}))[6:] != cams[6:]
    assert view_cameras("obj-b", source_cameras("obj-b"), cfg)[6:] != cams[6:]
    narrow = cfg.model_copy(update={"random_azimuth_range": (10.0, 20.0), "random_elevation_range": (5.0, 6.0)})
    assert all(10 <= c.azimuth_deg < 20 and 5 <= c.elevation_deg < 6 for c in view_cameras("obj-a", src, narrow)[6:])
    with pytest.raises(PseudoGTError, match="'obj-a'.* 0 Zero123\\+\\+ cameras"):
        view_cameras("obj-a", src[:1], cfg)


def test_a_reconstructor_that_does_not_fit_the_teachers_tiles_is_refused():
    check_fit(320, 256, 2.0)  # GECO: 320 px tiles resized to LGM's 256
    check_fit(16, 32, 2.0)  # the demo: upscaled 2x
    with pytest.raises(PseudoGTSetupError, match=r"input_size=256 does not fit models.teacher.tile_size=16.*16.0x"):
        check_fit(16, 256, 2.0)


def test_settings_hash_follows_what_changes_the_samples_only():
    cfg = load_config(None, TINY).pseudo_gt
    h = cfg.settings_hash(4.0)
    assert cfg.model_copy(update={"batch_size": 9, "num_actors": 3, "output_uri": "elsewhere"}).settings_hash(4.0) == h
    assert cfg.model_copy(update={"guidance_scale": 4.0}).settings_hash(1.0) == h  # None = the teacher's
    assert cfg.settings_hash(3.0) != h
    assert cfg.model_copy(update={"steps": 75}).settings_hash(4.0) != h
    assert cfg.model_copy(update={"resolution": 32}).settings_hash(4.0) != h


@pytest.fixture(scope="module")
def pseudo_gt():
    from geco.models.reconstructors import build_reconstructor
    from geco.models.teacher import build_tiny_teacher

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    return PseudoGT(build_tiny_teacher(cfg.models.teacher), build_reconstructor(cfg.models.reconstructor).eval(),
                    cfg.pseudo_gt)


def test_samples_decode_and_their_ply_renders_what_their_views_show(pseudo_gt):
    good = [render_sample(k) for k in ("obj-a", "obj-b")]
    broken = render_sample("obj-broken", broken=True)
    no_cond = render_sample("obj-nocond", with_cond=False)
    results = pseudo_gt.run([good[0], broken, good[1], no_cond])
    assert isinstance(results[1], PseudoGTError) and "'obj-broken'" in str(results[1])
    assert isinstance(results[3], PseudoGTError) and "'obj-nocond': no conditioning view" in str(results[3])
    teacher = pseudo_gt.teacher
    for src, res in ((good[0], results[0]), (good[1], results[2])):
        m = res.members
        assert m["cond.png"] == src["cond.png"]
        d = decode_sample({"__key__": res.key, **m, "meta.json": b"{}"}, with_normals=False)
        assert d["zero123"]["names"] == [f"{i:03d}" for i in range(6)]
        assert d["random"]["names"] == [f"{i:03d}" for i in range(6, 10)]
        assert d["zero123"]["rgb"].shape == (6, 3, 24, 24) and d["random"]["depth"].shape == (4, 1, 24, 24)
        assert d["cameras"][0] == dict(json.loads(src["cameras.json"])[0], name="cond")
        noise = np.load(io.BytesIO(m["noise.npy"]))
        assert noise.dtype == np.float32 and noise.shape == teacher.latent_shape(1)[1:]
        assert torch.equal(torch.from_numpy(noise), initial_noise(res.key, 0, noise.shape))
        grid = np.asarray(Image.open(io.BytesIO(m["teacher.png"])))
        assert grid.shape == (3 * 16, 2 * 16, 3)
        # the .ply read back, rendered at the stored cameras, gives the stored views (8-bit rounding apart)
        ply = load_ply(io.BytesIO(m["gaussians.ply"]))
        g = Gaussians(ply.means, ply.quats, ply.scales, ply.opacities, ply.rgb)
        for group in ("zero123", "random"):
            v = d[group]
            rgb, alpha = render_gaussians(g, v["w2c"], v["K"], 24, 24, background=1.0)
            assert (alpha[0] - v["alpha"]).abs().max() < 2.5 / 255
            assert (rgb[0] - v["rgb"]).abs().max() < 4 / 255, (rgb[0] - v["rgb"]).abs().max()
            assert v["alpha"].max() > 0.5  # the Gaussians are seen
            surface = v["alpha"] >= 0.5
            assert (v["depth"][~surface] == 0).all() and (v["depth"][surface] > 0.2).all()
        # the cameras are the ones view_cameras gives
        expect = view_cameras(res.key, json.loads(src["cameras.json"]), pseudo_gt.cfg)
        stored = [Camera.from_dict({k: c[k] for k in c if k != "name"}) for c in d["cameras"][1:]]
        assert stored == expect


@pytest.mark.parametrize("chunk", [10, 2])  # 3 objects x 1 view a call; 2 objects x 1 view, then 1 x 2
def test_objects_rendered_together_get_the_views_they_get_alone(pseudo_gt, monkeypatch, chunk):
    """PseudoGT rasterizes several objects' views in one call (RENDER_CHUNK (object, view) pairs):
    each object's images are the ones it renders by itself, to 1e-6 (float rounding apart: the
    rasterizer's tile edge follows the call's radii), and so are its stored members."""
    import geco.pseudo_gt as pgt_module

    monkeypatch.setattr(pgt_module, "RENDER_CHUNK", chunk)
    samples = [render_sample(k) for k in ("obj-a", "obj-b", "obj-c")]
    results = pseudo_gt.run(samples)
    g = Gaussians(*(torch.stack([getattr(r.gaussians, f) for r in results])
                    for f in ("means", "quats", "scales", "opacities", "rgb")))  # fmt: skip
    cams = [view_cameras(r.key, json.loads(s["cameras.json"]), pseudo_gt.cfg) for r, s in zip(results, samples)]
    viewmats = torch.tensor(np.stack([[c.w2c_opencv for c in cs] for cs in cams]), dtype=torch.float32)
    Ks = torch.tensor(np.stack([[c.K for c in cs] for cs in cams]), dtype=torch.float32)
    objects = min(3, chunk)  # the calls _render makes
    views = max(1, chunk // objects)
    for o in range(0, 3, objects):
        for v in range(0, 10, views):
            sl = (slice(o, o + objects), slice(v, v + views))
            rgb, alpha = render_gaussians(g[sl[0]], viewmats[sl], Ks[sl], 24, 24, background=0.0, render_mode="RGB+ED")
            for b in range(rgb.shape[0]):
                rgb_b, alpha_b = render_gaussians(g[o + b], viewmats[o + b], Ks[o + b], 24, 24, background=0.0,
                                                  render_mode="RGB+ED")  # fmt: skip
                torch.testing.assert_close(rgb[b, :, :3], rgb_b[0, sl[1], :3], atol=1e-6, rtol=0)
                torch.testing.assert_close(alpha[b], alpha_b[0, sl[1]], atol=1e-6, rtol=0)
                # depth = accumulated z / alpha: relative rounding, where it is stored (alpha >= 0.5)
                surface = alpha[b, :, 0] >= DEPTH_MIN_ALPHA
                torch.testing.assert_close(rgb[b, :, 3][surface], rgb_b[0, sl[1], 3][surface], atol=0, rtol=1e-6)
    # the members: run() stores _render's; alone, the same up to 8-bit / float16 rounding
    alone = [pseudo_gt._render(g[b:b + 1], [cams[b]])[0] for b in range(3)]
    for r, own in zip(results, alone):
        assert sorted(own) == sorted(f"{i:03d}.{ext}" for i in range(10) for ext in ("png", "depth.npy"))
        for name, data in own.items():
            if name.endswith(".png"):
                png = [np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (r.members[name], data)]
                assert np.abs(png[0] - png[1]).max() <= 1
            else:
                depth = [np.load(io.BytesIO(x)).astype(np.float32) for x in (r.members[name], data)]
                np.testing.assert_allclose(depth[0], depth[1], rtol=2e-3, atol=0)


def test_pseudo_gt_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from cli.main import main

    base = ["pseudo-gt", "--output", str(tmp_path / "pgt"), "--teacher", "tiny", "--set", f"pretrain.output_uri={tmp_path / 'none'}"]
    for o in TINY:
        base += ["--set", o]

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("geco: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no shard manifest; run `geco render` first" in refused("--data", str(tmp_path / "empty"))
    write_render_shards(tmp_path / "nocond", ["obj-a", "obj-b"], without_cond=True)
    err = refused("--data", str(tmp_path / "nocond"))
    assert f"{tmp_path / 'nocond' / 'shard-000000.tar'}: sample 'obj-a' has no conditioning view" in err
    write_render_shards(tmp_path / "renders", ["obj-a"])
    err = refused("--data", str(tmp_path / "renders"), "--set", "models.reconstructor.input_size=64")
    assert "models.reconstructor.input_size=64 does not fit models.teacher.tile_size=16" in err
    err = refused("--data", str(tmp_path / "renders"), "--output", str(tmp_path / "renders"))
    assert "is the render dataset itself" in err
    assert not (tmp_path / "pgt").exists()


def test_the_tiny_teacher_asked_for_by_name_hashes_like_no_files(tmp_path):
    """``--teacher tiny`` (the DAG hands it on from stage 1) has no files to list: its hash follows
    from the settings, as an empty teacher's does; a real folder's files change it."""
    from pipelines.pseudo_gt import model_hashes
    from pipelines.stage import PseudoGTInputs

    cfg = load_config(None, [])
    tiny = model_hashes(cfg, PseudoGTInputs(str(tmp_path / "shards"), "tiny", ""))
    assert tiny == model_hashes(cfg, PseudoGTInputs(str(tmp_path / "shards"), "", ""))
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert model_hashes(cfg, PseudoGTInputs("", str(folder), ""))["teacher"] != tiny["teacher"]
