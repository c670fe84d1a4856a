"""The stage-1 VSD task without Ray: one alternating step (generator then fake score, separate
optimisers and schedules), the teacher stays bit-identical, the LoRA fake score's checkpoint holds
only the adapter tensors, a checkpoint round trip resumes exactly, evaluation grids and metrics,
and the export is a GECO bundle. (Where the teacher and reconstructor come from: tests/unit/test_dag_wiring.py.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from geco.config import load_config
from geco.train.checkpoint import load_checkpoint, save_checkpoint
from geco.train.loop import StepPlan, WorkerContext

TINY = [
    "models.teacher.pretrained=tiny", "models.teacher.tile_size=16", "models.teacher.cond_size=16", "models.teacher.tiny_block_out_channels=[16,32]",
    "models.reconstructor.input_size=16", "models.reconstructor.lgm.down_channels=[8,16,32]",
    "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[32,16]",
    "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
    "models.reconstructor.lgm.norm_groups=4", "models.reconstructor.lgm.layers_per_block=1",
    "stage1.lr_generator=1e-3", "stage1.lr_fake=2e-3", "stage1.train.steps=4", "stage1.train.grad_accumulation=2",
    "stage1.train.gradient_checkpointing=false", "stage1.eval_teacher_steps=2", "stage1.lora_rank=2",
]


def _rows(n=2):
    from geco.data.schema import sample_from_members
    from tests.unit.test_shards import make_members

    return [sample_from_members(f"obj{i}", make_members(f"obj{i}", seed=i)) for i in range(n)]


def _task(*extra):
    from geco.train.stage1 import VSDTask

    cfg = load_config(None, TINY + list(extra))
    return VSDTask(cfg, cfg.stage1.train, WorkerContext()), cfg


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lora_step_keeps_teacher_and_checkpoint_holds_only_the_adapter(tmp_path):
    task, cfg = _task()
    rows = _rows()
    fingerprint = task.teacher_fingerprint()
    gen0 = _snapshot(task.generator.unet)
    lora0 = _snapshot(task.modules()["fake_score"])
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert task.fake.shares_teacher_weights

    stats = task.train_step([task.prepare(rows[:1]), task.prepare(rows[1:])], 0)  # two micro-batches
    for k in ("loss", "loss_vsd", "loss_fake", "lr_generator", "lr_fake", "grad_norm_g", "grad_norm_f"):
        assert math.isfinite(stats[k]), (k, stats)
    assert (stats["lr_generator"], stats["lr_fake"]) == (1e-3, 2e-3)  # separate optimisers / learning rates
    assert stats["g_skipped"] == 0 and stats["f_skipped"] == 0
    # the generator and the adapter moved, the teacher did not (bit-identical, never given a gradient)
    assert any(not torch.equal(gen0[k], v) for k, v in task.generator.unet.state_dict().items())
    assert any(not torch.equal(lora0[k], v) for k, v in task.modules()["fake_score"].state_dict().items())
    assert task.teacher_fingerprint() == fingerprint
    assert all(p.grad is None for p in task.teacher.parameters())
    assert set(task.optimizers()) == set(task.schedulers()) == {"generator", "fake_score"}
    assert task.opt_g is not task.opt_f and task.sched_g.last_epoch == 1 and task.sched_f.last_epoch == 1

    # the LoRA checkpoint: adapter tensors only, peft's key names
    from peft.utils import get_peft_model_state_dict

    h = type(task).config_hash(cfg, cfg.stage1.train)
    save_checkpoint(tmp_path / "ck", step=1, models=task.modules(), optimizers=task.optimizers(),
                    schedulers=task.schedulers(), config_hash=h)
    with safe_open(str(tmp_path / "ck" / "models" / "fake_score.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(get_peft_model_state_dict(task.fake.unet))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    n_adapter = sum(v.numel() for v in task.modules()["fake_score"].state_dict().values())
    n_unet = sum(p.numel() for p in task.teacher.unet.parameters())
    assert n_adapter < 0.1 * n_unet
    with safe_open(str(tmp_path / "ck" / "models" / "generator.safetensors"), "pt") as f:
        assert set(f.keys()) == set(task.generator.unet.state_dict())

    # resume: a fresh task loads the checkpoint and the next step is exactly the same step
    other, _ = _task()
    load_checkpoint(tmp_path / "ck", models=other.modules(), optimizers=other.optimizers(),
                    schedulers=other.schedulers(), config_hash=h)
    for name in ("generator", "fake_score"):
        for (k, a), b in zip(task.modules()[name].state_dict().items(), other.modules()[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    batches = [task.prepare(rows[:1]), task.prepare(rows[1:])]
    s1 = task.train_step(batches, 1)
    s2 = other.train_step(batches, 1)
    assert s1 == s2
    for (k, a), b in zip(task.generator.unet.state_dict().items(), other.generator.unet.state_dict().values()):
        assert torch.equal(a, b), k

    # architecture-level settings change the run's hash; schedule and learning rates do not
    job = cfg.stage1.train
    assert type(task).config_hash(load_config(None, TINY + ["stage1.lr_fake=1e-6"]), job) == h
    assert type(task).config_hash(load_config(None, TINY + ["stage1.lora_rank=8"]), job) != h
    assert type(task).config_hash(load_config(None, TINY + ["stage1.fake_score=full"]), job) != h


def test_an_empty_teacher_is_refused_and_tiny_is_asked_for_by_name():
    from geco.train.stage1 import VSDTask

    cfg = load_config(None, TINY + ["models.teacher.pretrained="])
    with pytest.raises(ValueError, match=r"^stage1: no teacher .* models\.teacher\.pretrained=tiny") as err:
        VSDTask(cfg, cfg.stage1.train, WorkerContext())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no teacher"):  # an empty input overrides a configured teacher
        VSDTask(load_config(None, TINY), cfg.stage1.train, WorkerContext(), {"teacher": "", "reconstructor": ""})


def test_per_network_optimiser_settings_and_the_job_settings_stage1_rejects():
    from geco.config import ConfigError

    task, cfg = _task("stage1.betas_generator=[0.0,0.99]", "stage1.max_grad_norm_generator=2.5")
    assert task.opt_g.param_groups[0]["betas"] == (0.0, 0.99) and task.opt_f.param_groups[0]["betas"] == (0.9, 0.999)
    assert task.vsd_step.settings.max_grad_norm_generator == 2.5
    assert task.step_g.max_grad_norm == task.step_f.max_grad_norm == 0.0  # the step clips, per network
    # stage 1 has one learning rate, betas and clipping per network: the job's single ones are errors
    for key, points_at in (("lr=1e-4", "stage1.lr_generator"), ("adam_betas=[0.9,0.99]", "stage1.betas_generator"),
                           ("max_grad_norm=1.0", "stage1.max_grad_norm_generator")):
        with pytest.raises(ConfigError, match=points_at):
            load_config(None, TINY + [f"stage1.train.{key}"])
    dumped = cfg.model_dump(mode="json")["stage1"]["train"]
    assert not {"lr", "adam_betas", "max_grad_norm"} & set(dumped)  # a dumped config loads again
    assert type(cfg).model_validate(cfg.model_dump(mode="json")) == cfg


def test_paper_config_makes_the_authors_stage1_choices():
    """configs/paper.yaml: a full fake-score copy at lr 1e-6, no generator clipping, the eps fake loss,
    the authors' generator betas (0, 0.99)."""
    from pathlib import Path

    s = load_config(Path(__file__).parents[2] / "configs" / "paper.yaml").stage1
    assert (s.fake_score, s.lr_fake, s.lr_generator) == ("full", 1e-6, 1e-6)
    assert s.max_grad_norm_generator == 0.0 and s.max_grad_norm_fake == 0.0 and s.fake_loss == "eps"
    assert s.betas_generator == (0.0, 0.99) and s.betas_fake == (0.9, 0.999)


