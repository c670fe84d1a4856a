"""The stage-1 VSD distillation end to end under Ray Train, on a tiny dataset rendered once with real
Blender and a tiny "pretrained" teacher + reconstructor written the way the pretrain stage writes them.

* a short run trains: the generator's weights move away from the teacher's, the teacher stays
  bit-identical, per-step losses and both learning rates, held-out metrics and the sample grid
  (input | teacher | generator | ground truth) are in MLflow (a real server) with the config as
  params and the bundle as artifacts; checkpoints keep the newest K and the LoRA fake score's part
  holds only the adapter; the exported bundle works with `geco generate`;
* a worker killed mid-run (DDP, 2 workers) is restarted by Ray Train and training continues from
  the last checkpoint with the step count intact; re-running through `geco train stage1` with more
  steps resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from geco import faults
from geco.config import load_config

pytestmark = [pytest.mark.blender, pytest.mark.slow]

# the data: tests/integration/conftest.py (tiny_dataset: procedural-0005 and -0007 are the val split)
MODELS = ["models.teacher.tile_size=16", "models.teacher.cond_size=32",
          "models.reconstructor.input_size=16", "models.reconstructor.lgm.down_channels=[8,16,32]",
          "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[32,16]",
          "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
          "models.reconstructor.lgm.norm_groups=4", "models.reconstructor.lgm.layers_per_block=1"]


def _job(**kw) -> list[str]:
    base = {"batch_size": 2, "log_every": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "keep_checkpoints": 2,
            "max_failures": 1, "checkpoint_every": 2, "eval_every": 2, "eval_objects": 2}
    base.update(kw)
    return [f"stage1.train.{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> str:
    return tiny_dataset


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A folder laid out like a pretrain output: teacher/ (Zero123++ layout) + reconstructor/model.safetensors."""
    from geco.models.reconstructors import build_reconstructor, save_reconstructor
    from geco.models.teacher import build_tiny_teacher, save_teacher

    root = tmp_path_factory.mktemp("pretrained")
    cfg = load_config(None, MODELS)
    save_teacher(build_tiny_teacher(cfg.models.teacher, seed=7), root / "teacher")
    torch.manual_seed(7)
    save_reconstructor(build_reconstructor(cfg.models.reconstructor), str(root / "reconstructor" / "model.safetensors"))
    return root


