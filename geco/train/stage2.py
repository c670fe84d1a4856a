"""Stage 2 as a training task: 3D-consistency fine-tuning of the stage-1 generator.

:class:`Stage2Task` is a :class:`~geco.train.loop.TrainTask` (pure torch), run under Ray Train by
``pipelines/stage2.py`` through ``pipelines/training/`` (data, checkpoints, resumption, restarts,
MLflow), exactly as stage 1. Its settings are ``cfg.stage2`` (:class:`geco.config.Stage2Config`); the
Ray Train job is ``cfg.stage2.train`` (AdamW; the paper's values in ``configs/paper.yaml``).

Inputs (``inputs["bundle"]``: stage 1's GECO checkpoint, any URI :func:`~geco.models.bundle.load_bundle`
resolves): the teacher's encoders and VAE (frozen), the **generator** (trained, float32, DDP-wrapped
in a distributed run) and the **reconstructor** (frozen: ``requires_grad_(False)``, eval mode, never
in an optimiser or a checkpoint). The step is :class:`geco.distill.consistency.ConsistencyStep`.

Data (:meth:`Stage2Task.prepare`): pseudo-GT shards (or render shards: the same schema) — the
conditioning view (white background, the teacher's), the noise the teacher sampled from
(``noise.npy``; where a sample has none, a fixed noise seeded by its key), and every view of the
sample with its camera (RGB composited on the reconstructor's background, resized to
``stage2.render_size``; 0 = the sample's smallest view). ``views_per_step`` of them are drawn per
object in the step. A sample that cannot be used raises :class:`~geco.data.schema.SampleError`
naming its shard and object: a view image missing for a camera, view images without a camera, fewer
views than ``views_per_step``, noise of another teacher's latent shape.

Evaluation (rank 0, held-out objects, fixed condition seed and noise): every view of each object
rendered from the reconstruction of the generator's views; ``psnr`` / ``ssim`` (vs the pseudo-GT
RGB), ``mse_alpha``, ``lpips`` when its weights load; image ``samples``: one row per object,
generator views (3 x 2) | reconstruction renders | pseudo-GT.

Export: ``<output_uri>/generator`` and ``<output_uri>/bundle`` as stage 1 writes them (the same
teacher encoders and reconstructor, the fine-tuned generator): what ``geco generate`` loads.
"""
from __future__ import annotations

import io
import json
import logging
import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from geco import storage
from geco.data.schema import SampleError, decode_sample, view_names
from geco.distill.consistency import ConsistencyObjective, ConsistencyStep, pick_views
from geco.images import grid, hstack_images, labeled_grid, to_uint8
from geco.train.loop import (
    EvalResult,
    StepPlan,
    TrainTask,
    WorkerContext,
    config_hash,
    derived_seed,
    job_optimizer,
    psnr,
)
from geco.train.pretrain import _at_size

log = logging.getLogger(__name__)

__all__ = ["Stage2Task"]

_VIEW_PNG = re.compile(r"(\d{3})\.png")
_GRID_VIEWS = 4  # renders / pseudo-GT views shown per object in the sample grid


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _where(row: dict) -> str:
    url = row.get("__url__") or row.get("path") or ""
    shard = storage.basename(str(url)) if url else "?"
    return f"{shard}: object {row.get('__key__', '?')!r}"


