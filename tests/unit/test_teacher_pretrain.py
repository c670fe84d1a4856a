"""Teacher pretraining trains the new CLIP image encoder with the UNet (``pretrain.teacher.
train_image_encoder``): a random frozen one gives nearly one embedding for every image and the UNet
barely learns to use its condition. Gradients reach the encoder only there: everywhere else
``encode_condition`` stays gradient-free (stage 1 and 2 never train it)."""
from __future__ import annotations

import torch

from geco.config import load_config
from geco.data.schema import sample_from_members
from geco.train.loop import WorkerContext
from geco.train.pretrain import TeacherPretrainTask
from tests.fake_renders import render_sample

TINY = ["models.teacher.tile_size=16", "models.teacher.cond_size=32", "pretrain.teacher.batch_size=2"]


def _rows(keys):
    return [sample_from_members(k, {m: v for m, v in render_sample(k).items() if m != "__key__"}, require_depth=False,
                                require_normals=False) for k in keys]


def test_the_image_encoder_trains_with_the_unet_only_when_asked():
    rows = _rows(["a", "b"])
    for flag in (True, False):
        cfg = load_config(None, TINY + [f"pretrain.teacher.train_image_encoder={str(flag).lower()}"])
        task = TeacherPretrainTask(cfg, cfg.pretrain.teacher, WorkerContext())
        before = {k: v.clone() for k, v in task.teacher.vision_encoder.state_dict().items()}
        task.train_step([task.prepare(rows)], 0)
        changed = any(not torch.equal(v, task.teacher.vision_encoder.state_dict()[k]) for k, v in before.items())
        assert changed is flag
        assert ("vision_encoder" in task.modules()) is flag  # checkpointed with the UNet when trained
        assert TeacherPretrainTask.config_hash(cfg, cfg.pretrain.teacher) != TeacherPretrainTask.config_hash(
            cfg, cfg.pretrain.teacher.model_copy(update={"train_image_encoder": not flag}))
    # outside pretraining (frozen encoder) and under no_grad the condition carries no graph
    cond = task.teacher.encode_condition(task.prepare(rows)["cond"])
    assert not cond.encoder_hidden_states.requires_grad
    task.teacher.vision_encoder.requires_grad_(True)
    with torch.no_grad():
        assert not task.teacher.encode_condition(task.prepare(rows)["cond"]).encoder_hidden_states.requires_grad
    assert task.teacher.encode_condition(task.prepare(rows)["cond"]).encoder_hidden_states.requires_grad
