"""Stage 2 — 3D-consistency distillation of the one-step generator (PAPER.md, "Stage 2").

The generator's six views must make a consistent object, so stage 2 supervises it through 3D::

    cond, z ──G (trained)──▶ x0 latents ──VAE decode──▶ 6 views ──R (frozen)──▶ Gaussians
         ──rasterizer──▶ V views of the sample  ◀── MSE(RGB) + MSE(alpha) + λ·LPIPS ──▶ pseudo-GT

* **G** — :class:`geco.models.generator.OneStepGenerator` (stage 1's), the only trained network;
  the teacher's VAE decoder and the reconstructor R are frozen but differentiable, so the loss
  reaches G's UNet through both;
* **cameras** — R is told its six input views were taken at the Zero123++ poses relative to the
  conditioning view (:func:`geco.generate.reconstructor_cameras` with the sample's conditioning
  azimuth), so its Gaussians come out in the frame of the sample's ``cameras.json`` and are rendered
  at the sample's own views (world-to-camera OpenCV, K in pixels: :mod:`geco.render.splat`);
* **loss** — the reconstructor's own training loss,
  :func:`geco.models.reconstructors.lgm.reconstruction_loss`: MSE on RGB (targets composited on the
  reconstructor's background, renders over the same) + MSE on alpha + ``lambda_lpips`` × LPIPS(VGG)
  at ≤ 256 px; LPIPS is left out when its weights do not load (the caller warns), never replaced;
* **precision** — G and R may run under bf16 autocast (GPU); the rasterizer and the loss run in
  float32 (:func:`geco.train.loop.no_autocast`).

One optimiser step (:class:`ConsistencyStep`): per micro-batch the condition is encoded, the noise
is the sample's (``noise``, from the pseudo-GT's ``noise.npy``: the noise the teacher sampled from)
or drawn, ``views_per_step`` of each object's views are drawn, and :class:`ConsistencyObjective`'s
loss is back-propagated; then one update. Every random number comes from one CPU ``torch.Generator``
in a fixed order, so a caller seeding it by (seed, rank, step) makes a resumed run exact.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from geco.models.reconstructors.lgm import reconstruction_loss
from geco.models.teacher import Condition, _randn, views_from_grid
from geco.train.loop import no_autocast

__all__ = ["ConsistencyObjective", "ConsistencyStep", "pick_views"]


class ConsistencyObjective(nn.Module):
    """The stage-2 loss on one micro-batch, as a module whose only registered submodule is the
    generator (what DDP synchronises); the reconstructor and LPIPS are plain references (frozen,
    outside DDP and the checkpoints).

    ``forward(cond, z, in_K, in_c2w, rgb, alpha, K, w2c)``: ``cond`` a
    :class:`~geco.models.teacher.Condition` for B objects, ``z`` [B, 4, h, w] noise, ``in_K`` /
    ``in_c2w`` [B, 6, 3, 3] / [B, 6, 4, 4] the cameras R is told for the generator's views (K in
    pixels of a tile), ``rgb`` [B, V, 3, H, W] / ``alpha`` [B, V, 1, H, W] the targets (RGB
    composited on R's background), ``K`` [B, V, 3, 3] / ``w2c`` [B, V, 4, 4] their cameras ->
    ``{"loss", "mse_rgb", "mse_alpha", "psnr"[, "lpips"], "views", "render", "render_alpha"}``
    (the last three detached: the generator's views [B, 6, 3, t, t] and the renders)."""

    def __init__(self, generator: nn.Module, reconstructor: nn.Module, lpips: Any = None, lambda_lpips: float = 1.0):
        super().__init__()
        self.generator = generator
        object.__setattr__(self, "_refs", (reconstructor, lpips))  # references, not submodules
        self.lambda_lpips = float(lambda_lpips)

    @property
    def reconstructor(self) -> nn.Module:
        return self._refs[0]

    def forward(self, cond: Condition, z: torch.Tensor, in_K: torch.Tensor, in_c2w: torch.Tensor, rgb: torch.Tensor,
                alpha: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor) -> dict[str, torch.Tensor]:
        recon, lpips = self._refs
        teacher = self.generator.teacher
        latents = self.generator(cond, z)
        views = views_from_grid(teacher.decode_latents(latents), teacher.tile_size)  # [B, 6, 3, t, t]
        gaussians = recon(views, in_K, in_c2w)  # float32, our world (the sample's frame)
        with no_autocast(rgb.device):
            pred_rgb, pred_alpha = recon.render(gaussians, w2c, K, rgb.shape[-1], rgb.shape[-2])
            out = reconstruction_loss(pred_rgb, pred_alpha, rgb, alpha, lpips=lpips,
                                      lambda_lpips=self.lambda_lpips if lpips is not None else 0.0)
        out.update(views=views.detach(), render=pred_rgb.detach(), render_alpha=pred_alpha.detach())
        return out


def pick_views(views: Sequence[Mapping[str, torch.Tensor]], count: int | None, gen: torch.Generator | None,
               device: torch.device | str) -> dict[str, torch.Tensor]:
    """Per object ``{"rgb" [V_i, 3, H, W], "alpha", "K", "w2c"}`` -> the batch of ``count`` views per
    object, drawn without replacement with ``gen`` (``count=None``: the first ``min V_i`` views of
    each, in order: the evaluation's fixed set), stacked to [B, count, ...] on ``device``."""
    n = min(v["rgb"].shape[0] for v in views)
    picked: dict[str, list[torch.Tensor]] = {k: [] for k in ("rgb", "alpha", "K", "w2c")}
    for v in views:
        if count is None:
            idx = torch.arange(n)
        else:
            if v["rgb"].shape[0] < count:
                raise ValueError(f"an object has {v['rgb'].shape[0]} views, {count} are drawn per step")
            idx = torch.randperm(v["rgb"].shape[0], generator=gen)[:count]
        for k in picked:
            picked[k].append(v[k][idx])
    return {k: torch.stack(t).to(device) for k, t in picked.items()}


class ConsistencyStep:
    """One optimiser step of stage 2 on a list of micro-batches (gradient accumulation)::

        step = ConsistencyStep(teacher, objective, stepper, views_per_step=4, use_saved_noise=True)
        metrics = step(micro_batches, torch.Generator().manual_seed(...))

    ``objective``: a :class:`ConsistencyObjective`, possibly DDP-wrapped; ``stepper``: the
    generator's :class:`~geco.train.loop.GradientStep` (optimiser, scheduler, clipping, autocast).
    A micro-batch (``geco.train.stage2.Stage2Task.prepare``): ``{"cond" [B, 3, H, W], "noise" [B, 4,
    h, w], "in_K", "in_c2w", "views": per object {"rgb", "alpha", "K", "w2c"}}``. Returns the
    micro-batch means of the loss terms, ``grad_norm`` and ``lr``."""

    def __init__(self, teacher, objective: nn.Module, stepper, *, views_per_step: int, use_saved_noise: bool = True):
        self.teacher = teacher
        self.objective = objective
        self.stepper = stepper
        self.views_per_step = views_per_step
        self.use_saved_noise = use_saved_noise

    def __call__(self, micro_batches: Sequence[Mapping[str, Any]], gen: torch.Generator) -> dict[str, float]:
        teacher, dev, n = self.teacher, self.teacher.device, len(micro_batches)
        sums: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            cond = teacher.encode_condition(mb["cond"], generator=gen)
            b = cond.batch_size
            z = mb["noise"].to(dev) if self.use_saved_noise else _randn(teacher.latent_shape(b), gen, dev)
            target = pick_views(mb["views"], self.views_per_step, gen, dev)
            with self.stepper.micro(self.objective, i):
                out = self.objective(cond, z, mb["in_K"], mb["in_c2w"], target["rgb"], target["alpha"], target["K"],
                                     target["w2c"])
                self.stepper.backward(out["loss"])
            for k in ("loss", "mse_rgb", "mse_alpha", "psnr", "lpips"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k].detach()) / n
        sums.update(self.stepper.step())
        return sums