class Stage2Task(TrainTask):
    """Stage-2 3D-consistency fine-tuning (module docstring)."""

    name = "stage2"

    @classmethod
    def config_hash(cls, cfg, job, inputs=None) -> str:
        from geco.models.bundle import bundle_fingerprint

        return config_hash(cls.name, bundle_fingerprint(dict(inputs or {}).get("bundle", "")))

    # -- construction --------------------------------------------------------------------------
    def __init__(self, cfg, job, ctx: WorkerContext, inputs=None):
        from geco.distill.vsd import set_gradient_checkpointing
        from geco.models.bundle import load_bundle

        super().__init__(cfg, job, ctx, inputs)
        s = self.s2 = cfg.stage2
        uri = self.inputs.get("bundle")
        if not uri:
            raise ValueError("stage2: no bundle input (stage 1's GECO checkpoint)")
        bundle = load_bundle(uri, device=ctx.device)
        self.bundle = bundle
        self.teacher, self.generator, self.reconstructor = bundle.teacher, bundle.generator, bundle.reconstructor
        self.teacher.requires_grad_(False)
        self.reconstructor.requires_grad_(False)
        self.reconstructor.eval()
        gen = self.generator
        if gen.unet.dtype != torch.float32:  # trained in float32 whatever the teacher's dtype (autocast: bf16)
            gen.unet.to(torch.float32)
        gen.unet.requires_grad_(True)
        gen.unet.train()
        set_gradient_checkpointing(gen.unet, job.gradient_checkpointing)

        self.lpips = None
        if s.lambda_lpips > 0:
            from geco.models.lpips import LPIPSLoss

            loss = LPIPSLoss.load(**cfg.models.lpips.model_dump(), weight=1.0)
            if loss.enabled:
                self.lpips = loss.to(ctx.device)
            else:
                log.warning("stage2: the LPIPS term is off (%s); training on MSE(RGB) + MSE(alpha)", loss.reason)
        self.objective = ConsistencyObjective(gen, self.reconstructor, self.lpips, s.lambda_lpips)
        self.model = ctx.prepare(self.objective)  # DDP over the generator in a distributed run
        self.optimizer, self.scheduler, self.stepper = job_optimizer(gen.unet.parameters(), job, ctx)
        self.step = ConsistencyStep(self.teacher, self.model, self.stepper, views_per_step=s.views_per_step,
                                    use_saved_noise=s.use_saved_noise)

    # -- checkpointed state ----------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator.unet}

    def optimizers(self):
        return {"generator": self.optimizer}

    def schedulers(self):
        return {"generator": self.scheduler}

    # -- data ----------------------------------------------------------------------------------
    def _check_members(self, row: dict) -> list:
        """The sample's cameras, once its view images and cameras agree (else SampleError naming it)."""
        where = _where(row)
        raw = row.get("cameras.json")
        if _missing(raw):
            raise SampleError(f"{where}: no cameras.json; re-make this sample (`geco pseudo-gt`)")
        cameras = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
        if not isinstance(cameras, list) or not cameras:
            raise SampleError(f"{where}: cameras.json must be a non-empty list (cond first)")
        expected = view_names(len(cameras) - 1)
        have = {m.group(1) for k, v in row.items() if (m := _VIEW_PNG.fullmatch(k)) and not _missing(v)}
        missing = [v for v in expected if v not in have]
        extra = sorted(have - set(expected))
        if extra:
            raise SampleError(f"{where}: cameras.json has {len(expected)} view camera(s) but the sample holds "
                              f"{len(have)} view image(s) ({', '.join(e + '.png' for e in extra[:3])} have no camera); "
                              "the sample is inconsistent: re-make it (`geco pseudo-gt`)")
        if missing:
            raise SampleError(f"{where}: missing view image(s) {', '.join(m + '.png' for m in missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} of the {len(expected)} in cameras.json; "
                              "re-make this sample (`geco pseudo-gt`)")
        if len(expected) < self.s2.views_per_step:
            raise SampleError(f"{where}: {len(expected)} view(s), fewer than stage2.views_per_step="
                              f"{self.s2.views_per_step}; lower it or make samples with more views")
        return cameras

    def _noise(self, row: dict, key: str) -> torch.Tensor:
        shape = tuple(self.teacher.latent_shape(1)[1:])
        raw = row.get("noise.npy")
        if not _missing(raw):
            z = np.load(io.BytesIO(bytes(raw)), allow_pickle=False) if isinstance(raw, (bytes, bytearray)) else raw
            z = torch.from_numpy(np.asarray(z, dtype=np.float32))
            if tuple(z.shape) != shape:
                raise SampleError(f"{_where(row)}: noise.npy is {list(z.shape)}, the teacher's latent is {list(shape)}: "
                                  "these pseudo-GT samples were made with another teacher; re-make them")
            return z
        g = torch.Generator().manual_seed(derived_seed("stage2-noise", self.job.seed, key))
        return torch.randn(shape, generator=g)

    def prepare(self, rows: list[dict], training: bool = True) -> dict[str, Any]:
        from geco.generate import reconstructor_cameras

        bg = float(self.reconstructor.cfg.background)  # the targets' background: the renders'
        tile = self.teacher.tile_size
        conds, noise, in_K, in_c2w, views, keys = [], [], [], [], [], []
        for row in rows:
            cameras = self._check_members(row)
            try:  # straight RGBA: the condition goes on white (the teacher's), the targets on bg
                s = decode_sample(row, background=None, views="all", with_depth=False, with_normals=False)
            except SampleError as e:
                raise SampleError(f"{_where(row)}: {e}") from None
            kinds = dict.fromkeys(str(c.get("kind", "random")) for c in cameras[1:])  # in view order
            groups = [{**s[k], "rgb": s[k]["rgb"] * s[k]["alpha"] + bg * (1 - s[k]["alpha"])} for k in kinds]
            size = self.s2.render_size or min(g["rgb"].shape[-1] for g in groups)
            sized = [_at_size(g, size) for g in groups]
            views.append({k: torch.cat([g[k] for g in sized]) for k in ("rgb", "alpha", "K", "w2c")})
            K, c2w = reconstructor_cameras(self.reconstructor, tile, float(cameras[0].get("azimuth_deg", 0.0)))
            conds.append(s["cond_rgb"] * s["cond_alpha"] + (1 - s["cond_alpha"]))
            noise.append(self._noise(row, s["key"]))
            in_K.append(K)
            in_c2w.append(c2w)
            keys.append(s["key"])
        shapes = {tuple(c.shape) for c in conds}
        if len(shapes) > 1:
            raise SampleError(f"objects {keys} have conditioning views of different sizes {sorted(shapes)}; "
                              "make them with one config")
        dev = self.ctx.device
        return {"keys": keys, "cond": torch.stack(conds).to(dev), "noise": torch.stack(noise).to(dev),
                "in_K": torch.stack(in_K).float().to(dev), "in_c2w": torch.stack(in_c2w).float().to(dev),
                "views": views}

    # -- training ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], step: int, plan: StepPlan = StepPlan()) -> dict[str, float]:
        """:class:`~geco.distill.consistency.ConsistencyStep` with a generator seeded by (seed, rank, step)."""
        gen = torch.Generator().manual_seed(derived_seed("stage2", self.job.seed, self.ctx.rank, step))
        return self.step(micro_batches, gen)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: dict, step: int) -> EvalResult:
        from geco.metrics import ssim

        dev = self.ctx.device
        was_training = self.generator.unet.training
        self.generator.unet.eval()
        try:
            g = torch.Generator().manual_seed(derived_seed("stage2-eval", self.job.seed))
            cond = self.teacher.encode_condition(batch["cond"], generator=g)
            target = pick_views(batch["views"], None, None, dev)
            out = self.objective(cond, batch["noise"], batch["in_K"], batch["in_c2w"], target["rgb"], target["alpha"],
                                 target["K"], target["w2c"])
        finally:
            self.generator.unet.train(was_training)
        pred, gt = out["render"], target["rgb"]
        flat_p, flat_g = pred.flatten(0, 1), gt.flatten(0, 1)
        metrics = {"psnr": psnr(flat_p, flat_g), "ssim": float(ssim(flat_p, flat_g).mean()),
                   "mse_alpha": float(out["mse_alpha"]), "loss": float(out["loss"])}
        if "lpips" in out:
            metrics["lpips"] = float(out["lpips"])
        rows = []
        for i in range(pred.shape[0]):
            gv = [to_uint8(v) for v in out["views"][i]]
            shown = range(min(_GRID_VIEWS, pred.shape[1]))
            rows.append([grid([gv[k:k + 2] for k in range(0, len(gv), 2)], pad=0),
                         hstack_images([to_uint8(pred[i, j]) for j in shown]),
                         hstack_images([to_uint8(gt[i, j]) for j in shown])])
        images = {"samples": labeled_grid(rows, ["generator views", "reconstruction renders", "pseudo-GT"])}
        return EvalResult(metrics, images)

    # -- export --------------------------------------------------------------------------------
    def export(self, output_uri: str) -> dict[str, str]:
        from geco.models.bundle import save_bundle
        from geco.models.generator import save_generator

        gen_uri = save_generator(self.generator, storage.join(output_uri, "generator"))
        bundle_uri = save_bundle(storage.join(output_uri, "bundle"), self.teacher, self.generator, self.reconstructor,
                                 self.bundle.cfg, include_teacher_unet=self.bundle.teacher_has_unet)
        return {"bundle": bundle_uri, "generator": gen_uri}