def test_full_fake_score_with_regression_and_fake_steps():
    task, _ = _task("stage1.fake_score=full", "stage1.regression_weight=1.0", "stage1.regression_teacher_steps=2",
                    "stage1.fake_steps=2", "stage1.train.grad_accumulation=1")
    assert not task.fake.shares_teacher_weights
    assert {id(p) for p in task.fake.unet.parameters()}.isdisjoint(id(p) for p in task.teacher.unet.parameters())
    fingerprint = task.teacher_fingerprint()
    rows = _rows()
    stats = task.train_step([task.prepare(rows)], 0)
    assert math.isfinite(stats["reg_mse"]) and stats["loss"] >= stats["loss_vsd"]
    assert task.sched_f.last_epoch == 2 and task.sched_g.last_epoch == 1  # two fake updates per generator update
    assert set(task._reg_cache) == {"obj0", "obj1"}  # teacher samples from the saved noise, cached per object
    z0 = task._reg_cache["obj0"][0].clone()
    task.train_step([task.prepare(rows)], 1)
    assert torch.equal(task._reg_cache["obj0"][0], z0)  # the same saved noise every time
    assert task.teacher_fingerprint() == fingerprint
    assert set(task.modules()["fake_score"].state_dict()) == set(task.teacher.unet.state_dict())  # a full copy


