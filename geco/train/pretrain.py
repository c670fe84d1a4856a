"""Pretraining tasks: a teacher and a reconstructor trained from the render shards (pure torch).

The embedded default has no downloadable teacher or reconstructor, so the ``pretrain`` stage
(``pipelines/pretrain.py``) trains small ones with these tasks under Ray Train.

:class:`TeacherPretrainTask`
    The ordinary diffusion loss of Zero123++ (v-prediction, t uniform in [0, 999]) on the 3 x 2
    grid of the 6 ground-truth Zero123++ views (tiles resized to ``models.teacher.tile_size``),
    conditioned on the object's conditioning view, with condition dropout for classifier-free
    guidance. A teacher trained here starts from random weights, so its VAE is random too and
    is trained jointly (MSE reconstruction of the grid in the VAE's input range + a small
    per-element KL that keeps the latents near unit variance; its scaling factor is set to
    ``vae_scaling_factor``). Evaluation on held-out objects: PSNR of few-step DDIM samples vs
    the ground-truth grid (and ``psnr_sample_paired_min``, :func:`geco.metrics.paired_psnr_margin`:
    above 0 when every sample is closer to its own object than to any other), PSNR of the VAE's
    reconstruction, and the diffusion loss at fixed timesteps and noise (in the VAE's latent space
    of the moment: with the VAE training, not comparable across steps). Export: the Zero123++ folder layout (:func:`save_teacher`).
:class:`ReconstructorPretrainTask`
    LGM-style: the 6 ground-truth Zero123++ views in (composited on the reconstructor's
    background, with the cameras the reconstructor is told at inference,
    :func:`geco.models.reconstructors.input_cameras`), Gaussians rendered at ``supervision_views`` views drawn
    from the object's random views (and the 6 input views) and supervised with MSE on RGB and
    alpha, + LPIPS when its weights load (otherwise the term is off, with a warning).
    Evaluation: PSNR of renders vs ground truth at every view of held-out objects (also
    separately at the random views, which the network never sees as input; ``psnr_paired_min`` as
    for the teacher). Export: LGM's
    safetensors layout (:func:`save_reconstructor`).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geco import storage
from geco.data.schema import decode_sample
from geco.images import grid, labeled_grid, to_uint8
from geco.metrics import paired_psnr_margin
from geco.train.loop import (
    EvalResult,
    StepPlan,
    TrainTask,
    WorkerContext,
    config_hash,
    job_optimizer,
    psnr,
)
from geco.train.loop import no_autocast as _no_autocast
from geco.train.stream import batch_generator

log = logging.getLogger(__name__)

# TeacherConfig / ReconstructorConfig fields that change how a model is used, not its weights:
# changing them must not start training from scratch.
_TEACHER_RUNTIME_FIELDS = {"guidance_scale", "num_inference_steps", "sampler", "timestep_spacing", "cond_latent",
                           "keep_text_encoder", "cache_dir", "uncond_image_value"}
_RECON_RUNTIME_FIELDS = {"lambda_lpips"}


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., C, size, size] (bilinear, antialiased); unchanged when already there."""
    if images.shape[-2:] == (size, size):
        return images
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def _at_size(views: dict, size: int) -> dict:
    """A view group (rgb [V,3,H,W], alpha, K [V,3,3], w2c) resized to size x size, K rescaled."""
    h, w = views["rgb"].shape[-2:]
    if (h, w) == (size, size):
        return views
    K = views["K"].clone()
    K[..., 0, :] *= size / w
    K[..., 1, :] *= size / h
    return {**views, "rgb": _resize(views["rgb"], size), "alpha": _resize(views["alpha"], size), "K": K}


def _models_section(section, runtime_fields: set[str]) -> dict:
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in runtime_fields}


