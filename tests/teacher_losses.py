"""The teacher's diffusion loss on a dataset split with its condition, without it and with another
object's: the test of whether a teacher uses its condition image (test_pretrain, test_teacher_condition)."""
from __future__ import annotations


def condition_losses(teacher, cfg, dataset: str, split: str = "val", timesteps: list[int] | None = None,
                     random_unet=None) -> dict[str, float]:
    """Mean v-MSE of ``teacher`` on the objects of ``split`` (sorted by key), over ``timesteps``
    (default: 8 evenly spaced), with each object's own condition ("trained"), the condition dropped to
    the CFG-unconditional one ("uncond"), the next object's condition ("swapped"), and, when given, a
    ``random_unet`` in the teacher's place ("random"). Same VAE, timesteps and noise for every variant."""
    import torch

    from geco.data.loader import iter_dataset
    from geco.train.loop import WorkerContext
    from geco.train.pretrain import TeacherPretrainTask

    rows = sorted(iter_dataset(dataset, split, decode=False), key=lambda r: r["__key__"])
    batch = TeacherPretrainTask(cfg, cfg.pretrain.teacher, WorkerContext()).prepare(rows, training=False)
    if timesteps is None:
        timesteps = torch.linspace(0, teacher.num_train_timesteps - 1, 8).round().long().tolist()
    variants = {"trained": (batch["cond"], False, None), "uncond": (batch["cond"], True, None),
                "swapped": (batch["cond"].roll(1, dims=0), False, None)}
    if random_unet is not None:
        variants["random"] = (batch["cond"], False, random_unet)
    losses = {}
    for name, (cond_rgb, drop, unet) in variants.items():
        g, total = torch.Generator().manual_seed(0), 0.0
        for t in timesteps:
            with torch.no_grad():
                cond = teacher.encode_condition(cond_rgb, g)
                total += float(teacher.diffusion_loss(cond.uncond() if drop else cond, batch["grid"], generator=g,
                                                      unet=unet, t=torch.full((batch["grid"].shape[0],), t)))
        losses[name] = round(total / len(timesteps), 4)
    return losses