def test_evaluate_grid_and_metrics_and_export_bundle(tmp_path):
    from geco.models.bundle import load_bundle

    task, cfg = _task("stage1.sample_every=2")
    rows = _rows()
    val = task.prepare(rows, training=False)
    assert val["grid"].shape == (2, 3, 48, 32)
    r0 = task.evaluate(val, 0)
    assert set(r0.metrics) == {"psnr_generator_gt", "psnr_generator_teacher", "psnr_teacher_gt", "loss_fake",
                               "ssim_generator_teacher", "psnr_generator_teacher_paired"}  # LPIPS: no weights
    assert task.evaluate(val, 0).metrics["loss_fake"] == r0.metrics["loss_fake"]  # fixed timesteps and noise
    img = r0.images["samples"]
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[0] >= 2 * 48  # one row per object
    assert task.evaluate(val, 1).images == {}  # sample grids every stage1.sample_every steps ...
    assert "samples" in task.evaluate(val, cfg.stage1.train.steps).images  # ... and at the end
    # before training the generator is the teacher's UNet at t* (one step): far from the teacher's samples
    task.train_step([task.prepare(rows)] * 2, 0)
    r1 = task.evaluate(val, 1)
    assert r1.metrics["psnr_teacher_gt"] == r0.metrics["psnr_teacher_gt"]  # the teacher is frozen

    out = task.export(str(tmp_path / "out"))
    assert set(out) == {"bundle", "generator"}
    bundle = load_bundle(out["bundle"])
    for k, v in task.generator.unet.state_dict().items():
        assert torch.equal(bundle.generator.unet.state_dict()[k], v), k
    manifest = json.loads((tmp_path / "out" / "bundle" / "geco.json").read_text())
    assert manifest["components"]["teacher"]["unet_included"] is False


@pytest.fixture
def one_process_group():
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_path_matches_plain_training_and_checkpoints_full_state(tmp_path, monkeypatch, one_process_group):
    """The FSDP option in one CPU process (Ray Train itself needs GPUs for FSDP): the generator is
    wrapped, gathered full states feed checkpoints, rank 0's evaluation copy and the export, and a
    step equals the plain (unwrapped) task's step."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from geco.train import stage1

    monkeypatch.setattr(stage1, "FSDP_DEVICE_TYPES", {"cuda", "cpu"})

    def wrap(module, parallel_strategy=None):
        if parallel_strategy == "fsdp":
            return FSDP(module, device_id=torch.device("cpu"), use_orig_params=True)
        return module

    job = ["stage1.train.grad_accumulation=1", "stage1.train.checkpoint_every=2", "stage1.train.eval_every=2"]
    cfg = load_config(None, TINY + job + ["stage1.fsdp=true"])
    ctx = WorkerContext(rank=0, world_size=2, wrap=wrap)  # world_size > 1 turns the option on
    task = stage1.VSDTask(cfg, cfg.stage1.train, ctx)
    assert task.fsdp and not task.fake_fsdp  # a LoRA fake score stays DDP
    plain, _ = _task(*job)
    rows = _rows()
    a = task.train_step([task.prepare(rows)], 0)
    b = plain.train_step([plain.prepare(rows)], 0)
    assert a["loss_vsd"] == pytest.approx(b["loss_vsd"], rel=1e-5) and a["loss_fake"] == pytest.approx(b["loss_fake"], rel=1e-5)
    gather = StepPlan(checkpoint=True, evaluate=True)
    task.train_step([task.prepare(rows)], 1, gather)  # step 2: the glue checkpoints and evaluates -> gathered
    plain.train_step([plain.prepare(rows)], 1)
    full = task.modules()["generator"].state_dict()
    for k, v in plain.generator.unet.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-6)
    ev = task.evaluate(task.prepare(rows, training=False), 2)
    assert ev.metrics["psnr_generator_teacher"] == pytest.approx(
        plain.evaluate(plain.prepare(rows, training=False), 2).metrics["psnr_generator_teacher"], abs=1e-3)

    h = stage1.VSDTask.config_hash(cfg, cfg.stage1.train)
    save_checkpoint(tmp_path / "ck", step=2, models=task.modules(), optimizers=task.optimizers(),
                    schedulers=task.schedulers(), config_hash=h)
    with safe_open(str(tmp_path / "ck" / "models" / "generator.safetensors"), "pt") as f:
        assert set(f.keys()) == set(plain.generator.unet.state_dict())
    other = stage1.VSDTask(cfg, cfg.stage1.train, ctx)
    load_checkpoint(tmp_path / "ck", models=other.modules(), optimizers=other.optimizers(),
                    schedulers=other.schedulers(), config_hash=h)
    s1 = task.train_step([task.prepare(rows)], 2)
    s2 = other.train_step([other.prepare(rows)], 2)
    assert s1["loss_vsd"] == pytest.approx(s2["loss_vsd"], rel=1e-6)
    with pytest.raises(RuntimeError, match="not gathered"):  # step 3: no checkpoint there, no stale weights either
        task.modules()["generator"].state_dict()
    task.train_step([task.prepare(rows)], 3, gather)  # the last step: gathered for the export
    out = task.export(str(tmp_path / "out"))
    from geco.models.generator import load_generator

    g = load_generator(cfg.models.generator.model_copy(update={"pretrained": out["generator"]}), task.teacher)
    for k, v in task.modules()["generator"].state_dict().items():
        assert torch.equal(g.unet.state_dict()[k], v), k