# ================================================================================================
# Teacher
# ================================================================================================
class _TeacherLoss(nn.Module):
    """The module DDP wraps: the teacher (UNet + VAE trained) and its training loss."""

    def __init__(self, teacher, job):
        super().__init__()
        self.teacher = teacher
        self.job = job

    def vae_loss(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        from geco.models.teacher import images_to_vae_input

        vae = self.teacher.vae
        x = images_to_vae_input(grid).to(vae.dtype)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        return {"vae_rec": F.mse_loss(rec.float(), x.float()), "vae_kl": post.kl().mean() / z[0].numel()}

    def forward(self, cond_rgb: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"diffusion": self.teacher.diffusion_loss(cond_rgb, grid, drop_cond_prob=self.job.drop_cond_prob)}
        loss = out["diffusion"]
        if self.job.vae_loss_weight > 0:
            out.update(self.vae_loss(grid))
            loss = loss + self.job.vae_loss_weight * (out["vae_rec"] + self.job.vae_kl_weight * out["vae_kl"])
        out["loss"] = loss
        return out


class TeacherPretrainTask(TrainTask):
    """Trains a randomly initialised Zero123++-style teacher (UNet + VAE) on the shards."""

    name = "teacher"

    @classmethod
    def config_hash(cls, cfg, job, inputs=None) -> str:
        return config_hash(cls.name, _models_section(cfg.models.teacher, _TEACHER_RUNTIME_FIELDS),
                           job.vae_scaling_factor, job.vae_loss_weight > 0, job.train_image_encoder)

    def __init__(self, cfg, job, ctx: WorkerContext, inputs=None):
        from geco.models.teacher import build_tiny_teacher

        super().__init__(cfg, job, ctx, inputs)
        tcfg = cfg.models.teacher
        if tcfg.pretrained:
            raise ValueError("models.teacher.pretrained is set: the teacher needs no pretraining")
        teacher = build_tiny_teacher(tcfg, seed=job.seed)
        teacher.vae.register_to_config(scaling_factor=float(job.vae_scaling_factor))
        teacher.unet.requires_grad_(True)
        if job.vae_loss_weight > 0:
            teacher.vae.requires_grad_(True)
        if job.train_image_encoder:
            teacher.vision_encoder.requires_grad_(True)
        if job.gradient_checkpointing:
            teacher.unet.enable_gradient_checkpointing()
        self.teacher = teacher
        self.loss_module = _TeacherLoss(teacher, job)
        self.model = ctx.prepare(self.loss_module)  # DDP in a distributed run
        self._train_mode()
        self.optimizer, self.scheduler, self.stepper = job_optimizer(self.loss_module.parameters(), job, ctx)

    def _train_mode(self, on: bool = True) -> None:
        # only the trained parts; the frozen CLIP encoders stay in eval mode
        self.teacher.unet.train(on)
        self.teacher.vae.train(on and self.job.vae_loss_weight > 0)
        self.teacher.vision_encoder.train(on and self.job.train_image_encoder)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.teacher.unet}
        if self.job.vae_loss_weight > 0:
            mods["vae"] = self.teacher.vae
        if self.job.train_image_encoder:
            mods["vision_encoder"] = self.teacher.vision_encoder
        return mods

    def optimizers(self):
        return {"adamw": self.optimizer}

    def schedulers(self):
        return {"lr": self.scheduler}

    def prepare(self, rows: list[dict], training: bool = True) -> dict[str, Any]:
        from geco.models.teacher import grid_from_views

        tile = self.cfg.models.teacher.tile_size
        samples = [decode_sample(r, background=(1.0, 1.0, 1.0), views=[f"{i:03d}" for i in range(6)],
                                 with_depth=False, with_normals=False) for r in rows]
        cond = torch.stack([s["cond_rgb"] for s in samples])
        views = _resize(torch.stack([s["zero123"]["rgb"] for s in samples]), tile)  # [B, 6, 3, t, t]
        dev = self.ctx.device
        return {"keys": [s["key"] for s in samples], "cond": cond.to(dev), "grid": grid_from_views(views).to(dev)}

    def train_step(self, micro_batches: list[dict], step: int, plan: StepPlan = StepPlan()) -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            with self.stepper.micro(self.model, i):
                out = self.model(mb["cond"], mb["grid"])
                self.stepper.backward(out["loss"])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        return {**sums, **self.stepper.step()}

    @torch.no_grad()
    def evaluate(self, batch: dict, step: int) -> EvalResult:
        t = self.teacher
        self._train_mode(False)
        try:
            gen = torch.Generator().manual_seed(self.job.seed + 12345)
            lat = t.sample(batch["cond"], num_steps=self.job.eval_steps, guidance_scale=self.job.eval_guidance_scale,
                           sampler="ddim", generator=gen)
            samples = t.decode_latents(lat)
            recon = t.decode_latents(t.encode_images(batch["grid"], sample=False))
            n_t = self.job.eval_timesteps
            losses = []
            for tt in torch.linspace(0, t.num_train_timesteps - 1, n_t).round().long().tolist():
                b = batch["grid"].shape[0]
                losses.append(float(t.diffusion_loss(batch["cond"], batch["grid"], generator=gen,
                                                     t=torch.full((b,), tt, device=t.device))))
        finally:
            self._train_mode(True)
        metrics = {"psnr_sample": psnr(samples, batch["grid"]), "psnr_vae": psnr(recon, batch["grid"]),
                   "diffusion_loss": float(np.mean(losses))}
        if samples.shape[0] >= 2:  # each sample closer to its own object than to any other: > 0
            metrics["psnr_sample_paired_min"] = float(paired_psnr_margin(samples, batch["grid"]).min())
        rows = []
        for i in range(samples.shape[0]):
            cond = _resize(batch["cond"][i].cpu(), samples.shape[-1])
            rows.append([to_uint8(cond), to_uint8(batch["grid"][i]), to_uint8(samples[i])])
        return EvalResult(metrics, {"samples": labeled_grid(rows, ["condition", "ground truth", "sample"])})

    def export(self, output_uri: str) -> dict[str, str]:
        from geco.models.teacher import save_teacher

        uri = save_teacher(self.teacher, storage.join(output_uri, "teacher"))
        return {"teacher": uri}


