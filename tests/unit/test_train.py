"""Training building blocks without Ray: checkpoints (safetensors + JSON, no pickle), the per-step
helper (accumulation, clipping, schedules), the resumable row stream, and the pretraining tasks on
synthetic shard rows (one step, evaluation, checkpoint round trip, export and reload)."""
from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest
import torch
from torch import nn

from geco.config import GecoConfig, load_config
from geco.train.checkpoint import (
    CheckpointError,
    DataPosition,
    checkpoint_files,
    decode_state,
    encode_state,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from geco.train.loop import GradientStep, WorkerContext, autocast, lr_factor, make_adamw, make_lr_scheduler


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(model, opt, sched, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 4, generator=g)
        loss = model(x).pow(2).mean() + 1e-3 * torch.randn(()).abs()  # also consumes the global RNG
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


# ------------------------------------------------------------------------------------------ checkpoints
def test_state_encoding_round_trip_and_refuses_objects():
    state = {"a": (1, 2.5, "x"), 3: [torch.arange(3), None, True], "nan": float("nan"), "inf": -math.inf,
             "arr": np.arange(4, dtype=np.uint32).reshape(2, 2), "__tensor__": "not a tag"}
    tensors = {}
    enc = encode_state(state, tensors)
    json.dumps(enc)  # plain JSON
    dec = decode_state(json.loads(json.dumps(enc)), tensors)
    assert dec["a"] == (1, 2.5, "x") and isinstance(dec["a"], tuple)
    assert torch.equal(dec[3][0], torch.arange(3)) and dec[3][1:] == [None, True]
    assert math.isnan(dec["nan"]) and dec["inf"] == -math.inf
    assert dec["arr"].dtype == np.uint32 and dec["arr"].tolist() == [[0, 1], [2, 3]]
    assert dec["__tensor__"] == "not a tag"
    with pytest.raises(TypeError, match="without pickle"):
        encode_state({"f": object()}, {})


def test_checkpoint_resumes_exactly_and_holds_no_pickle(tmp_path):
    model = _model()
    opt = make_adamw(model.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    sched = make_lr_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=10)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    _train(model, opt, sched, 3)
    save_checkpoint(tmp_path / "ck", step=3, models={"net": model}, optimizers={"adamw": opt},
                    schedulers={"lr": sched}, data_position=DataPosition(epoch=1, samples=7), config_hash="abc",
                    extra={"note": "x", "pair": (1, 2), "tensor": torch.ones(2)})
    expect_rng = (random.random(), float(np.random.rand()), float(torch.rand(())))
    _train(model, opt, sched, 2, seed=9)
    expected = [p.detach().clone() for p in model.parameters()]

    # Every file is JSON or safetensors; nothing needs unpickling.
    files = checkpoint_files(tmp_path / "ck")
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            from safetensors.torch import load_file

            load_file(str(p))
    assert read_checkpoint_meta(tmp_path / "ck")["step"] == 3

    model2 = _model(seed=42)
    opt2 = make_adamw(model2.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    sched2 = make_lr_scheduler(opt2, schedule="cosine", warmup_steps=2, total_steps=10)
    random.seed(0)
    torch.manual_seed(0)
    st = load_checkpoint(tmp_path / "ck", models={"net": model2}, optimizers={"adamw": opt2},
                         schedulers={"lr": sched2}, config_hash="abc")
    assert (st.step, st.data_position, st.config_hash, st.rng_restored) == (3, DataPosition(1, 7), "abc", True)
    assert st.extra["pair"] == (1, 2) and torch.equal(st.extra["tensor"], torch.ones(2))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95) and sched2.last_epoch == 3
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect_rng
    _train(model2, opt2, sched2, 2, seed=9)
    for a, b in zip(model2.parameters(), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit-identical continuation


def test_checkpoint_errors(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ck", step=1, models={"net": model}, config_hash="abc")
    with pytest.raises(CheckpointError, match="config hash"):
        load_checkpoint(tmp_path / "ck", models={"net": _model()}, config_hash="other")
    with pytest.raises(CheckpointError, match="no model state"):
        load_checkpoint(tmp_path / "ck", models={"other": _model()})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "ck", models={"net": nn.Linear(4, 2)})
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "half")
    with pytest.raises(ValueError, match="plain file name"):
        save_checkpoint(tmp_path / "bad", step=0, models={"../x": model})


# ------------------------------------------------------------------------------------------ the step helper
def test_lr_schedule():
    f = lambda s, **kw: lr_factor(s, **{"schedule": "cosine", "warmup_steps": 4, "total_steps": 14, **kw})  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.5) < 1e-9 and abs(f(14)) < 1e-9 and f(100) == 0.0
    assert abs(f(14, min_ratio=0.1) - 0.1) < 1e-9
    assert lr_factor(50, schedule="constant", warmup_steps=0, total_steps=10) == 1.0
    assert abs(lr_factor(5, schedule="linear", warmup_steps=0, total_steps=10) - 0.5) < 1e-9


