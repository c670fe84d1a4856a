"""Fixtures shared by the training tests: one tiny rendered dataset and one briefly trained teacher.

* ``tiny_dataset``: 8 procedural objects rendered once per session with real Blender through the
  render pipeline (32 px; 4 random views each); ``dataset.val_fraction=0.52`` puts procedural-0005
  and procedural-0007 in the val split.
* ``trained_teacher``: a tiny teacher (``TINY_MODELS`` sizes) trained for ``TEACHER_STEPS`` steps on
  it in this process (the pretrain task's own step, no Ray), saved in the pretrain stage's layout
  (``<root>/teacher``). Stage 1 needs a teacher that has learnt something: a random or barely
  trained teacher's one-step prediction already matches its multi-step samples (21-23 dB), leaving
  nothing to distil; this one's differ (~15 dB), as the paper's 1-step teacher differs from its
  75-step one.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from geco.config import load_config

TINY_RENDER = ["source.kind=procedural", "source.num_procedural=8", "render.cond.resolution=32",
               "render.zero123.resolution=32", "render.random.count=4", "render.random.resolution=32",
               "render.blender.samples=4", "render.blender.threads=1", "dataset.samples_per_shard=4",
               "dataset.val_fraction=0.52", "ray.num_renderers=2", "ray.cpus_per_renderer=0.5"]
TINY_TEACHER = ["models.teacher.tile_size=16", "models.teacher.cond_size=32"]
TEACHER_STEPS = 400  # diffusion loss ~0.40; at 150 steps (~0.71) its 1-step and 10-step samples nearly agree


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ray_local) -> str:
    from pipelines import render

    root = tmp_path_factory.mktemp("tiny-data")
    cfg = load_config(None, TINY_RENDER + TINY_TEACHER + [f"dataset.uri={root / 'shards'}", f"cache.dir={root / 'cache'}",
                                                          "tracking.enabled=false"])
    res = render.run(cfg)
    assert res.rendered == 8, res.summary()
    return str(root / "shards")


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, tiny_dataset) -> Path:
    import torch

    from geco.data.loader import iter_dataset
    from geco.train.loop import WorkerContext
    from geco.train.pretrain import TeacherPretrainTask

    root = tmp_path_factory.mktemp("trained-teacher")
    cfg = load_config(None, TINY_TEACHER + [f"pretrain.teacher.steps={TEACHER_STEPS}", "pretrain.teacher.lr=1e-3",
                                            "pretrain.teacher.lr_warmup_steps=10", "pretrain.teacher.batch_size=2"])
    task = TeacherPretrainTask(cfg, cfg.pretrain.teacher, WorkerContext())
    rows = sorted(iter_dataset(tiny_dataset, "train", decode=False), key=lambda r: r["__key__"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for step in range(TEACHER_STEPS):
            task.train_step([task.prepare([rows[(2 * step + j) % len(rows)] for j in range(2)])], step)
    task.export(str(root))
    return root