# ================================================================================================
# Reconstructor
# ================================================================================================
class _ReconstructorLoss(nn.Module):
    """The module DDP wraps: the reconstructor, its renders and the rendering loss."""

    def __init__(self, model, lpips=None):
        super().__init__()
        self.model = model
        self.lpips = [lpips]  # a list: keep the frozen LPIPS net out of DDP and the checkpoints

    def forward(self, images, Ks, c2w, sup_rgb, sup_alpha, sup_K, sup_w2c) -> dict[str, torch.Tensor]:
        g = self.model(images, Ks, c2w)  # the U-Net may run in bf16 (autocast); Gaussians come out float32
        with _no_autocast(sup_rgb.device):  # the rasterizer (gsplat on CUDA) and the loss stay float32
            rgb, alpha = self.model.render(g, sup_w2c, sup_K, sup_rgb.shape[-1], sup_rgb.shape[-2])
            out = self.model.loss(rgb, alpha, sup_rgb, sup_alpha, lpips=self.lpips[0])
        out["render"] = rgb.detach()
        return out


class ReconstructorPretrainTask(TrainTask):
    """Trains a randomly initialised LGM-style reconstructor on the shards."""

    name = "reconstructor"

    @classmethod
    def config_hash(cls, cfg, job, inputs=None) -> str:
        return config_hash(cls.name, _models_section(cfg.models.reconstructor, _RECON_RUNTIME_FIELDS))

    def __init__(self, cfg, job, ctx: WorkerContext, inputs=None):
        from geco.models.reconstructors import build_reconstructor

        super().__init__(cfg, job, ctx, inputs)
        rcfg = cfg.models.reconstructor
        if rcfg.pretrained:
            raise ValueError("models.reconstructor.pretrained is set: the reconstructor needs no pretraining")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            model = build_reconstructor(rcfg)
        if job.gradient_checkpointing:
            log.info("reconstructor: gradient checkpointing is not implemented for the LGM U-Net; ignored")
        self.recon = model.train()
        self.lpips = None
        self.lpips_reason = "lambda_lpips is 0"
        if rcfg.lambda_lpips > 0:
            from geco.models.lpips import LPIPSLoss

            loss = LPIPSLoss.load(**cfg.models.lpips.model_dump(), weight=1.0)
            self.lpips_reason = loss.reason
            if loss.enabled:
                self.lpips = loss.to(ctx.device)
        self.loss_module = _ReconstructorLoss(model, self.lpips)
        self.model = ctx.prepare(self.loss_module)
        self.optimizer, self.scheduler, self.stepper = job_optimizer(model.parameters(), job, ctx)

    @property
    def lpips_enabled(self) -> bool:
        return self.lpips is not None

    def modules(self):
        return {"reconstructor": self.recon}

    def optimizers(self):
        return {"adamw": self.optimizer}

    def schedulers(self):
        return {"lr": self.scheduler}

    def prepare(self, rows: list[dict], training: bool = True) -> dict[str, Any]:
        from geco.models.reconstructors import input_cameras

        rcfg = self.cfg.models.reconstructor
        bg = (rcfg.background,) * 3
        samples = [decode_sample(r, background=bg, with_depth=False, with_normals=False) for r in rows]
        images, Ks, c2ws = [], [], []
        sup = {"rgb": [], "alpha": [], "K": [], "w2c": [], "random": []}
        for s in samples:
            z = s["zero123"]
            images.append(z["rgb"])
            # K in pixels of the views given (the renders' size; the reconstructor resizes both)
            K, c2w = input_cameras(rcfg, float(s["cameras"][0].get("azimuth_deg", 0.0)), z["rgb"].shape[-1])
            Ks.append(K)
            c2ws.append(c2w)
            groups = [s["random"]] if "random" in s else []
            if self.job.supervise_zero123_views or not groups:
                groups.append(z)
            size = self.job.render_size or groups[0]["rgb"].shape[-1]  # one resolution for every view
            pool = {k: torch.cat([_at_size(g, size)[k] for g in groups]) for k in ("rgb", "alpha", "K", "w2c")}
            is_random = torch.cat([torch.full((g["rgb"].shape[0],), g is not z) for g in groups])
            n = pool["rgb"].shape[0]
            idx = (torch.randperm(n, generator=batch_generator())[: self.job.supervision_views] if training
                   else torch.arange(n))  # batch_generator: the same views after a resume
            for k in ("rgb", "alpha", "K", "w2c"):
                sup[k].append(pool[k][idx])
            sup["random"].append(is_random[idx])
        if len({tuple(x.shape) for x in sup["rgb"]}) > 1:
            raise ValueError("objects in one batch have different numbers or sizes of views; render them with one config")
        rgb, alpha, K = torch.stack(sup["rgb"]), torch.stack(sup["alpha"]), torch.stack(sup["K"])
        dev = self.ctx.device
        return {"keys": [s["key"] for s in samples], "images": torch.stack(images).to(dev),
                "Ks": torch.stack(Ks).to(dev), "c2w": torch.stack(c2ws).to(dev), "sup_rgb": rgb.to(dev),
                "sup_alpha": alpha.to(dev), "sup_K": K.to(dev), "sup_w2c": torch.stack(sup["w2c"]).to(dev),
                "sup_random": torch.stack(sup["random"])}

    @staticmethod
    def _inputs(b: dict) -> tuple:
        return b["images"], b["Ks"], b["c2w"], b["sup_rgb"], b["sup_alpha"], b["sup_K"], b["sup_w2c"]

    def train_step(self, micro_batches: list[dict], step: int, plan: StepPlan = StepPlan()) -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            with self.stepper.micro(self.model, i):
                out = self.model(*self._inputs(mb))
                self.stepper.backward(out["loss"])
            for k, v in out.items():
                if k != "render":
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        return {**sums, **self.stepper.step()}

    @torch.no_grad()
    def evaluate(self, batch: dict, step: int) -> EvalResult:
        self.recon.eval()
        try:
            out = self.loss_module(*self._inputs(batch))
        finally:
            self.recon.train()
        pred, gt, rnd = out["render"], batch["sup_rgb"], batch["sup_random"].to(out["render"].device)
        metrics = {"psnr": psnr(pred, gt), "loss": float(out["loss"]), "mse_alpha": float(out["mse_alpha"])}
        if rnd.any():
            metrics["psnr_random_views"] = psnr(pred[rnd], gt[rnd])
        if (~rnd).any():
            metrics["psnr_zero123_views"] = psnr(pred[~rnd], gt[~rnd])
        if pred.shape[0] >= 2:  # each object's renders closer to its own views than to any other's: > 0
            metrics["psnr_paired_min"] = float(paired_psnr_margin(pred.flatten(1, 2), gt.flatten(1, 2)).min())
        if "lpips" in out:
            metrics["lpips"] = float(out["lpips"])
        # one row per object: its 6 input views as the 3 x 2 grid, then per supervision view the target
        # above the render
        rows, n_sup = [], pred.shape[1]
        for i in range(pred.shape[0]):
            views = [to_uint8(v) for v in batch["images"][i]]
            inputs = grid([views[k:k + 2] for k in range(0, len(views), 2)], pad=0)
            rows.append([inputs] + [grid([[to_uint8(gt[i, j])], [to_uint8(pred[i, j])]], pad=0) for j in range(n_sup)])
        labels = ["input views"] + [f"target/render {j + 1}" for j in range(n_sup)]
        return EvalResult(metrics, {"renders": labeled_grid(rows, labels)})

    def export(self, output_uri: str) -> dict[str, str]:
        from geco.models.reconstructors import save_reconstructor

        uri = storage.join(output_uri, "reconstructor", "model.safetensors")
        save_reconstructor(self.recon, uri, dtype=None)
        return {"reconstructor": uri}


TASKS = {"teacher": TeacherPretrainTask, "reconstructor": ReconstructorPretrainTask}
