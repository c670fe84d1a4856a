"""`geco generate` end to end on a tiny random checkpoint: input images of many kinds -> .ply (3DGS
layout), views PNG, turntable GIF, timing lines; clear errors with exit status 2; checkpoint bundles
from a local folder, an S3 prefix (a real S3 server) and MLflow runs:/ and models:/ URIs."""
from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from plyfile import PlyData

from cli.main import main
from geco.generate import OBJECT_FRACTION, ImageInputError, object_frame_fraction, prepare_image
from geco.models.bundle import (
    CheckpointError,
    MissingUNet,
    load_bundle,
    log_bundle,
    read_manifest,
    register_bundle,
    resolve_checkpoint,
    save_bundle,
)

S = 64  # prepare_image side in these tests
GS_LAYOUT = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
FAST = ["--turntable-frames", "4", "--turntable-size", "32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GECO_CACHE", str(tmp_path / "geco-cache"))


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def _ellipse(h, w, cy=0.45, cx=0.55, ry=0.3, rx=0.2):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 < 1


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) written by hand: PIL cannot write these."""
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    out = {}
    m = _ellipse(90, 120)
    rgba = np.zeros((90, 120, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, np.linspace(0, 255, 120)[None].astype(np.uint8), m * 255
    Image.fromarray(rgba).save(out.setdefault("rgba", d / "object.png"))
    rgb = np.full((90, 120, 3), 255, np.uint8)
    rgb[m] = (30, 120, 200)
    Image.fromarray(rgb).save(out.setdefault("white_jpeg", d / "on_white.jpg"), quality=90)
    # 16-bit grey, odd size, white background
    g16 = np.full((61, 97), 65535, np.uint16)
    g16[_ellipse(61, 97)] = 9000
    Image.fromarray(g16).save(out.setdefault("grey16", d / "grey16.png"))
    # 16-bit RGBA, odd size (hand-written: PIL cannot)
    a16 = np.zeros((53, 71, 4), np.uint16)
    a16[..., 2], a16[..., 3] = 40000, _ellipse(53, 71) * 65535
    out["rgba16"] = d / "rgba16.png"
    out["rgba16"].write_bytes(_png16(a16))
    # palette with a transparent index, grey + alpha
    pal = Image.fromarray(rgba).convert("RGB").quantize(8)
    pidx = np.asarray(pal).copy()
    pidx[~m] = 7
    pal = Image.fromarray(pidx, "P")
    pal.putpalette(Image.fromarray(rgba).convert("RGB").quantize(8).getpalette())
    pal.info["transparency"] = 7
    pal.save(out.setdefault("palette", d / "palette.png"), transparency=7)
    la = np.stack([np.full((90, 120), 90, np.uint8), (m * 255).astype(np.uint8)], -1)
    Image.fromarray(la, "LA").save(out.setdefault("la", d / "grey_alpha.png"))
    busy = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(busy).save(out.setdefault("photo", d / "photo.jpg"))
    (d / "notes.png").write_text("this is not a picture")
    out["not_image"] = d / "notes.png"
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(out.setdefault("transparent", d / "empty.png"))
    return out


def _bbox(alpha: torch.Tensor):
    ys, xs = torch.nonzero(alpha[0] > 0.5, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_object_fraction_of_the_conditioning_renders():
    # sphere of diameter 1 at the origin, camera at 1.5, FOV 49.1: tan(asin(1/3)) / tan(24.55 deg)
    assert OBJECT_FRACTION == pytest.approx(0.7740, abs=1e-4)
    assert object_frame_fraction(49.1, 1.5) == OBJECT_FRACTION
    assert object_frame_fraction(49.1, 3.0) < OBJECT_FRACTION


@pytest.mark.parametrize("kind", ["rgba", "white_jpeg", "grey16", "rgba16", "palette", "la"])
def test_prepare_image_frames_the_object_like_the_cond_renders(images, kind):
    rgb, alpha = prepare_image(images[kind], S)
    assert rgb.shape == (3, S, S) and alpha.shape == (1, S, S)
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    top, bottom, left, right = _bbox(alpha)
    assert max(bottom - top, right - left) == pytest.approx(OBJECT_FRACTION * S, abs=2.0)
    assert (top + bottom) / 2 == pytest.approx(S / 2, abs=1.5) and (left + right) / 2 == pytest.approx(S / 2, abs=1.5)
    # composited on white: the corners are white, the object is not
    assert torch.all(rgb[:, :2, :2] > 0.98)
    assert float(rgb[:, S // 2, S // 2].min()) < 0.9


def test_prepare_image_arrays_and_tensors(images):
    ref, ref_a = prepare_image(images["rgba"], S)
    arr = np.asarray(Image.open(images["rgba"]))
    for src in (arr, arr.astype(np.uint16) * 257, arr.astype(np.float32) / 255,
                torch.from_numpy(arr).permute(2, 0, 1).float() / 255, Image.open(images["rgba"])):
        rgb, a = prepare_image(src, S)
        torch.testing.assert_close(rgb, ref, atol=2e-3, rtol=0)
        torch.testing.assert_close(a, ref_a, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind,match", [
    ("photo", "RGBA image.*white background"),
    ("not_image", "not an image"),
    ("transparent", "no object found"),
])
def test_prepare_image_refuses_unusable_inputs(images, kind, match):
    with pytest.raises(ImageInputError, match=match):
        prepare_image(images[kind], S)


def test_prepare_image_missing_file(tmp_path):
    with pytest.raises(ImageInputError, match="no such file"):
        prepare_image(tmp_path / "nope.png", S)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["models", "init-tiny", str(dest)]) == 0
    return dest


def _check_outputs(out: Path, name: str, frames: int = 4):
    ply = PlyData.read(str(out / f"{name}.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert [n for n in names if n in GS_LAYOUT] == GS_LAYOUT  # the 3DGS attributes, in order
    assert all(not n.startswith("f_rest") for n in names)  # RGB colours: SH degree 0
    v = ply["vertex"]
    assert v.count == 6 * 16 * 16  # tiny reconstructor: 6 views x 16^2 Gaussians
    assert np.isfinite(np.stack([v[n] for n in GS_LAYOUT])).all()
    quats = np.stack([v[f"rot_{i}"] for i in range(4)], -1)
    np.testing.assert_allclose(np.linalg.norm(quats, axis=-1), 1.0, atol=1e-4)
    views = Image.open(out / f"{name}_views.png")
    # input + 6 views of 32 px, scaled up 4x to 128 px tiles, 2 px gaps, under a header row of labels
    assert views.size[0] == 7 * (128 + 2) + 2 and 128 + 4 + 8 <= views.size[1] <= 128 + 4 + 40
    gif = Image.open(out / f"{name}_turntable.gif")
    assert gif.n_frames == frames and gif.size == (32, 32)


def _check_outputs_match(out: Path, name: str, result):
    """The files ``geco generate`` wrote hold what :func:`geco.generate.generate` returned: the .ply read
    back with plyfile (raw 3DGS values, activations inverted here), the views PNG tile by tile."""
    from geco.generate import views_image

    g = result.gaussians
    v = PlyData.read(str(out / f"{name}.ply"))["vertex"]

    def col(*names):
        return np.stack([np.asarray(v[n], np.float64) for n in names], -1)

    np.testing.assert_allclose(col("x", "y", "z"), g.means.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1 / (1 + np.exp(-col("opacity")[:, 0])), g.opacities.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.exp(col("scale_0", "scale_1", "scale_2")), g.scales.numpy(), rtol=1e-5, atol=1e-9)
    quats = g.quats.double().numpy()
    np.testing.assert_allclose(col("rot_0", "rot_1", "rot_2", "rot_3"),
                               quats / np.linalg.norm(quats, axis=-1, keepdims=True), rtol=0, atol=1e-6)
    c0 = 0.28209479177387814  # the degree-0 spherical harmonic 1 / (2 sqrt(pi)): colour = C0 * f_dc + 0.5
    np.testing.assert_allclose(c0 * col("f_dc_0", "f_dc_1", "f_dc_2") + 0.5, g.rgb.numpy(), rtol=0, atol=1e-6)
    # the views PNG: the layout of geco.images.labeled_grid, checked here by hand on the generated tiles;
    # a header strip, then 2 px padding and 7 tiles of 32 px scaled up 4x to 128 px with 2 px gaps
    png = np.asarray(Image.open(out / f"{name}_views.png").convert("RGB"))
    np.testing.assert_array_equal(png, views_image(result))
    top = png.shape[0] - (128 + 2 * 2)
    assert (png[:top] < 128).any()  # the labels are drawn
    for k, view in enumerate(result.views, start=1):
        x = 2 + k * (128 + 2)
        tile = png[top + 2:top + 2 + 128, x:x + 128]
        want = view.clamp(0, 1).permute(1, 2, 0).numpy() * 255
        np.testing.assert_allclose(tile[::4, ::4], want, rtol=0, atol=0.51)  # 8-bit rounding
        assert (tile == np.repeat(np.repeat(tile[::4, ::4], 4, 0), 4, 1)).all()  # nearest upscaling, 4 x 4 blocks
    inp = png[top + 2:top + 2 + 128, 2:2 + 128][::4, ::4].astype(np.float64) / 255
    small = F.interpolate(result.input_rgb[None].double(), size=(32, 32), mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(inp - small).mean() < 0.03  # the input tile shows the prepared input


def test_generate_cli_end_to_end(ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", str(images["rgba"]), str(images["white_jpeg"]), str(images["grey16"]),
            "--checkpoint", str(ckpt), "-o", str(out), "--seed", "3", "--device", "cpu", *FAST]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    for name in ("object", "on_white", "grey16"):
        _check_outputs(out, name)
    lines = [ln for ln in stdout.splitlines() if " -> " in ln]
    assert len(lines) == 3
    # what was written is what the API returns for the same image and seed
    from geco.generate import generate

    [r] = generate(load_bundle(ckpt), images["rgba"], seed=3)
    assert r.evals["unet"] == 2 and r.evals["unet_denoise"] == 1 and r.evals["unet_reference"] == 1
    assert r.evals["reconstructor"] == 1 and r.evals["vae_decoder"] == 1 and r.evals["vision_encoder"] == 1
    assert r.timings["generator_s"] > 0 and r.timings["reconstructor_s"] > 0
    assert r.views.shape == (6, 3, 32, 32) and r.gaussians.means.shape == (1536, 3)
    _check_outputs_match(out, "object", r)
    for ln in lines:
        assert "seed 3" in ln and "UNet calls 2: 1 denoising + 1 reference" in ln
        assert "reconstructor" in ln and "1 call" in ln and "export" in ln
    # same seed -> the same object; two samples -> _s0/_s1 with seeds 3 and 4, s0 identical to the above
    out2 = tmp_path / "out2"
    assert main(["generate", str(images["rgba"]), "--checkpoint", str(ckpt), "-o", str(out2), "--seed", "3",
                 "--num-samples", "2", *FAST]) == 0
    for k in (0, 1):
        _check_outputs(out2, f"object_s{k}")
    first = PlyData.read(str(out / "object.ply"))["vertex"]
    s0, s1 = (PlyData.read(str(out2 / f"object_s{k}.ply"))["vertex"] for k in (0, 1))
    assert np.array_equal(first["x"], s0["x"]) and np.array_equal(first["f_dc_0"], s0["f_dc_0"])
    assert not np.array_equal(s0["f_dc_0"], s1["f_dc_0"])


@pytest.mark.parametrize("case,match", [
    ("photo", "Provide an RGBA image.*white background"),
    ("missing", "no such file"),
    ("not_image", "not an image"),
    ("no_manifest", "no geco.json at .*not a GECO checkpoint; expected layout"),
    ("no_reconstructor", "incomplete: missing reconstructor/model.safetensors"),
    ("missing_checkpoint", "no such checkpoint folder"),
])
def test_generate_cli_errors_exit_2(ckpt, images, tmp_path, capsys, case, match):
    image, checkpoint = str(images["rgba"]), str(ckpt)
    if case in ("photo", "not_image"):
        image = str(images[case])
    elif case == "missing":
        image = str(tmp_path / "missing.png")
    elif case == "no_manifest":
        checkpoint = str(tmp_path / "plain")
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "model.safetensors").write_bytes(b"")
    elif case == "no_reconstructor":
        broken = tmp_path / "broken"
        shutil.copytree(ckpt, broken)
        (broken / "reconstructor" / "model.safetensors").unlink()
        checkpoint = str(broken)
    elif case == "missing_checkpoint":
        checkpoint = str(tmp_path / "nowhere")
    rc = main(["generate", image, "--checkpoint", checkpoint, "-o", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("geco: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _png_header_only(w: int, h: int) -> bytes:
    """A grey 8-bit PNG that declares w x h pixels but holds no pixel data: what a decoder sees first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 20000])  # above our limit; above PIL's own (it raises at open)
