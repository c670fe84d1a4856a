"""Stage 1 as a training task: VSD distillation of the frozen teacher into the one-step generator.

:class:`VSDTask` is a :class:`~geco.train.loop.TrainTask` (pure torch), run under Ray Train by
``pipelines/stage1.py`` through ``pipelines/training/`` (data, checkpoints, resumption,
restarts, MLflow). Its settings are ``cfg.stage1`` (:class:`geco.config.Stage1Config`); the Ray
Train job is ``cfg.stage1.train``.

Models (PAPER.md, "Stage 1")
    * **teacher** — frozen (``requires_grad_(False)``, eval mode, never in an optimiser), from the
      stage's ``inputs["teacher"]`` (the pretrain stage's exported teacher folder, or a given one)
      or ``cfg.models.teacher`` (:func:`stage1_models`);
    * **generator** G — :func:`geco.models.generator.make_generator`: a copy of the teacher's UNet
      (or ``models.generator.pretrained``), trained in float32 whatever the teacher's dtype;
    * **fake score** — :func:`geco.distill.vsd.make_fake_score`: a LoRA adapter on a module sharing
      the teacher's base tensors (``stage1.fake_score: lora``, the default) or a full UNet copy (the
      paper; ``configs/paper.yaml``).

One optimiser step: :class:`geco.distill.vsd.VSDStep` (the generator update, then ``fake_steps``
    fake-score updates; its docstring and the module's say what each computes). This task owns what
    is around it: the models, the two Adam(W) optimisers (``lr_generator`` / ``betas_generator``,
    ``lr_fake`` / ``betas_fake``), their LR schedules, DDP/FSDP wrapping, and the CPU
    ``torch.Generator`` seeded by (seed, rank, step) that every random number of a step comes from,
    so a resumed run draws exactly what an uninterrupted one would.

Checkpoints (through the glue, :mod:`geco.train.checkpoint`)
    ``models/generator.safetensors`` (the generator's UNet), ``models/fake_score.safetensors`` (the
    full UNet, or — LoRA — **only the adapter tensors**, keyed as peft's
    ``get_peft_model_state_dict``), both optimisers and both LR schedulers, RNG states, the step and
    the data position.

Evaluation (rank 0, held-out objects)
    The same condition latents and noise every time: teacher samples (``eval_teacher_steps`` DDIM
    steps, CFG ``teacher_cfg``; the teacher is frozen, so they are computed once) and the
    generator's one-step output; metrics ``psnr_generator_gt`` / ``psnr_generator_teacher`` /
    ``psnr_teacher_gt`` (the 6-view grid vs the ground-truth renders and vs the teacher's samples),
    ``ssim_generator_teacher``, ``psnr_generator_teacher_paired`` (with 2+ objects, the mean of
    :func:`geco.metrics.paired_psnr_margin`: PSNR to the object's own teacher sample minus that to the
    closest other object's - a blurry mean or one image for every input scores about 0), ``loss_fake`` (below) and ``lpips_*`` when LPIPS weights load (otherwise those metrics are absent: "unavailable", never
    a stand-in); image ``samples``: one row per object, input | teacher | generator | ground truth.

Export (rank 0, at the end)
    ``<output_uri>/generator`` (:func:`~geco.models.generator.save_generator`) and
    ``<output_uri>/bundle`` — a GECO checkpoint (:func:`~geco.models.bundle.save_bundle`: the teacher's
    encoders/VAE, the generator, the reconstructor) that ``geco generate --checkpoint`` reads.

Parallelism
    DDP by default (``ctx.prepare``; a LoRA fake score's frozen shared base is excluded from DDP's
    broadcast). ``stage1.fsdp`` shards the generator with FSDP (GPU, several workers): every rank
    then gathers the full generator state for checkpoints, evaluations and the export (the steps
    after which the glue checkpoints or evaluates are known to the task), and rank 0 evaluates a
    full copy.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geco import storage
from geco.data.schema import decode_sample
from geco.images import labeled_grid, to_uint8
from geco.metrics import paired_psnr_margin
from geco.metrics import ssim as ssim_each
from geco.train.loop import (
    EvalResult,
    GradientStep,
    StepPlan,
    TrainTask,
    WorkerContext,
    config_hash,
    make_adamw,
    make_lr_scheduler,
    psnr,
)
from geco.train.loop import derived_seed as _seed

log = logging.getLogger(__name__)

__all__ = ["INPUT_MODELS", "LoraAdapterState", "VSDTask", "stage1_models"]

# Device types on which stage1.fsdp shards the generator (Ray Train's prepare_model refuses FSDP
# without CUDA; tests add "cpu" to run the FSDP code path in one process)
FSDP_DEVICE_TYPES = {"cuda"}

# Below this lr_fake a LoRA fake score is warned about: at 1e-6 (a full copy's rate, the paper's) 30
# Adam steps changed a rank-4 LoRA's output 1,200-1,900x less than a full copy's (small UNets)
_LORA_MIN_LR_FAKE = 1e-4

# TeacherConfig fields that change how the teacher is used, not its weights
_TEACHER_RUNTIME_FIELDS = {"guidance_scale", "num_inference_steps", "sampler", "timestep_spacing", "cond_latent",
                           "keep_text_encoder", "cache_dir", "uncond_image_value"}


# ================================================================================================
# Where the weights come from
# ================================================================================================
# The stage's inputs (``pipelines.stage.Stage1Inputs``, built by the DAG from the pretrain stage's
# outputs or by `geco train stage1 --teacher/--reconstructor`) arrive as ``inputs``:
# ``{"teacher": URI, "reconstructor": URI}``, each a Zero123++ teacher folder / a reconstructor
# .safetensors file; the teacher may be "tiny" (the tiny random teacher, asked for by name: tests
# only; an empty teacher is refused), the reconstructor "" (a tiny random one). A missing name keeps
# ``models.<name>.pretrained``. Nothing here resolves or probes storage: the pipeline did.
INPUT_MODELS = ("teacher", "reconstructor")


def stage1_models(cfg, inputs=None):
    """``cfg.models`` with ``teacher`` / ``reconstructor`` weights from ``inputs`` (the task's own view
    of the models; the config itself is never rewritten)."""
    inputs = dict(inputs or {})
    unknown = set(inputs) - set(INPUT_MODELS)
    if unknown:
        raise ValueError(f"stage1: unknown input(s) {sorted(unknown)}; expected {list(INPUT_MODELS)}")
    return cfg.models.model_copy(update={
        name: getattr(cfg.models, name).model_copy(update={"pretrained": inputs[name]})
        for name in INPUT_MODELS if name in inputs})


def condition_batch(rows: list[dict], grid_tile: int | None = None, device: torch.device | str = "cpu") -> dict:
    """Shard rows -> ``{"keys", "cond": [B, 3, H, W]}`` (white background); with ``grid_tile``
    also ``"grid"``: the ground-truth 6 Zero123++ views as the teacher's 3x2 grid of that tile size."""
    from geco.models.teacher import grid_from_views

    views = "none" if grid_tile is None else [f"{i:03d}" for i in range(6)]
    samples = [decode_sample(r, background=(1.0, 1.0, 1.0), views=views, with_depth=False, with_normals=False)
               for r in rows]
    out = {"keys": [s["key"] for s in samples], "cond": torch.stack([s["cond_rgb"] for s in samples]).to(device)}
    if grid_tile is not None:
        v = torch.stack([s["zero123"]["rgb"] for s in samples])  # [B, 6, 3, H, W]
        if v.shape[-1] != grid_tile:
            flat = F.interpolate(v.flatten(0, 1), size=(grid_tile, grid_tile), mode="bilinear", antialias=True,
                                 align_corners=False)
            v = flat.view(*v.shape[:2], *flat.shape[1:])
        out["grid"] = grid_from_views(v).to(device)
    return out