def test_gradient_accumulation_matches_one_big_batch():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for accumulation in (1, 2, 4):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stepper = GradientStep(model.parameters(), opt, accumulation=accumulation, max_grad_norm=0.0)
        for i, chunk in enumerate(x.chunk(accumulation)):
            with stepper.micro(model, i):
                stepper.backward(model(chunk).pow(2).mean())
        stats = stepper.step()
        assert stats["lr"] == 0.1 and stats["grad_norm"] > 0
        assert all(p.grad is None for p in model.parameters())
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model = _model()
    stepper = GradientStep(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), accumulation=2)
    stepper.backward(model(x).sum())
    with pytest.raises(RuntimeError, match="expected 2"):
        stepper.step()


def test_clipping_and_cpu_autocast_is_off():
    model = _model()
    stepper = GradientStep(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), max_grad_norm=0.5)
    stepper.backward(1000 * model(torch.ones(2, 4)).sum())
    assert stepper.step()["grad_norm"] > 0.5  # the norm before clipping is reported
    with autocast("cpu", "bf16"):
        assert model(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(ValueError):
        autocast("cpu", "fp8")


# ------------------------------------------------------------------------------------------ data stream
class _Shard:
    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        yield from self.rows


def test_row_stream_resumes_at_the_same_row():
    from geco.train.stream import RowStream

    rows = [{"__key__": f"k{i}"} for i in range(5)]
    a = RowStream(_Shard(rows), DataPosition(), seed=3, rank=0, buffer=3)
    seen = [r["__key__"] for _ in range(4) for r in a.take(2)]  # 8 rows: crosses an epoch
    assert a.position == DataPosition(epoch=1, samples=3)
    assert sorted(seen[:5]) == sorted(r["__key__"] for r in rows)  # each row once per epoch
    pos = DataPosition(a.position.epoch, a.position.samples)
    b = RowStream(_Shard(rows), pos, seed=3, rank=0, buffer=3)
    assert [r["__key__"] for r in b.take(4)] == [r["__key__"] for r in a.take(4)]
    with pytest.raises(RuntimeError, match="empty"):
        RowStream(_Shard([]), DataPosition(), seed=0, rank=1, buffer=2).take(1)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_hands_out_the_stream_in_order_and_records_the_consumed_position(depth):
    """Prefetching runs ahead of training, but a checkpoint records where the *consumed* steps end: a
    stream resumed from that position yields exactly the steps that follow."""
    import threading

    from geco.train.stream import Prefetcher, RowStream

    rows = [{"__key__": f"k{i}"} for i in range(7)]
    threads = set()

    def prepare(batch):
        threads.add(threading.get_ident())
        return [r["__key__"] for r in batch]

    def loader(position):
        stream = RowStream(_Shard(rows), position, seed=5, rank=0, buffer=4)
        return Prefetcher(stream, prepare, batch_size=2, accumulation=2, depth=depth)

    ref = RowStream(_Shard(rows), DataPosition(), seed=5, rank=0, buffer=4)
    expected = [[[r["__key__"] for r in ref.take(2)] for _ in range(2)] for _ in range(5)]
    a = loader(DataPosition())
    got = [a.next() for _ in range(3)]
    assert got == expected[:3]
    assert a.position == DataPosition(epoch=1, samples=5)  # 12 rows consumed: 7 + 5, whatever ran ahead
    b = loader(DataPosition(a.position.epoch, a.position.samples))
    assert [b.next() for _ in range(2)] == expected[3:5]
    a.close()
    b.close()
    assert (threading.get_ident() in threads) == (depth == 0)  # decoded off the training thread


@pytest.mark.parametrize("depth", [0, 2])
def test_random_choices_in_prepare_replay_after_a_resume_whatever_ran_ahead(depth):
    """A task's ``prepare`` draws from ``batch_generator()``: a resumed loader draws for each step what
    the uninterrupted one drew, though the prefetch thread had prepared steps past the checkpoint (with
    the global RNG it would not: the RNG state a checkpoint records is then ahead of the data)."""
    from geco.train.stream import Prefetcher, RowStream, batch_generator

    rows = [{"__key__": f"k{i}"} for i in range(7)]

    def prepare(batch):
        return [r["__key__"] for r in batch], torch.randperm(1000, generator=batch_generator())[:3].tolist()

    def loader(position):
        stream = RowStream(_Shard(rows), position, seed=5, rank=0, buffer=4)
        return Prefetcher(stream, prepare, batch_size=2, accumulation=2, depth=depth)

    a = loader(DataPosition())
    first = [a.next() for _ in range(2)]
    time.sleep(0.2)  # let the prefetch thread run ahead of the "checkpoint"
    pos = DataPosition(a.position.epoch, a.position.samples)
    rest = [a.next() for _ in range(3)]
    torch.manual_seed(123)  # a restored global RNG state plays no part
    b = loader(pos)
    assert [b.next() for _ in range(3)] == rest
    draws = [d for step in first + rest for _, d in step]
    assert len({tuple(d) for d in draws}) == len(draws)  # every micro-batch draws afresh
    assert batch_generator() is None  # outside a prefetcher: the global RNG
    a.close()
    b.close()


def test_prefetcher_raises_loader_errors_on_the_training_thread():
    from geco.train.stream import Prefetcher, RowStream

    def prepare(batch):
        raise ValueError(f"cannot decode {batch[0]['__key__']}")

    stream = RowStream(_Shard([{"__key__": "bad"}]), DataPosition(), seed=0, rank=0, buffer=1)
    loader = Prefetcher(stream, prepare, batch_size=1, accumulation=1, depth=2)
    with pytest.raises(ValueError, match="cannot decode bad"):
        loader.next()
    loader.close()


def test_holdout_is_stable():
    from pipelines.training import holdout_keys

    keys = [f"obj{i}" for i in range(20)]
    held = holdout_keys(keys, 0.1)
    assert len(held) == 2 and held == holdout_keys(list(reversed(keys)), 0.1)
    assert held <= holdout_keys(keys + [f"new{i}" for i in range(5)], 0.1) | held
    assert holdout_keys(["only"], 0.5) == set() and len(holdout_keys(["a", "b"], 0.01)) == 1


# ------------------------------------------------------------------------------------------ pretraining tasks
TINY = [
    "models.teacher.tile_size=16", "models.teacher.cond_size=16", "models.teacher.tiny_block_out_channels=[16,32]",
    "models.reconstructor.input_size=16", "models.reconstructor.lgm.down_channels=[8,16,32]",
    "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[32,16]",
    "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
    "models.reconstructor.lgm.norm_groups=4", "models.reconstructor.lgm.layers_per_block=1",
    "models.reconstructor.lambda_lpips=0", "pretrain.teacher.eval_steps=2", "pretrain.teacher.eval_timesteps=2",
    "pretrain.reconstructor.supervision_views=3",
]


def _rows(n=2):
    from geco.data.schema import sample_from_members
    from tests.unit.test_shards import make_members

    return [sample_from_members(f"obj{i}", make_members(f"obj{i}", seed=i)) for i in range(n)]


def test_the_reconstructor_pretrains_with_the_cameras_of_the_views_it_is_given():
    """K is in pixels of the views handed to the reconstructor (it resizes views and K together), here
    the renders' size, not its input size: as at inference (geco.generate, pseudo-GT). Pretraining once
    passed input-size K with larger renders and learnt from rays of the wrong field of view."""
    from geco.models.reconstructors import input_cameras
    from geco.train.pretrain import TASKS

    cfg: GecoConfig = load_config(None, TINY)
    rcfg = cfg.models.reconstructor
    task = TASKS["reconstructor"](cfg, cfg.pretrain.reconstructor, WorkerContext())
    batch = task.prepare(_rows(1), training=False)
    size = batch["images"].shape[-1]
    assert size != rcfg.input_size  # the case that matters
    K_input, _ = input_cameras(rcfg)  # pixels of the input size
    told = batch["Ks"][0, :, :2, :].double() / size
    assert torch.allclose(told, K_input[:, :2, :].double() / rcfg.input_size, atol=1e-7)


@pytest.mark.parametrize("target", ["teacher", "reconstructor"])
def test_pretrain_task_step_eval_checkpoint_export(tmp_path, target):
    from geco.train.pretrain import TASKS

    cfg: GecoConfig = load_config(None, TINY + [f"pretrain.{target}.steps=3", f"pretrain.{target}.lr=1e-3",
                                               f"pretrain.{target}.grad_accumulation=2"])
    job = getattr(cfg.pretrain, target)
    task = TASKS[target](cfg, job, WorkerContext())
    rows = _rows()
    batch = task.prepare(rows)
    if target == "reconstructor":
        assert batch["sup_rgb"].shape[:2] == (2, 3)  # supervision_views per object
        assert task.prepare(rows, training=False)["sup_rgb"].shape[1] == 6 + 2  # every view
    before = task.evaluate(task.prepare(rows, training=False), 0)
    stats = task.train_step([batch, task.prepare(rows)], 0)  # two micro-batches
    assert math.isfinite(stats["loss"]) and stats["lr"] > 0 and stats["grad_norm"] > 0
    after = task.evaluate(task.prepare(rows, training=False), 1)
    assert set(before.metrics) == set(after.metrics) and all(math.isfinite(v) for v in after.metrics.values())
    (image,) = after.images.values()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    h = TASKS[target].config_hash(cfg, job)
    save_checkpoint(tmp_path / "ck", step=1, models=task.modules(), optimizers=task.optimizers(),
                    schedulers=task.schedulers(), config_hash=h)
    other = TASKS[target](cfg, job, WorkerContext())
    load_checkpoint(tmp_path / "ck", models=other.modules(), optimizers=other.optimizers(),
                    schedulers=other.schedulers(), config_hash=h)
    for name, m in task.modules().items():
        for (k, a), b in zip(m.state_dict().items(), other.modules()[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    # architecture changes change the hash; schedule changes do not
    assert TASKS[target].config_hash(load_config(None, TINY + [f"pretrain.{target}.steps=99"]), job) == h
    wider = "models.teacher.tiny_block_out_channels=[32,64]" if target == "teacher" else "models.reconstructor.lgm.down_channels=[16,16,32]"
    assert TASKS[target].config_hash(load_config(None, TINY + [wider]), job) != h

    exported = task.export(str(tmp_path / "out"))
    if target == "teacher":
        from geco.config import TeacherConfig
        from geco.models.teacher import load_teacher

        t = load_teacher(TeacherConfig(**{**cfg.models.teacher.model_dump(), "pretrained": exported["teacher"]}))
        assert t.vae.config.scaling_factor == job.vae_scaling_factor
        assert torch.equal(t.unet.conv_in.weight, task.teacher.unet.conv_in.weight)
    else:
        from geco.models.reconstructors import load_reconstructor

        r = load_reconstructor(cfg.models.reconstructor.model_copy(update={"pretrained": exported["reconstructor"]}))
        assert torch.equal(r.conv.weight, task.recon.conv.weight)


def test_pretrain_plan_skips_models_with_weights():
    from pipelines.pretrain import plan

    todo, skipped = plan(load_config(None, ["models.reconstructor.pretrained=/x/model.safetensors"]))
    assert todo == ["teacher"] and "pretrained" in skipped["reconstructor"]
    todo, skipped = plan(load_config(None, ["pretrain.targets=[reconstructor]"]))
    assert todo == ["reconstructor"] and skipped["teacher"] == "not in pretrain.targets"


def test_the_trainer_leaves_out_rays_placement_group_cleaner():
    """Ray 2.60's cleaner removes a live run's placement group when the State API does not find its
    controller (a loaded head): the project's trainer leaves it out and keeps every other default."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipelines.training.driver import torch_trainer_class

    def loop(config):  # never run
        pass

    stock = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1))
    ours = torch_trainer_class()(loop, scaling_config=ScalingConfig(num_workers=1))
    stock_kinds = [type(c) for c in stock._create_default_callbacks()]
    assert PlacementGroupCleanerCallback in stock_kinds  # what is left out exists in this Ray
    assert [type(c) for c in ours._create_default_callbacks()] == [
        k for k in stock_kinds if k is not PlacementGroupCleanerCallback]
