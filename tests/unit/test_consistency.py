"""Stage 2 without Ray: the 3D-consistency step (geco.distill.consistency) and its task
(geco.train.stage2.Stage2Task) on a tiny stage-1 bundle and synthetic pseudo-GT samples.

The samples are what the pseudo-GT stage writes: renders of 3D Gaussians (here a few coloured
blobs per object, made up in :func:`splat_members`) at the conditioning view, the 6 Zero123++ views
and random views, RGBA, with cameras.json and the noise the teacher sampled from (noise.npy).

* one step trains the generator only: the reconstructor and the teacher's encoders stay
  bit-identical and get no gradient; a checkpoint round trip resumes exactly;
* bad samples fail with one line naming the shard and the object;
* (that it does its job on held-out objects is tests/integration/test_stage2_learns.py: it needs a
  teacher that has learnt something, trained on rendered objects);
* the export is a GECO bundle that `geco generate` loads.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from geco.config import load_config
from geco.data.schema import SampleError, sample_from_members
from geco.train.loop import StepPlan, WorkerContext

TILE = 16
MODELS = {"teacher": {"tile_size": TILE, "cond_size": 32, "tiny_clip_image_size": 32},
          "reconstructor": {"input_size": 16, "lgm": {"down_channels": [8, 16, 32], "down_attention": [False, False, True],
                                                      "up_channels": [32, 16], "up_attention": [True, False],
                                                      "num_heads": 2, "norm_groups": 4, "layers_per_block": 1}}}
TINY = ["stage2.lambda_lpips=0", "stage2.views_per_step=4", "stage2.train.steps=4", "stage2.train.lr=1e-3",
        "stage2.train.gradient_checkpointing=false", "stage2.train.max_grad_norm=1.0"]


# ------------------------------------------------------------------------------------------
# synthetic pseudo-GT samples: renders of Gaussians
# ------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def blob_object(seed: int, n: int = 240):
    """One of a family of objects: three ellipsoidal blobs of Gaussians at fixed places inside
    [-0.4, 0.4]^3, each in a colour of its own per seed (objects share their shape, as a class of
    objects does: what the generator learns on some can carry over to others)."""
    from geco.gaussians import Gaussians

    g = torch.Generator().manual_seed(seed)
    parts = 3
    centres = torch.tensor([[0.0, 0.0, -0.15], [0.15, 0.1, 0.1], [-0.15, -0.1, 0.15]])
    colours = torch.rand(parts, 3, generator=g) * 0.8 + 0.1
    part = torch.arange(n) % parts
    means = centres[part] + torch.randn(n, 3, generator=g) * 0.08
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    return Gaussians(means=means, quats=quats, scales=torch.full((n, 3), 0.05), opacities=torch.full((n,), 0.9),
                     rgb=colours[part])


def splat_members(key: str, seed: int, *, num_random: int = 10, noise_shape=(4, 6, 4), size: int = TILE,
                  cond_size: int = 32) -> dict[str, bytes]:
    """A pseudo-GT sample's members: cond.png, 000-005 (Zero123++ poses) + random views rendered from
    :func:`blob_object`, RGBA; cameras.json (cond first); meta.json; noise.npy."""
    from geco.cameras import sample_object_cameras
    from geco.render.splat import render_gaussians

    obj = blob_object(seed)
    cams = sample_object_cameras(key, seed, cond_resolution=cond_size, z123_resolution=size, num_random=num_random,
                                 random_resolution=size, random_elevation_range=(-90.0, 89.0))
    members, dicts = {}, []
    for i, cam in enumerate(cams):
        name = "cond" if i == 0 else f"{i - 1:03d}"
        K = torch.as_tensor(cam.K, dtype=torch.float32)[None]
        w2c = torch.as_tensor(cam.w2c_opencv, dtype=torch.float32)[None]
        with torch.no_grad():
            rgb, alpha = render_gaussians(obj, w2c, K, cam.width, cam.height, background=0.0)
        a = alpha[0, 0].clamp(0, 1)
        straight = torch.where(a > 0, rgb[0, 0] / a.clamp_min(1e-6), rgb[0, 0]).clamp(0, 1)
        rgba = torch.cat([straight, a]).permute(1, 2, 0).numpy()
        members[f"{name}.png"] = _png((rgba * 255 + 0.5).astype(np.uint8))
        dicts.append({**cam.to_dict(), "name": name})
    members["cameras.json"] = json.dumps(dicts).encode()
    members["meta.json"] = json.dumps({"source_hash": f"h-{seed}"}).encode()
    z = np.random.default_rng(seed).standard_normal(noise_shape).astype(np.float32)
    members["noise.npy"] = _npy(z)
    return members


def make_rows(keys, seed0: int = 100, **kw) -> list[dict]:
    rows = []
    for i, key in enumerate(keys):
        row = sample_from_members(key, splat_members(key, seed0 + i, **kw), require_depth=False, require_normals=False)
        row["__url__"] = f"/data/pgt/shard-{i // 4:06d}.tar"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    from geco.models.bundle import init_tiny_bundle, tiny_models_config

    root = tmp_path_factory.mktemp("stage1-bundle") / "bundle"
    return init_tiny_bundle(root, tiny_models_config(base=MODELS), seed=3)


@pytest.fixture(scope="module")
def noise_shape(bundle):
    from geco.models.bundle import load_bundle

    return tuple(load_bundle(bundle).teacher.latent_shape(1)[1:])


def make_task(bundle: str, *extra: str):
    from geco.train.stage2 import Stage2Task

    cfg = load_config(None, TINY + list(extra))
    return Stage2Task(cfg, cfg.stage2.train, WorkerContext(), {"bundle": bundle}), cfg


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------
def test_step_trains_the_generator_only_and_resumes_exactly(tmp_path, bundle, noise_shape):
    from geco.train.checkpoint import load_checkpoint, save_checkpoint

    rows = make_rows(["a", "b", "c", "d"], noise_shape=noise_shape)
    task, cfg = make_task(bundle, "stage2.train.grad_accumulation=2")
    gen0, rec0 = _state(task.generator.unet), _state(task.reconstructor)
    vae0 = _state(task.teacher.vae)
    batch = task.prepare(rows[:2])
    assert batch["cond"].shape == (2, 3, 32, 32) and batch["noise"].shape == (2, *noise_shape)
    assert [v["rgb"].shape for v in batch["views"]] == [(16, 3, TILE, TILE)] * 2  # 6 Zero123++ + 10 random
    stats = task.train_step([batch, task.prepare(rows[2:])], 0)  # two micro-batches
    for k in ("loss", "mse_rgb", "mse_alpha", "psnr", "grad_norm", "lr"):
        assert math.isfinite(stats[k]), (k, stats)
    assert stats["lr"] == 1e-3 and stats["grad_norm"] > 0
    assert any(not torch.equal(gen0[k], v) for k, v in task.generator.unet.state_dict().items())
    assert all(torch.equal(rec0[k], v) for k, v in task.reconstructor.state_dict().items())
    assert all(torch.equal(vae0[k], v) for k, v in task.teacher.vae.state_dict().items())
    assert all(p.grad is None for p in task.reconstructor.parameters())
    assert set(task.modules()) == set(task.optimizers()) == set(task.schedulers()) == {"generator"}

    # a checkpoint round trip: the resumed task takes the same next step as the uninterrupted one
    h = type(task).config_hash(cfg, cfg.stage2.train, task.inputs)
    save_checkpoint(tmp_path / "ck", step=1, models=task.modules(), optimizers=task.optimizers(),
                    schedulers=task.schedulers(), config_hash=h)
    resumed, _ = make_task(bundle, "stage2.train.grad_accumulation=2")
    load_checkpoint(tmp_path / "ck", models=resumed.modules(), optimizers=resumed.optimizers(),
                    schedulers=resumed.schedulers(), config_hash=h)
    a = task.train_step([task.prepare(rows[:2]), task.prepare(rows[2:])], 1)
    b = resumed.train_step([resumed.prepare(rows[:2]), resumed.prepare(rows[2:])], 1)
    assert a["loss"] == b["loss"]
    assert all(torch.equal(v, resumed.generator.unet.state_dict()[k]) for k, v in task.generator.unet.state_dict().items())


def test_run_name_follows_the_bundle(tmp_path, bundle):
    """A bundle saved again at the same place (stage 1 re-trained) is another input: a new run name."""
    import shutil

    from geco.models.bundle import init_tiny_bundle, tiny_models_config
    from geco.train.stage2 import Stage2Task

    cfg = load_config(None, TINY)
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    h1 = Stage2Task.config_hash(cfg, cfg.stage2.train, {"bundle": str(copy)})
    assert h1 == Stage2Task.config_hash(cfg, cfg.stage2.train, {"bundle": str(copy)})
    init_tiny_bundle(copy, tiny_models_config(base=MODELS), seed=3)  # the same weights, saved again
    assert Stage2Task.config_hash(cfg, cfg.stage2.train, {"bundle": str(copy)}) != h1


# ------------------------------------------------------------------------------------------
# bad input: one line naming the shard and the object
# ------------------------------------------------------------------------------------------
def test_bad_samples_name_the_shard_and_object(bundle, noise_shape):
    task, _ = make_task(bundle)
    good = make_rows(["bad-one"], noise_shape=noise_shape)[0]

    missing = dict(good)
    del missing["003.png"]
    with pytest.raises(SampleError) as e:
        task.prepare([missing])
    msg = str(e.value)
    assert "shard-000000.tar: object 'bad-one'" in msg and "missing view image(s) 003.png" in msg
    assert "\n" not in msg

    cams = json.loads(good["cameras.json"])
    fewer = {**good, "cameras.json": json.dumps(cams[:-2]).encode()}  # 14 cameras for 16 view images
    with pytest.raises(SampleError, match=r"shard-000000.tar: object 'bad-one': cameras.json has 14 view camera\(s\) "
                                          r"but the sample holds 16 view image\(s\) \(014.png, 015.png have no camera\)"):
        task.prepare([fewer])

    few = {k: v for k, v in good.items() if not (k[:3].isdigit() and int(k[:3]) >= 3)}
    few["cameras.json"] = json.dumps(cams[:4]).encode()
    with pytest.raises(SampleError, match="3 view\\(s\\), fewer than stage2.views_per_step=4"):
        task.prepare([few])

    other = {**good, "noise.npy": _npy(np.zeros((4, 8, 8), np.float32))}
    with pytest.raises(SampleError, match=r"noise.npy is \[4, 8, 8\], the teacher's latent is"):
        task.prepare([other])

    # render shards have no noise: a fixed noise per object, seeded by its key
    plain = {k: v for k, v in good.items() if k != "noise.npy"}
    n1, n2 = task.prepare([plain])["noise"], task.prepare([plain])["noise"]
    assert torch.equal(n1, n2) and n1.shape == (1, *noise_shape)


# ------------------------------------------------------------------------------------------
# evaluation and export
# ------------------------------------------------------------------------------------------
def test_evaluate_grid_and_export_a_bundle_generate_loads(tmp_path, bundle, noise_shape):
    from geco.generate import generate
    from geco.models.bundle import load_bundle

    rows = make_rows(["e0", "e1"], noise_shape=noise_shape)
    task, _ = make_task(bundle)
    res = task.evaluate(task.prepare(rows, training=False), 0)
    assert {"psnr", "ssim", "mse_alpha", "loss"} <= set(res.metrics) and "lpips" not in res.metrics
    img = res.images["samples"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[0] > 2 * 128  # a header + 2 objects
    task.train_step([task.prepare(rows)], 0, StepPlan(checkpoint=True))
    out = task.export(str(tmp_path / "stage2"))
    assert out == {"bundle": str(tmp_path / "stage2" / "bundle"), "generator": str(tmp_path / "stage2" / "generator")}
    b = load_bundle(out["bundle"])
    trained = task.generator.unet.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in b.generator.unet.state_dict().items())
    source = load_bundle(bundle)
    assert all(torch.equal(v, source.reconstructor.state_dict()[k]) for k, v in b.reconstructor.state_dict().items())
    result = generate(b, task.prepare(rows[:1])["cond"][0], seed=1)[0]
    assert result.views.shape == (6, 3, TILE, TILE) and len(result.gaussians) > 0


# ------------------------------------------------------------------------------------------
# where the inputs come from (the DAG, the CLI's defaults)
# ------------------------------------------------------------------------------------------
def test_stage2_inputs_follow_the_dag(tmp_path, bundle):
    from pipelines.dag import STAGES, DagContext, stage2_inputs
    from pipelines.stage import StageOutputs
    from pipelines.stage1 import Stage1Outputs
    from pipelines.stage2 import default_inputs
    from pipelines.training import TrainSetupError

    assert STAGES.index("stage2") > STAGES.index("stage1")
    cfg = load_config(None, [f"stage1.output_uri={tmp_path / 'nothing'}"])
    pgt = StageOutputs(stage="pseudo_gt", uris={"pseudo_gt": str(tmp_path / "pgt")})
    s1 = Stage1Outputs(uris={"bundle": bundle})
    ctx = DagContext(cfg=cfg, parent_run_id=None, stages=["stage2"], outputs={"pseudo_gt": pgt, "stage1": s1})
    inputs = stage2_inputs(ctx)
    assert (inputs.pseudo_gt_uri, inputs.bundle_uri) == (str(tmp_path / "pgt"), bundle)
    assert inputs.task_inputs() == {"bundle": bundle}
    # nothing ran before it: the configured places; a stage-1 output without a bundle is one line
    with pytest.raises(TrainSetupError, match=r"^stage1.output_uri \(its bundle/\)=.*nothing/bundle: .*no such "
                                              r"checkpoint folder; run `geco train stage1` first"):
        stage2_inputs(DagContext(cfg=cfg, parent_run_id=None, stages=["stage2"]))
    cfg = load_config(None, [f"stage1.output_uri={bundle[:-len('/bundle')]}", "pseudo_gt.output_uri=relative/pgt"])
    inputs = default_inputs(cfg)
    assert inputs.bundle_uri == bundle and inputs.pseudo_gt_uri.endswith("/relative/pgt")
    assert default_inputs(cfg, pseudo_gt="s3://b/pgt").pseudo_gt_uri == "s3://b/pgt"