# ================================================================================================
# Checkpoint views
# ================================================================================================
class LoraAdapterState(nn.Module):
    """The fake score's LoRA adapter as a checkpointable module: ``state_dict()`` holds the adapter
    tensors alone (peft's ``get_peft_model_state_dict`` keys, e.g. ``...attn1.to_q.lora_A.weight``),
    ``load_state_dict`` copies them back into the live adapter. The shared frozen base (the
    teacher's tensors) is never saved."""

    def __init__(self, unet: nn.Module, adapter_name: str = "default"):
        super().__init__()
        object.__setattr__(self, "_unet", unet)  # a reference, not a submodule
        marker = f".{adapter_name}."
        self._params = {n.replace(marker, "."): p for n, p in unet.named_parameters() if "lora_" in n}
        from peft.utils import get_peft_model_state_dict

        keys = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
        if keys != set(self._params):
            raise ValueError(f"LoRA parameter names do not match peft's adapter state dict "
                             f"({sorted(set(self._params) ^ keys)[:3]})")

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D401
        out = OrderedDict() if destination is None else destination
        for k, p in self._params.items():
            out[prefix + k] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = sorted(set(self._params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._params))
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoRA adapter state: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                if k in self._params:
                    p = self._params[k]
                    if p.shape != v.shape:
                        raise RuntimeError(f"LoRA adapter state: {k} has shape {tuple(v.shape)}, the adapter "
                                           f"{tuple(p.shape)} (another lora_rank?)")
                    p.copy_(v.to(p.device, p.dtype))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FullyShardedDataParallel)