def test_prepare_image_refuses_decompression_bombs(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageInputError, match=r"bomb.png: .*downscale it"):
        prepare_image(bomb, S)


@pytest.mark.parametrize("case,match", [
    ("output_is_a_file", r"-o .*out: exists and is not a folder"),
    ("output_inside_a_file", r"-o .*sub: cannot write there"),
    ("read_only_output", r"-o .*out: cannot write there"),
    ("negative_turntable_size", r"--turntable-size must be >= 1 pixel, got -8"),
    ("negative_turntable_frames", r"--turntable-frames must be >= 0"),
    ("bomb", r"bomb.png: 9000x9000 pixels is more than"),
])
def test_generate_refuses_bad_requests_before_the_model_runs(ckpt, images, tmp_path, capsys, monkeypatch, case,
                                                             match):
    """Each of these used to fail only after the model ran (with a traceback, or leaving a .ply and a
    views PNG without their GIF): now one line, exit 2, no model loaded and no outputs."""
    import os

    from geco.models import bundle

    monkeypatch.setattr(bundle, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded"))
    out, image, extra = tmp_path / "out", str(images["rgba"]), list(FAST)
    if case == "output_is_a_file":
        out.write_text("a file")
    elif case == "output_inside_a_file":
        out.write_text("a file")
        out = out / "sub"
    elif case == "read_only_output":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out.mkdir()
        out.chmod(0o555)
    elif case == "negative_turntable_size":
        extra = ["--turntable-frames", "4", "--turntable-size", "-8"]
    elif case == "negative_turntable_frames":
        extra = ["--turntable-frames", "-1"]
    elif case == "bomb":
        image = str(tmp_path / "bomb.png")
        Path(image).write_bytes(_png_header_only(9000, 9000))
    rc = main(["generate", image, "--checkpoint", str(ckpt), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("geco: ") and "Traceback" not in err, err
    assert re.search(match, err), err
    written = [p.name for p in tmp_path.rglob("*") if p.suffix in (".ply", ".gif") or p.name.endswith("_views.png")]
    assert written == []


# ------------------------------------------------------------------------------------------------
# bundles
# ------------------------------------------------------------------------------------------------
def test_bundle_layout_and_round_trip(ckpt, tmp_path, capsys):
    m = read_manifest(ckpt)
    assert m["format"] == "geco-checkpoint" and m["version"] == 1 and m["created"].endswith("Z")
    assert set(m["components"]) == {"teacher", "generator", "reconstructor"}
    assert m["components"]["teacher"]["unet_included"] is False
    assert "omitted" in m["components"]["teacher"]["note"]
    assert (ckpt / "teacher" / "unet" / "config.json").is_file()
    assert not (ckpt / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (ckpt / "generator" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (ckpt / "reconstructor" / "model.safetensors").is_file()
    assert m["models"]["teacher"]["tile_size"] == 32
    b = load_bundle(ckpt)
    assert not b.teacher_has_unet and isinstance(b.teacher.unet, MissingUNet)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="teacher UNet is not in this checkpoint"):
        b.teacher.sample(x, num_steps=1)
    lat, _ = b.generator.generate(x, generator=1)
    # re-save with the teacher UNet (a full bundle), reload: the same generator, teacher sampling works
    full = tmp_path / "full"
    with pytest.raises(ValueError, match="no UNet"):
        save_bundle(full, b.teacher, b.generator, b.reconstructor, b.cfg, include_teacher_unet=True)
    save_bundle(full, b.teacher, b.generator, b.reconstructor, b.cfg)  # inference bundle from an inference bundle
    b2 = load_bundle(full)
    torch.testing.assert_close(b2.generator.generate(x, generator=1)[0], lat, atol=0, rtol=0)
    for k, v in b.reconstructor.state_dict().items():
        assert torch.equal(v, b2.reconstructor.state_dict()[k])
    assert main(["models", "init-tiny", str(tmp_path / "with_unet"), "--with-teacher-unet",
                 "--set", "teacher.tile_size=16", "--set", "models.teacher.cond_size=16"]) == 0
    b3 = load_bundle(tmp_path / "with_unet")
    assert b3.teacher_has_unet and b3.teacher.tile_size == 16
    assert b3.teacher.sample(torch.rand(1, 3, 16, 16), num_steps=1).shape == b3.teacher.latent_shape(1)
    # the generator starts as a copy of the teacher UNet, but is a separate module
    assert b3.generator.unet is not b3.teacher.unet
    capsys.readouterr()
    assert main(["models", "info", str(tmp_path / "with_unet")]) == 0
    assert "unet_included': True" in capsys.readouterr().out
    # a folder that is something else is never replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_bundle(tmp_path / "other", b.teacher, b.generator, b.reconstructor, b.cfg)


def test_truncated_and_foreign_checkpoints(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    w = broken / "generator" / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="generator/unet/diffusion_pytorch_model.safetensors has 100 bytes"):
        resolve_checkpoint(broken)
    # a Zero123++ folder is recognised and explained
    with pytest.raises(CheckpointError, match="looks like a Zero123\\+\\+ teacher folder"):
        resolve_checkpoint(ckpt / "teacher")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "geco.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="expected 'geco-checkpoint'"):
        resolve_checkpoint(bad)


@pytest.mark.s3
def test_checkpoint_from_s3(images, s3_bucket, tmp_path, capsys):
    from geco import storage

    uri = storage.join(s3_bucket, "checkpoints", "tiny")
    assert main(["models", "init-tiny", uri]) == 0
    assert storage.exists(storage.join(uri, "geco.json"))
    out = tmp_path / "out"
    assert main(["generate", str(images["rgba"]), "--checkpoint", uri, "-o", str(out), *FAST]) == 0
    _check_outputs(out, "object")
    root = resolve_checkpoint(uri)
    assert root.is_relative_to(tmp_path / "geco-cache")  # downloaded into the cache
    # saved again at the same prefix (same file sizes, other weights): never served from the old cache
    assert main(["models", "init-tiny", uri, "--seed", "1"]) == 0
    root2 = resolve_checkpoint(uri)
    assert root2 != root
    w = "generator/unet/diffusion_pytorch_model.safetensors"
    assert (root / w).stat().st_size == (root2 / w).stat().st_size
    assert (root / w).read_bytes() != (root2 / w).read_bytes()
    capsys.readouterr()
    rc = main(["generate", str(images["rgba"]), "--checkpoint", storage.join(s3_bucket, "nothing"), "-o", str(out)])
    assert rc == 2 and "no geco.json at s3://" in capsys.readouterr().err


def test_checkpoint_through_mlflow(ckpt, images, tmp_path, monkeypatch, capsys):
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("geco-test-generate")
    with mlflow.start_run() as run:
        runs_uri = log_bundle(ckpt, artifact_path="checkpoint")
    assert runs_uri == f"runs:/{run.info.run_id}/checkpoint"
    version = register_bundle(runs_uri, name="geco", alias="production")
    assert version.version in (1, "1")
    for uri in (runs_uri, "models:/geco/1"):
        root = resolve_checkpoint(uri)
        assert (root / "geco.json").is_file() and read_manifest(root)["format"] == "geco-checkpoint"
    out = tmp_path / "out"
    assert main(["generate", str(images["white_jpeg"]), "--checkpoint", "models:/geco@production", "-o", str(out),
                 "--tracking-uri", tracking, *FAST]) == 0
    _check_outputs(out, "on_white")
    capsys.readouterr()
    rc = main(["generate", str(images["rgba"]), "--checkpoint", "models:/geco@staging", "-o", str(out)])
    assert rc == 2 and "MLflow cannot resolve" in capsys.readouterr().err


def test_bundle_written_before_reconstructor_kinds_loads(ckpt, tmp_path):
    """Older bundles kept LGM's architecture flat in models.reconstructor: they load, into the lgm section."""
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    manifest = json.loads((old / "geco.json").read_text())
    rec = manifest["models"]["reconstructor"]
    rec.update(rec.pop("lgm"))
    del rec["kind"]
    (old / "geco.json").write_text(json.dumps(manifest))
    b = load_bundle(old)
    assert b.cfg.reconstructor.kind == "lgm"
    assert b.cfg.reconstructor.lgm == load_bundle(ckpt).cfg.reconstructor.lgm
