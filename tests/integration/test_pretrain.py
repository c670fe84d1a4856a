"""The pretrain stage end to end under Ray Train, on a tiny dataset rendered once with real Blender.

* a short run learns: held-out PSNR of teacher samples and reconstructor renders rises well above
  the untrained (step-0) values and 2.5 dB above a constant white image (the background) on the
  same held-out batch; the reconstructor's renders also beat every constant image (the mean
  training image, each object's own mean colour); the teacher's held-out diffusion loss is well
  below a random UNet's in the same latent space (at this size the teacher does not yet use its
  condition, and neither model's outputs are specific to their object: see the test); everything is in
  MLflow (a real server): params, per-step losses and learning rates, eval metrics, sample grids,
  final weights; checkpoints hold no pickle and only the newest K are kept;
* re-running resumes from the latest checkpoint (S3 storage, `geco train pretrain` CLI);
* a worker killed mid-run is restarted by Ray Train and training continues from the last
  checkpoint with the step count intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from geco import faults, storage
from geco.config import load_config
from tests.teacher_losses import condition_losses

pytestmark = [pytest.mark.blender, pytest.mark.slow]

# 8 procedural objects; val_fraction 0.52 puts procedural-0005 and -0007 in the val split.
MODELS = ["models.teacher.tile_size=16", "models.teacher.cond_size=32",
          "models.reconstructor.input_size=32", "models.reconstructor.lgm.down_channels=[16,32,64]",
          "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[64,32]",
          "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
          "models.reconstructor.lgm.norm_groups=8", "models.reconstructor.lgm.layers_per_block=1"]


def _job(target: str, **kw) -> list[str]:
    base = {"lr": 1e-3, "batch_size": 2, "lr_schedule": "constant", "max_grad_norm": 1.0, "log_every": 1,
            "cpus_per_worker": 0.5, "torch_threads": 1, "keep_checkpoints": 2, "max_failures": 1}
    base.update(kw)
    return [f"pretrain.{target}.{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> str:
    return tiny_dataset


def tiny_config(tmp_path: Path, dataset: str, tracking_uri: str, *extra: str):
    return load_config(None, MODELS + [
        f"dataset.uri={dataset}", f"pretrain.output_uri={tmp_path / 'pretrained'}",
        f"pretrain.teacher.storage_path={tmp_path / 'train'}", f"pretrain.reconstructor.storage_path={tmp_path / 'train'}",
        f"tracking.uri={tracking_uri}", "tracking.experiment=test-pretrain", "name=pt-test", *extra])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def child_runs(client, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["geco.stage"].split("/")[-1]: r for r in runs}


def baselines(cfg, dataset: str) -> dict[str, dict[str, float]]:
    """PSNR (dB) of constant-image models on the held-out batch each pretrain task evaluates on: white
    (the background), the mean image of the training objects and, for the reconstructor, each object's
    own mean colour (the mean of its input views: what a model that passes only colour through gives)."""
    import torch

    from geco.data.loader import iter_dataset
    from geco.train.loop import WorkerContext, psnr
    from geco.train.pretrain import TASKS

    rows = {split: sorted(iter_dataset(dataset, split, decode=False), key=lambda r: r["__key__"])
            for split in ("train", "val")}
    out = {}
    for target, key in (("teacher", "grid"), ("reconstructor", "sup_rgb")):
        task = TASKS[target](cfg, getattr(cfg.pretrain, target), WorkerContext())
        val_batch = task.prepare(rows["val"], training=False)
        val, train = val_batch[key], task.prepare(rows["train"], training=False)[key]
        mean = train.flatten(0, -4).mean(0)  # the mean image over objects (and views)
        white = torch.ones_like(val) * (cfg.models.reconstructor.background if target == "reconstructor" else 1.0)
        out[target] = {"white": round(psnr(white, val), 2), "train_mean": round(psnr(mean.expand_as(val), val), 2)}
        if target == "reconstructor":
            own = val_batch["images"].mean(dim=(1, 3, 4))[:, None, :, None, None]  # [B, 1, 3, 1, 1]
            out[target]["own_colour"] = round(psnr(own.expand_as(val), val), 2)
    return out


def test_pretrain_learns_and_tracks_everything(tmp_path, dataset, mlflow_server):
    import mlflow

    from geco.models.reconstructors import load_reconstructor
    from geco.models.teacher import build_tiny_teacher, load_teacher
    from geco.train.checkpoint import checkpoint_files, read_checkpoint_meta
    from pipelines import pretrain

    steps = 80
    cfg = tiny_config(tmp_path, dataset, mlflow_server.uri, "pretrain.concurrent=true",
                      *_job("teacher", steps=steps, checkpoint_every=40, eval_every=40),
                      *_job("reconstructor", steps=steps, checkpoint_every=40, eval_every=40, lr_schedule="cosine",
                            lr_warmup_steps=10))
    out = pretrain.run(cfg)
    print(out.summary())
    assert out.val_source == "manifest" and out.eval_keys == ["procedural-0005", "procedural-0007"]
    for target in ("teacher", "reconstructor"):
        r = out.results[target]
        assert r.step == steps and r.resumed_from is None

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    runs = child_runs(client, out.mlflow_run_id)
    assert set(runs) == {"teacher", "reconstructor"}
    report = {}
    for target, key, margin in (("teacher", "eval/psnr_sample", 2.5), ("reconstructor", "eval/psnr", 2.0)):
        run = runs[target]
        assert run.info.status == "FINISHED"
        # config as params
        assert run.data.params[f"pretrain.{target}.lr"] == "0.001"
        assert run.data.params[f"pretrain.{target}.lr_schedule"] == ("constant" if target == "teacher" else "cosine")
        assert run.data.params["models.teacher.tile_size"] == "16"
        # losses and learning rates at every step
        loss, lr = history(client, run.info.run_id, "train/loss"), history(client, run.info.run_id, "train/lr")
        assert [s for s, _ in loss] == list(range(1, steps + 1)) and [s for s, _ in lr] == list(range(1, steps + 1))
        # held-out evaluation: untrained, midway, final
        psnr = history(client, run.info.run_id, key)
        assert [s for s, _ in psnr] == [0, 40, 80]
        report[target] = (psnr[0][1], psnr[-1][1])
        assert psnr[-1][1] > psnr[0][1] + margin, (target, psnr)
        # sample grids every eval, final weights as artifacts
        grids = "samples" if target == "teacher" else "renders"
        assert {a.path for a in client.list_artifacts(run.info.run_id, grids)} == {
            f"{grids}/step_{s:08d}.png" for s in (0, 40, 80)}
        weights = {a.path for a in client.list_artifacts(run.info.run_id, f"weights/{target}")}
        assert (f"weights/{target}/model_index.json" if target == "teacher"
                else f"weights/{target}/model.safetensors") in weights
    # Beating a random network at step 0 is not learning: a constant image scores about what a model that
    # learnt only the background or the mean colour does. Baselines on the same held-out batch: constant
    # white (the background), the mean training image and (reconstructor) each object's own mean colour.
    base = baselines(cfg, dataset)
    paired = {t: history(client, runs[t].info.run_id, k)[-1][1]
              for t, k in (("teacher", "eval/psnr_sample_paired_min"), ("reconstructor", "eval/psnr_paired_min"))}
    # the teacher's diffusion loss in one latent space (the trained VAE's: it trains jointly, so the logged
    # step-0 and final losses are in different spaces): trained, condition dropped, a fresh random UNet
    teacher = load_teacher(cfg.models.teacher.model_copy(update={"pretrained": out.teacher_uri}))
    dl = condition_losses(teacher, cfg, dataset, random_unet=build_tiny_teacher(cfg.models.teacher, seed=1).unet)
    print(f"held-out PSNR (untrained -> {steps} steps): teacher samples {report['teacher'][0]:.2f} -> "
          f"{report['teacher'][1]:.2f} dB, reconstructor renders {report['reconstructor'][0]:.2f} -> "
          f"{report['reconstructor'][1]:.2f} dB; baselines {base}; own-minus-other PSNR (min) {paired}; teacher "
          f"diffusion loss {dl}")
    # What is fair to demand, and what 80 steps give (measured):
    # * The reconstructor is a deterministic regression model: it must beat every constant image, the mean
    #   training image included (the MSE-optimal constant). With a cosine schedule (lr 1e-3, 10 warmup
    #   steps) it does: in-process runs (no Ray; same sizes, batch 2) ended 0.95 / 1.31 dB above the train
    #   mean at 80 steps (seeds 0 / 1) and 1.34 / 0.69 / 1.03 dB at 120 (seeds 0 / 1 / re-render), against
    #   0.65 dB (seed 0) with the former constant lr 5e-4, which in two Ray runs ended 0.85 and -0.06 dB.
    #   Each object's own mean colour scores ~1.7 dB below the train mean, so a model that only passes
    #   colour through fails too; the train-mean image itself fails by construction; and the same run
    #   with every input view blanked to white (cameras only: it learns a mean blob) ended 0.12 dB above
    #   the train mean (seed 0), below the 0.3 dB asserted.
    # * Object specificity (own-minus-other PSNR, eval/psnr_paired_min) is NOT asserted: the renders are
    #   still blobs in colours learnt from the 6 training objects, not the held-out object's (margins
    #   -1.8 to +0.03 dB at 80-120 steps, still -1.1 dB after 400 steps at lr 5e-4: it memorises, it does
    #   not yet pass the input's colours through).
    # * The teacher is generative: a sample drawn from noise is not the MSE-optimal prediction, so its
    #   sample PSNR need not beat the mean image even for a perfect model (measured 11.8 vs 13.1 dB). The
    #   principled test of learning the data is the held-out diffusion loss vs a random UNet's (asserted:
    #   0.70-0.76 vs 1.00-1.13). The principled test of using the condition is the same loss with the
    #   condition dropped ("uncond"): at 80 steps the two are equal to 0.001 (also for a teacher trained
    #   with drop_cond_prob=1, which passes every teacher check here), i.e. this teacher has learnt the
    #   unconditional distribution only; so condition use and object specificity are NOT asserted.
    #   It stays so at 80 steps with the image encoder training too (0.7196 vs 0.7187 "uncond"); the
    #   400-step teacher of conftest's trained_teacher does use it, on its training objects
    #   (tests/integration/test_teacher_condition.py asserts it).
    for target in ("teacher", "reconstructor"):
        assert report[target][1] > base[target]["white"] + 2.5, (target, report, base)
    assert report["reconstructor"][1] > max(base["reconstructor"].values()) + 0.3, (report, base)
    assert dl["trained"] < dl["random"] - 0.2, dl

    # the exported weights load with the model loaders
    teacher = load_teacher(cfg.models.teacher.model_copy(update={"pretrained": out.teacher_uri}))
    assert teacher.vae.config.scaling_factor == cfg.pretrain.teacher.vae_scaling_factor
    load_reconstructor(cfg.models.reconstructor.model_copy(update={"pretrained": out.reconstructor_uri}))
    assert out.overrides() == [f"models.teacher.pretrained={out.teacher_uri}",
                               f"models.reconstructor.pretrained={out.reconstructor_uri}"]

    # checkpoints: the newest K=2 kept, each complete, only JSON and safetensors (no pickle anywhere)
    for r in out.results.values():
        run_dir = Path(r.storage_path) / r.run_name
        ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
        assert ckpts == ["checkpoint_00000040", "checkpoint_00000080"], ckpts
        for c in ckpts:
            meta = read_checkpoint_meta(run_dir / c)
            assert meta["step"] == int(c.split("_")[1]) and meta["data_position"]["epoch"] >= 1
            assert {p.suffix for p in checkpoint_files(run_dir / c)} == {".json", ".safetensors"}
        assert r.checkpoint.endswith("checkpoint_00000080")


def test_rerun_resumes_from_latest_s3_checkpoint(tmp_path, dataset, s3_bucket, monkeypatch, capsys):
    import mlflow

    from cli.main import main
    from pipelines import pretrain

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"pretrain.reconstructor.storage_path={s3_bucket}/train", f"pretrain.output_uri={s3_bucket}/pretrained",
              "pretrain.targets=[reconstructor]", "pretrain.log_weights=false",
              *_job("reconstructor", checkpoint_every=2, eval_every=0)]
    cfg = tiny_config(tmp_path, dataset, db, *common, "pretrain.reconstructor.steps=4")
    first = pretrain.run(cfg)
    r1 = first.results["reconstructor"]
    assert (r1.step, r1.resumed_from) == (4, None) and r1.checkpoint.startswith(s3_bucket)
    assert first.reconstructor_uri == f"{s3_bucket}/pretrained/reconstructor/model.safetensors"
    assert storage.exists(first.reconstructor_uri)

    # The CLI with more steps: continues at step 4, not from scratch.
    conf = tmp_path / "pretrain.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", "pretrain", "--config", str(conf), "--set", "pretrain.reconstructor.steps=6"]) == 0
    printed = capsys.readouterr().out
    assert "reconstructor: step 6, resumed from step 4" in printed, printed

    # The same config again: complete already; nothing is trained (no Ray Train job is started) and no
    # MLflow run is opened: the previous outputs come back, with the runs that made them.
    again = pretrain.run(load_config(conf, ["pretrain.reconstructor.steps=6"]))
    r3 = again.results["reconstructor"]
    assert r3.already_complete and r3.step == 6 and r3.run_name == r1.run_name
    assert not again.did_work and "nothing to do" in again.summary()
    assert again.reconstructor_uri == first.reconstructor_uri
    assert r3.exported == {"reconstructor": first.reconstructor_uri}
    assert r3.checkpoint == f"{s3_bucket}/train/{r1.run_name}/checkpoint_00000006"
    run_prefix = f"{s3_bucket}/train/{r1.run_name}/"
    kept = sorted({u[len(run_prefix):].split("/")[0] for u in storage.listdir(run_prefix)
                   if u[len(run_prefix):].startswith("checkpoint_0")})
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"], kept

    client = mlflow.MlflowClient(tracking_uri=db)
    steps_logged = [sorted(m.step for m in client.get_metric_history(child_runs(client, o.mlflow_run_id)
                                                                     ["reconstructor"].info.run_id, "train/loss"))
                    for o in (first,)]
    assert steps_logged == [[1, 2, 3, 4]]
    second = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id],
                                "tags.`geco.stage` = 'pretrain/reconstructor'", order_by=["attributes.start_time ASC"])
    assert [sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) for r in second] == [
        [1, 2, 3, 4], [5, 6]]  # the resumed run continues the step count; the no-op re-run opened none
    assert again.mlflow_run_ids["pretrain/reconstructor"] == second[-1].info.run_id


def test_killed_worker_is_restarted_and_resumes_exactly(tmp_path, dataset, monkeypatch):
    """Two faults in one run (2 DDP workers reading through Ray Data): rank 1 dies right after step 3,
    then rank 0 dies inside the checkpoint report of step 4 (its files written, the report never
    received). Both times Ray Train restarts the group from the step-2 checkpoint, the last complete
    one. Recovery loses nothing: the final weights and every step's loss equal those of the same
    config run without faults (replayed steps are logged again, with the same values: MLflow keeps
    each, so the history has a step once per attempt that logged it); keep-K holds."""
    import mlflow
    from safetensors.torch import load_file

    from pipelines import pretrain
    from pipelines.training import RESULT_FILE

    def config(name: str):
        return tiny_config(tmp_path / name, dataset, f"sqlite:///{tmp_path / name / 'mlflow.db'}",
                           "pretrain.targets=[reconstructor]", "pretrain.log_weights=false",
                           *_job("reconstructor", steps=6, checkpoint_every=2, eval_every=0, num_workers=2,
                                 batch_size=1, max_failures=3))

    def losses(name: str, out) -> list[tuple[int, float]]:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        return history(client, child_runs(client, out.mlflow_run_id)["reconstructor"].info.run_id, "train/loss")

    killed, in_report = tmp_path / "killed", tmp_path / "killed-in-report"
    monkeypatch.setenv(faults.ENV, f"kill-at-step:3:{killed}:1,kill-in-checkpoint:4:{in_report}:0")
    out = pretrain.run(config("faults"))
    r = out.results["reconstructor"]
    assert "rank 1 step 3" in killed.read_text() and "rank 0 step 4" in in_report.read_text()
    assert (r.step, r.resumed_from) == (6, 2), r.summary()  # the step-4 checkpoint never counted
    info = json.loads(Path(r.storage_path, r.run_name, RESULT_FILE).read_text())
    assert info["step"] == 6 and info["exported"]["reconstructor"] == out.reconstructor_uri
    run_dir = Path(r.storage_path) / r.run_name
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint")) == [
        "checkpoint_00000004", "checkpoint_00000006"]  # keep-K holds; nothing half-written is left
    # both ranks' RNG states are in the (merged) checkpoint
    assert {p.name for p in (run_dir / "checkpoint_00000006" / "rng").iterdir()} >= {"rank_0.json", "rank_1.json"}

    monkeypatch.delenv(faults.ENV)
    ref = pretrain.run(config("reference"))
    assert (ref.results["reconstructor"].step, ref.results["reconstructor"].resumed_from) == (6, None)
    got, want = load_file(out.reconstructor_uri), load_file(ref.reconstructor_uri)
    assert set(got) == set(want)
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by up to {worst}"

    history_faults, history_ref = losses("faults", out), losses("reference", ref)
    assert [s for s, _ in history_ref] == [1, 2, 3, 4, 5, 6]
    # rank 0 logs each step it finishes: step 3 by attempt 1 (as a rule: rank 1 died after the step, rank 0
    # logs before the group is torn down), 3 and 4 by attempt 2, 3 to 6 by attempt 3
    logged = [s for s, _ in history_faults]
    assert sorted(set(logged)) == [1, 2, 3, 4, 5, 6] and logged.count(3) >= 2 and logged.count(4) == 2, logged
    reference = dict(history_ref)
    assert all(abs(v - reference[s]) <= 1e-6 for s, v in history_faults), (history_faults, history_ref)