class _FullModelState(nn.Module):
    """Checkpoint view of an FSDP-sharded module's ``prefix`` part: ``state_dict()`` is the full
    state last gathered by :meth:`gather` (a collective every rank calls) or loaded; loading sets
    it on every rank (a collective: the glue loads checkpoints on every rank, before training).
    Once training has changed the weights (``stale``), reading it without a new gather raises
    rather than saving old weights under a new step."""

    def __init__(self, sharded: nn.Module, prefix: str):
        super().__init__()
        object.__setattr__(self, "_sharded", sharded)
        self._prefix = prefix
        self.cached: dict[str, torch.Tensor] | None = None
        self.stale = False

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def gather(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self._sharded, options=self._options(cpu_offload=True))
        self.cached = {k[len(self._prefix):]: v for k, v in sd.items() if k.startswith(self._prefix)}
        self.stale = False
        return self.cached

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if self.stale:
            raise RuntimeError("stage1 (FSDP): the full state was not gathered after the last step (the task "
                               "gathers it on the steps the glue checkpoints, evaluates or ends at)")
        sd = self.cached if self.cached is not None else self.gather()
        out = OrderedDict() if destination is None else destination
        out.update({prefix + k: v for k, v in sd.items()})
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full = {self._prefix + k: v for k, v in state_dict.items()}
        set_model_state_dict(self._sharded, full, options=self._options(strict=False))
        self.cached = {k: v.detach().cpu() for k, v in state_dict.items()}
        self.stale = False
        return nn.modules.module._IncompatibleKeys([], [])