def tiny_config(tmp_path: Path, dataset: str, pretrained: Path, tracking: list[str], *extra: str):
    return load_config(None, MODELS + tracking + [
        f"dataset.uri={dataset}", f"models.teacher.pretrained={pretrained}",
        f"models.reconstructor.pretrained={pretrained}",
        f"stage1.output_uri={tmp_path / 'stage1'}", f"stage1.train.storage_path={tmp_path / 'train'}",
        "stage1.lr_generator=1e-3", "stage1.lr_fake=2e-3", "stage1.eval_teacher_steps=2", "stage1.lora_rank=2",
        "name=s1-test", *extra])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_stage1_trains_tracks_and_exports_a_working_bundle(tmp_path, dataset, pretrained, mlflow_server, monkeypatch,
                                                          capsys):
    import mlflow

    from geco.train.checkpoint import checkpoint_files, read_checkpoint_meta
    from pipelines import stage1

    monkeypatch.setenv("GECO_CACHE", str(tmp_path / "geco-cache"))
    steps = 4
    cfg = tiny_config(tmp_path, dataset, pretrained, [f"tracking.uri={mlflow_server.uri}",
                                                      "tracking.experiment=test-stage1"],
                      *_job(steps=steps, gradient_checkpointing="true"), "stage1.bundle_teacher_unet=true")
    out = stage1.run(cfg)
    print(out.summary())
    r = out.result
    assert (r.step, r.resumed_from) == (steps, None)
    assert out.val_source == "manifest" and out.eval_keys == ["procedural-0005", "procedural-0007"]
    assert out.teacher_uri == str(pretrained / "teacher")
    assert out.bundle_uri == str(tmp_path / "stage1" / "bundle")
    assert out.generator_uri == str(tmp_path / "stage1" / "generator")
    assert {"psnr_generator_gt", "psnr_generator_teacher", "psnr_teacher_gt"} <= set(out.metrics)

    # MLflow: the config as params, losses and both learning rates per step, eval metrics, grids, weights
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage1.lr_generator"] == "0.001" and run.data.params["stage1.fake_score"] == "lora"
    assert run.data.params["models.teacher.tile_size"] == "16"
    for key in ("train/loss_vsd", "train/loss_fake", "train/lr_generator", "train/lr_fake", "train/grad_norm_g"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, steps + 1)), key
    assert {v for _, v in history(client, run.info.run_id, "train/lr_generator")} == {1e-3}
    assert {v for _, v in history(client, run.info.run_id, "train/lr_fake")} == {2e-3}
    psnr = history(client, run.info.run_id, "eval/psnr_generator_teacher")
    assert [s for s, _ in psnr] == [0, 2, 4]
    teacher_psnr = history(client, run.info.run_id, "eval/psnr_teacher_gt")
    assert len({v for _, v in teacher_psnr}) == 1  # the teacher's samples never change: it is frozen
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert grids == {f"samples/step_{s:08d}.png" for s in (0, 2, 4)}
    grid = np.asarray(Image.open(client.download_artifacts(run.info.run_id, "samples/step_00000004.png",
                                                           str(tmp_path / "grid"))))
    assert grid.shape[0] >= 2 * 48 and grid.shape[1] >= 32 + 3 * 32  # 2 objects; input | teacher | generator | gt
    assert "weights/bundle/geco.json" in {a.path for a in client.list_artifacts(run.info.run_id, "weights/bundle")}

    # the generator moved away from the teacher; the teacher is bit-identical to its source
    src = load_file(str(pretrained / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    bundled_teacher = load_file(str(Path(out.bundle_uri) / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    gen = load_file(str(Path(out.generator_uri) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(src) == set(bundled_teacher) == set(gen)
    assert all(torch.equal(src[k], bundled_teacher[k]) for k in src)
    assert sum(not torch.equal(src[k], gen[k]) for k in src) > len(src) // 2

    # checkpoints: newest K=2 kept; safetensors + JSON only; the fake score's part is the LoRA adapter alone
    run_dir = Path(r.storage_path) / r.run_name
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000002", "checkpoint_00000004"], ckpts
    last = run_dir / ckpts[-1]
    meta = read_checkpoint_meta(last)
    assert meta["models"] == ["fake_score", "generator"] and meta["optimizers"] == ["fake_score", "generator"]
    assert meta["schedulers"] == ["fake_score", "generator"]
    assert {p.suffix for p in checkpoint_files(last)} == {".json", ".safetensors"}
    with safe_open(str(last / "models" / "fake_score.safetensors"), "pt") as f:
        lora_keys = list(f.keys())
    assert lora_keys and all(".lora_A." in k or ".lora_B." in k for k in lora_keys)

    # the bundle names what it was built from (test_dag runs `geco generate` on a stage-1 bundle)
    manifest = json.loads((Path(out.bundle_uri) / "geco.json").read_text())
    assert manifest["sources"]["reconstructor"] == str(pretrained / "reconstructor" / "model.safetensors")


def test_killed_worker_resumes_exactly_and_rerun_continues(tmp_path, dataset, pretrained, monkeypatch, capsys):
    """A DDP worker killed after step 3 is restarted from the step-2 checkpoint and loses nothing: the
    final generator and fake score equal those of the same config run without the fault."""
    from cli.main import main
    from pipelines import stage1

    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.ENV, f"kill-at-step:3:{marker}:1")  # rank 1, right after step 3
    job = _job(steps=4, num_workers=2, batch_size=1, eval_every=0, max_failures=2)
    cfg = tiny_config(tmp_path, dataset, pretrained, ["tracking.enabled=false"], *job)
    out = stage1.run(cfg)
    r = out.result
    assert marker.exists() and "rank 1 step 3" in marker.read_text()
    assert (r.step, r.resumed_from) == (4, 2), r.summary()  # restarted from the step-2 checkpoint
    run_dir = Path(r.storage_path) / r.run_name
    assert {p.name for p in (run_dir / "checkpoint_00000004" / "rng").iterdir()} >= {"rank_0.json", "rank_1.json"}
    assert Path(out.bundle_uri, "geco.json").is_file()

    monkeypatch.delenv(faults.ENV)
    ref = stage1.run(tiny_config(tmp_path / "reference", dataset, pretrained, ["tracking.enabled=false"], *job))
    assert (ref.result.step, ref.result.resumed_from) == (4, None)
    ref_dir = Path(ref.result.storage_path) / ref.result.run_name
    for part in ("generator", "fake_score"):
        got = load_file(str(run_dir / "checkpoint_00000004" / "models" / f"{part}.safetensors"))
        want = load_file(str(ref_dir / "checkpoint_00000004" / "models" / f"{part}.safetensors"))
        assert set(got) == set(want), part
        worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        assert worst <= 1e-6, f"{part}: the resumed run differs from the uninterrupted one by up to {worst}"

    # re-running with more steps (the CLI; one worker now) continues from the latest checkpoint
    conf = tmp_path / "stage1.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["train", "stage1", "--config", str(conf), "--set", "stage1.train.steps=6",
                 "--set", "stage1.train.num_workers=1"]) == 0
    printed = capsys.readouterr().out
    assert "stage1: step 6, resumed from step 4" in printed, printed
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"], kept


# The learning check's own stage-1 settings (not configs/local.yaml's): see the test's docstring.
LEARN = ["stage1.lr_generator=1e-5", "stage1.lr_fake=1e-3", "stage1.fake_steps=4", "stage1.lora_rank=8",
         "stage1.eval_teacher_steps=10"]
LEARN_STEPS = 16
LEARN_SEEDS = (0, 1, 2)
NOISE_SDS = 3.0  # the margin: this many standard errors of the mean gain, from its seed-to-seed spread
# measured (seeds 0/1/2) with conftest's teacher, whose image encoder now trains with it (it uses its
# condition: tests/integration/test_teacher_condition.py): paired +0.16/+0.14/+0.09 dB, SSIM
# +0.021/+0.015/+0.018, PSNR to the teacher's samples +0.07/+0.09/+0.07, PSNR to the ground truth
# -0.001/-0.053/-0.004 dB. With the former teacher (frozen random encoder, condition ignored): paired
# +0.20/+0.31/+0.25, PSNR to the ground truth +0.30/+0.27/+0.24. Why the ground truth no longer gains:
# the condition-using teacher memorised its 6 training objects, so on held-out objects its samples
# lean towards training objects (its held-out loss is lower with the condition dropped: 0.310 vs 0.365);
# distilling it brings the generator closer to those samples, not to the truth.


def vsd_gains(dataset: str, teacher: Path, seed: int, *extra: str) -> dict[str, float]:
    """Train stage 1 in this process (the task's own step; the Ray Train path is tested above) for
    LEARN_STEPS steps from ``seed``; the change of each held-out metric from step 0 to the end (fixed
    evaluation noise: the same conditions, noise and teacher samples before and after)."""
    from geco.data.loader import iter_dataset
    from geco.train.loop import WorkerContext
    from geco.train.stage1 import VSDTask

    cfg = load_config(None, MODELS + LEARN + [f"models.teacher.pretrained={teacher}", "stage1.train.batch_size=2",
                                              f"stage1.train.seed={seed}", f"stage1.train.steps={LEARN_STEPS}", *extra])
    rows = {split: sorted(iter_dataset(dataset, split, decode=False), key=lambda r: r["__key__"])
            for split in ("train", "val")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = VSDTask(cfg, cfg.stage1.train, WorkerContext())
        val = task.prepare(rows["val"], training=False)
        before = task.evaluate(val, 0).metrics
        order = torch.Generator().manual_seed(seed)
        for step in range(LEARN_STEPS):
            idx = torch.randint(len(rows["train"]), (2,), generator=order).tolist()
            task.train_step([task.prepare([rows["train"][i] for i in idx])], step)
        after = task.evaluate(val, LEARN_STEPS).metrics
    return {k: after[k] - before[k] for k in before}


def test_stage1_learns_the_teacher(dataset, trained_teacher):
    """What must improve under VSD on the held-out objects, for every one of three seeds and on
    average by NOISE_SDS standard errors (the measured seed-to-seed spread / sqrt(seeds)): the paired gain (PSNR of the
    generator's one-step sample to its own object's 10-step teacher sample minus that to the other
    object's: a blurry mean or a collapse to one image does not raise it), SSIM to the teacher's
    samples; and PSNR to the ground truth must not fall by more than NOISE_SDS standard errors (a
    teacher that generalises no better than 6 objects allow gives it nothing to gain). A frozen generator (lr 1e-30) changes none of
    them: the measured gains are the generator's. The fake-score loss is not a check: it falls with a
    frozen generator too. The learning rates are balanced as PAPER.md says: the fake score tracks the
    generator (4 updates per generator update, 100x its rate)."""
    teacher = trained_teacher / "teacher"
    runs = [vsd_gains(dataset, teacher, seed) for seed in LEARN_SEEDS]
    frozen = vsd_gains(dataset, teacher, LEARN_SEEDS[0], "stage1.lr_generator=1e-30")  # no change in float32
    keys = ("psnr_generator_teacher_paired", "ssim_generator_teacher", "psnr_generator_teacher", "psnr_generator_gt")
    gains = {k: np.array([r[k] for r in runs]) for k in keys}
    print("gains per seed " + "; ".join(f"{k} {np.round(v, 4).tolist()}" for k, v in gains.items())
          + f"; frozen generator {({k: round(frozen[k], 6) for k in keys})}")
    assert all(abs(frozen[k]) < 1e-6 for k in keys), frozen
    for k in ("psnr_generator_teacher_paired", "ssim_generator_teacher"):
        g = gains[k]
        assert (g > 0).all() and g.mean() > NOISE_SDS * g.std(ddof=1) / np.sqrt(len(g)), (k, g)
    gt = gains["psnr_generator_gt"]
    assert gt.mean() > -NOISE_SDS * gt.std(ddof=1) / np.sqrt(len(gt)), gt