class _FullOptimizerState:
    """Checkpoint view of an optimiser over FSDP-sharded parameters (see :class:`_FullModelState`)."""

    def __init__(self, sharded: nn.Module, optimizer: torch.optim.Optimizer):
        self.sharded, self.optimizer = sharded, optimizer
        self.cached: dict | None = None
        self.stale = False

    def gather(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.cached = get_optimizer_state_dict(self.sharded, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.stale = False
        return self.cached

    def state_dict(self) -> dict:
        if self.stale:
            raise RuntimeError("stage1 (FSDP): the optimiser state was not gathered after the last step")
        return self.cached if self.cached is not None else self.gather()

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.sharded, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        self.cached = None
        self.stale = False


# ================================================================================================
# The task
# ================================================================================================
def _resize_to_width(image: torch.Tensor, width: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    if w == width:
        return image
    return F.interpolate(image[None], size=(max(1, round(h * width / w)), width), mode="bilinear",
                         antialias=True, align_corners=False)[0]


class VSDTask(TrainTask):
    """Stage-1 VSD distillation (module docstring)."""

    name = "stage1"

    @classmethod
    def config_hash(cls, cfg, job, inputs=None) -> str:
        s = cfg.stage1
        models = stage1_models(cfg, inputs)
        t = {k: v for k, v in models.teacher.model_dump(mode="json").items() if k not in _TEACHER_RUNTIME_FIELDS}
        lora = {"rank": s.lora_rank, "alpha": s.lora_alpha} if s.fake_score == "lora" else {}
        return config_hash(cls.name, t, cfg.models.generator.model_dump(mode="json"), s.fake_score, lora, s.fsdp)

    # -- construction --------------------------------------------------------------------------
    def __init__(self, cfg, job, ctx: WorkerContext, inputs=None):
        from geco.distill.vsd import (
            FakeScoreObjective,
            GeneratorObjective,
            VSDStep,
            make_fake_score,
            set_gradient_checkpointing,
        )
        from geco.models.generator import make_generator
        from geco.models.teacher import TINY as TINY_TEACHER
        from geco.models.teacher import make_teacher

        # the task's view of the config: the models' weights are the stage's inputs
        cfg = cfg.model_copy(update={"models": stage1_models(cfg, inputs)})
        super().__init__(cfg, job, ctx, inputs)
        s = self.s1 = cfg.stage1
        if not cfg.models.teacher.pretrained:
            raise ValueError("stage1: no teacher (no teacher input and models.teacher.pretrained is empty); name its "
                             f"weights, or set models.teacher.pretrained={TINY_TEACHER} for a tiny random one (tests only)")
        if cfg.models.teacher.pretrained == TINY_TEACHER:
            log.warning("stage1: distilling the tiny RANDOM teacher (models.teacher.pretrained=%s: tests only)",
                        TINY_TEACHER)
        if s.fake_cfg != 1.0 and s.fake_drop_cond_prob == 0.0:
            log.warning("stage1.fake_cfg=%s but stage1.fake_drop_cond_prob=0: the fake score never learns the "
                        "unconditional branch its guidance uses", s.fake_cfg)
        if s.fake_score == "lora" and s.lr_fake < _LORA_MIN_LR_FAKE:
            log.warning("stage1.fake_score=lora with lr_fake=%g: a LoRA adapter at this rate barely moves, so the "
                        "fake score stays at the teacher (eval/loss_fake does not fall); use fake_score=full or a "
                        "larger lr_fake (configs/local.yaml: rank 8 at 1e-3)", s.lr_fake)
        teacher = make_teacher(cfg.models.teacher)
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(ctx.device)
        self.teacher = teacher
        generator = make_generator(cfg.models.generator, teacher)
        generator.unet.to(ctx.device, torch.float32)  # trained weights in fp32 (Adam at 1e-6 is below bf16 resolution)
        generator.unet.requires_grad_(True)
        generator.train()
        self.generator = generator
        fake = make_fake_score(teacher, s.fake_score, lora_rank=s.lora_rank, lora_alpha=s.lora_alpha or None,
                               seed=job.seed, trainable_dtype=torch.float32)
        fake.unet.train()
        self.fake = fake
        set_gradient_checkpointing(generator.unet, job.gradient_checkpointing)
        set_gradient_checkpointing(fake.unet, job.gradient_checkpointing)

        # regression term (optional) and its LPIPS
        self.lpips = None
        self._reg_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        if s.regression_weight > 0 and s.regression_lpips_weight > 0:
            from geco.models.lpips import LPIPSLoss

            loss = LPIPSLoss.load(**cfg.models.lpips.model_dump(), weight=1.0)
            if loss.enabled:
                self.lpips = loss.to(ctx.device)
            else:
                log.warning("stage1: regression LPIPS term is OFF (%s); MSE alone", loss.reason)

        # DDP / FSDP
        fsdp = s.fsdp and ctx.world_size > 1
        if fsdp and ctx.device.type not in FSDP_DEVICE_TYPES:
            log.warning("stage1.fsdp needs GPU workers; using DDP on %s", ctx.device)
            fsdp = False
        # FSDP: rank 0 evaluates a full copy on the CPU; its initial weights, taken before sharding
        init_state = ({k: v.detach().to("cpu", copy=True) for k, v in generator.unet.state_dict().items()}
                      if fsdp and ctx.is_main else None)
        self.gen_model = self._wrap(GeneratorObjective(generator, teacher, fake, s, self.lpips),
                                    "fsdp" if fsdp else "ddp")
        fake_loss = FakeScoreObjective(fake, teacher, s)
        if s.fake_score == "lora":  # the shared frozen base: no broadcast, no buckets
            frozen = [n for n, p in fake_loss.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in fake_loss.named_buffers()]
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(fake_loss, frozen)
        self.fake_model = self._wrap(fake_loss, "fsdp" if fsdp and s.fake_score == "full" else "ddp")
        self.fsdp = _is_fsdp(self.gen_model)
        self.fake_fsdp = _is_fsdp(self.fake_model)

        # optimisers, schedules, steppers: one per network
        self.params_g = [p for p in self.gen_model.parameters() if p.requires_grad]
        self.params_f = [p for p in self.fake_model.parameters() if p.requires_grad]
        self.opt_g = make_adamw(self.params_g, lr=s.lr_generator, weight_decay=job.weight_decay,
                                betas=s.betas_generator)
        self.opt_f = make_adamw(self.params_f, lr=s.lr_fake, weight_decay=job.weight_decay, betas=s.betas_fake)
        self.sched_g = make_lr_scheduler(self.opt_g, schedule=job.lr_schedule, warmup_steps=job.lr_warmup_steps,
                                         total_steps=job.steps, min_ratio=job.lr_min_ratio)
        self.sched_f = make_lr_scheduler(self.opt_f, schedule=job.lr_schedule,
                                         warmup_steps=job.lr_warmup_steps * s.fake_steps,
                                         total_steps=job.steps * s.fake_steps, min_ratio=job.lr_min_ratio)
        # the steppers never clip: the step does, per network (through FSDP when sharded: a global norm)
        common = {"accumulation": job.grad_accumulation, "device": ctx.device, "mixed_precision": ctx.mixed_precision,
                  "max_grad_norm": 0.0}
        self.step_g = GradientStep(self.params_g, self.opt_g, self.sched_g, **common)
        self.step_f = GradientStep(self.params_f, self.opt_f, self.sched_f, **common)
        self.vsd_step = VSDStep(teacher, self.gen_model, self.fake_model, self.step_g, self.step_f, s,
                                regression_pairs=self._regression_pairs)

        # checkpoint views
        if self.fsdp:
            self._gen_state = _FullModelState(self.gen_model, "generator.unet.")
            self._gen_opt_state = _FullOptimizerState(self.gen_model, self.opt_g)
        if self.fake_fsdp:
            self._fake_state = _FullModelState(self.fake_model, "fake.unet.")
            self._fake_opt_state = _FullOptimizerState(self.fake_model, self.opt_f)
        self._lora_state = LoraAdapterState(fake.unet) if s.fake_score == "lora" else None
        self._eval_cache: tuple[tuple, torch.Tensor] | None = None
        self._lpips_metric = None
        self._eval_generator = None  # FSDP: rank 0's full copy for evaluation
        if self.fsdp and init_state is not None:
            self._eval_generator = self._full_generator(init_state)

    def _wrap(self, module: nn.Module, strategy: str) -> nn.Module:
        """``ctx.prepare`` (DDP in a distributed run), asking the glue for ``strategy`` ("ddp" or
        "fsdp") when its ``wrap`` takes one."""
        ctx = self.ctx
        if ctx.wrap is None:
            return ctx.prepare(module)
        if "parallel_strategy" in inspect.signature(ctx.wrap).parameters:
            return ctx.wrap(module, parallel_strategy=strategy)
        if strategy == "fsdp":
            log.warning("stage1.fsdp: this Ray Train glue has no parallel-strategy option; using DDP")
        return ctx.wrap(module)

    def _full_generator(self, state: dict):
        """A non-sharded float32 generator on the CPU holding ``state`` (FSDP: rank 0's evaluation
        copy and the export), built from the teacher UNet's config (no copy on the GPU)."""
        from diffusers import UNet2DConditionModel

        from geco.models.generator import OneStepGenerator

        unet = UNet2DConditionModel.from_config(self.teacher.unet.config)
        unet.load_state_dict(state)
        return OneStepGenerator(self.teacher, unet.to("cpu", torch.float32), self.generator.cfg)

    # -- checkpointed state ----------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        gen = self._gen_state if self.fsdp else self.generator.unet
        if self._lora_state is not None:
            fake = self._lora_state
        else:
            fake = self._fake_state if self.fake_fsdp else self.fake.unet
        return {"generator": gen, "fake_score": fake}

    def optimizers(self):
        return {"generator": self._gen_opt_state if self.fsdp else self.opt_g,
                "fake_score": self._fake_opt_state if self.fake_fsdp else self.opt_f}

    def schedulers(self):
        return {"generator": self.sched_g, "fake_score": self.sched_f}

    def load_extra_state(self, state: dict) -> None:
        if self.fsdp and self.ctx.is_main and self._gen_state.cached is not None:
            self._eval_generator = self._full_generator(self._gen_state.cached)

    # -- data ----------------------------------------------------------------------------------
    def prepare(self, rows: list[dict], training: bool = True) -> dict[str, Any]:
        return condition_batch(rows, None if training else self.teacher.tile_size, self.ctx.device)

    # -- training ------------------------------------------------------------------------------
    def _randn(self, shape, gen: torch.Generator) -> torch.Tensor:
        from geco.models.teacher import _randn

        return _randn(shape, gen, self.ctx.device)

    @torch.no_grad()
    def _regression_pairs(self, keys: list[str], cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(saved noise z [B, 4, h, w], teacher images [B, 3, H, W]) per object: z seeded by the
        object's id, the teacher's deterministic DDIM sample from it cached (latents, CPU)."""
        s, teacher = self.s1, self.teacher
        zs, lats = [], []
        for i, key in enumerate(keys):
            hit = self._reg_cache.get(key)
            if hit is None:
                g = torch.Generator().manual_seed(_seed("regression", self.job.seed, key))
                z = self._randn(teacher.latent_shape(1), g)
                lat = teacher.sample(cond[i], num_steps=s.regression_teacher_steps, guidance_scale=s.teacher_cfg,
                                     sampler="ddim", generator=g, latents=z)
                hit = (z.cpu(), lat.cpu())
                if s.regression_cache_objects:
                    self._reg_cache[key] = hit
                    while len(self._reg_cache) > s.regression_cache_objects:
                        self._reg_cache.popitem(last=False)
            else:
                self._reg_cache.move_to_end(key)
            zs.append(hit[0])
            lats.append(hit[1])
        dev = self.ctx.device
        images = teacher.decode_latents(torch.cat(lats).to(dev))
        return torch.cat(zs).to(dev), images

    def train_step(self, micro_batches: list[dict], step: int, plan: StepPlan = StepPlan()) -> dict[str, float]:
        """:class:`geco.distill.vsd.VSDStep` with a generator seeded by (seed, rank, step); then, under
        FSDP, the full states gathered where ``plan`` says the glue checkpoints or evaluates."""
        gen = torch.Generator().manual_seed(_seed("stage1", self.job.seed, self.ctx.rank, step))
        sums = self.vsd_step(micro_batches, gen)

        # FSDP: gather the full state on every rank where the glue will checkpoint or evaluate
        if self.fsdp or self.fake_fsdp:
            for view in self._fsdp_views():
                view.stale = True
            ckpt, ev = plan.checkpoint, plan.evaluate
            if self.fsdp and (ckpt or ev):
                state = self._gen_state.gather()
                if ckpt:
                    self._gen_opt_state.gather()
                if self.ctx.is_main:
                    self._eval_generator = self._full_generator(state)
            if self.fake_fsdp and ckpt:
                self._fake_state.gather()
                self._fake_opt_state.gather()
        return sums

    def _fsdp_views(self) -> list:
        views = [self._gen_state, self._gen_opt_state] if self.fsdp else []
        return views + ([self._fake_state, self._fake_opt_state] if self.fake_fsdp else [])

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_gen(self):
        if self.fsdp:
            return self._eval_generator
        return self.generator

    @torch.no_grad()
    def evaluate(self, batch: dict, step: int) -> EvalResult:
        from geco.models.teacher import _randn

        s, teacher, job = self.s1, self.teacher, self.job
        dev = self.ctx.device
        gen_model = self._eval_gen()
        if gen_model is None:
            raise RuntimeError("stage1 (FSDP): evaluation runs on rank 0 only")
        moved = gen_model.device != dev
        if moved:
            gen_model.unet.to(dev)
        was_training = gen_model.unet.training
        gen_model.eval()
        try:
            g = torch.Generator().manual_seed(_seed("eval", job.seed))
            cond = teacher.encode_condition(batch["cond"], generator=g)
            b = cond.batch_size
            z = _randn(teacher.latent_shape(b), g, dev)
            key = tuple(batch["keys"])
            if self._eval_cache is None or self._eval_cache[0] != key:
                lat = teacher.sample(cond, num_steps=s.eval_teacher_steps, guidance_scale=s.teacher_cfg,
                                     sampler="ddim", generator=torch.Generator().manual_seed(_seed("eval-t", job.seed)),
                                     latents=z)
                self._eval_cache = (key, teacher.decode_latents(lat))
            teacher_images = self._eval_cache[1]
            gen_latents = gen_model(cond, z)
            gen_images = teacher.decode_latents(gen_latents)
            loss_fake = self._eval_fake_loss(gen_latents, cond)
        finally:
            gen_model.unet.train(was_training)
            if moved:
                gen_model.unet.to("cpu")
        gt = batch["grid"]
        metrics = {"psnr_generator_gt": psnr(gen_images, gt), "psnr_generator_teacher": psnr(gen_images, teacher_images),
                   "psnr_teacher_gt": psnr(teacher_images, gt), "loss_fake": loss_fake,
                   "ssim_generator_teacher": float(ssim_each(gen_images, teacher_images).mean())}
        if b >= 2:  # closer to its own object's teacher sample than to the others' (a blur or one image for all: ~0)
            metrics["psnr_generator_teacher_paired"] = float(paired_psnr_margin(gen_images, teacher_images).mean())
        lp = self._lpips()
        if lp is not None and lp.available:
            metrics["lpips_generator_gt"] = float(lp(gen_images, gt).mean())
            metrics["lpips_generator_teacher"] = float(lp(gen_images, teacher_images).mean())
        images = {}
        if not s.sample_every or step % s.sample_every == 0 or step >= job.steps:
            rows = []
            for i in range(gen_images.shape[0]):
                cond_img = _resize_to_width(batch["cond"][i].float().cpu(), gen_images.shape[-1])
                rows.append([to_uint8(cond_img), to_uint8(teacher_images[i]), to_uint8(gen_images[i]), to_uint8(gt[i])])
            images["samples"] = labeled_grid(rows, ["input", "teacher", "generator", "ground truth"])
        return EvalResult(metrics, images)

    @torch.no_grad()
    def _eval_fake_loss(self, x0: torch.Tensor, cond, num_t: int = 8) -> float:
        """The fake score's diffusion loss (``stage1.fake_loss``, as trained) on the generator's
        held-out outputs at ``num_t`` evenly spaced timesteps in [t_min, t_max], with fixed noise: how
        well it models the generator's distribution (the per-step training loss draws t at random and
        is too noisy to compare)."""
        from geco.distill.vsd import fake_score_loss
        from geco.models.teacher import _randn

        s, b = self.s1, x0.shape[0]
        g = torch.Generator().manual_seed(_seed("eval-fake", self.job.seed))
        was_training = self.fake.unet.training
        self.fake.unet.eval()
        try:
            losses = []
            for t in torch.linspace(s.t_min * 1000, s.t_max * 1000, num_t).round().long():
                noise = _randn(x0.shape, g, x0.device)
                cond_noise = _randn((b, *cond.cond_lat.shape[1:]), g, x0.device)
                losses.append(float(fake_score_loss(self.teacher, self.fake, x0, cond, t.expand(b).to(x0.device),
                                                    noise, target=s.fake_loss, cond_noise=cond_noise)))
        finally:
            self.fake.unet.train(was_training)
        return sum(losses) / len(losses)

    def _lpips(self):
        if self._lpips_metric is None:
            from geco.models.lpips import LPIPSMetric

            m = self.cfg.models.lpips
            self._lpips_metric = LPIPSMetric.load(m.net, m.backbone_weights, m.linear_weights)
            if self._lpips_metric.available:
                self._lpips_metric.model.to(self.ctx.device)
            else:
                log.warning("stage1: LPIPS metrics unavailable (%s)", self._lpips_metric.reason)
        return self._lpips_metric

    # -- export --------------------------------------------------------------------------------
    def export_generator(self):
        """The trained generator as a plain (non-sharded) module."""
        if self.fsdp:
            if self._gen_state.cached is None or self._gen_state.stale:
                raise RuntimeError("stage1 (FSDP): no gathered generator state for this step to export")
            return self._full_generator(self._gen_state.cached)
        return self.generator

    def export(self, output_uri: str) -> dict[str, str]:
        from geco.models.bundle import save_bundle
        from geco.models.generator import save_generator
        from geco.models.reconstructors import build_reconstructor, load_reconstructor

        gen = self.export_generator()
        gen_uri = save_generator(gen, storage.join(output_uri, "generator"))
        rcfg = self.cfg.models.reconstructor
        if rcfg.pretrained:
            recon = load_reconstructor(rcfg)
        else:
            log.warning("stage1: no reconstructor weights (no reconstructor input and models.reconstructor.pretrained "
                        "is empty): the bundle gets a tiny RANDOM reconstructor")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.job.seed)
                recon = build_reconstructor(rcfg)
        models_cfg = self.cfg.models.model_copy(update={"generator": gen.cfg})
        bundle_uri = save_bundle(storage.join(output_uri, "bundle"), self.teacher, gen, recon, models_cfg,
                                 include_teacher_unet=self.s1.bundle_teacher_unet)
        return {"bundle": bundle_uri, "generator": gen_uri}

    # -- checks --------------------------------------------------------------------------------
    def teacher_fingerprint(self) -> str:
        """sha256 of the teacher UNet's weights (to show it stays bit-identical)."""
        h = hashlib.sha256()
        for name, t in sorted(self.teacher.unet.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
