"""Stage 1 — multi-view score distillation (VSD) of the Zero123++ teacher into the one-step generator.

Three UNets with the same architecture and the same initial weights (PAPER.md, "Stage 1"):

* the **teacher** (frozen): ``teacher.unet``, CFG 4, reference attention noised to the sample's
  timestep, as Zero123++ samples;
* the **generator** G (trained): :class:`geco.models.generator.OneStepGenerator`, its own UNet copy;
* the **fake score** ("student", trained on G's outputs): :func:`make_fake_score`, either a full
  copy of the teacher's UNet (the paper) or — the memory-saving default — a LoRA adapter on a UNet
  module that **shares the teacher's base weight tensors** (no second copy of the 866 M frozen
  parameters; see :func:`make_fake_score` for why the adapter lives on a separate module object
  rather than being toggled on the teacher's own module).

One training step (:class:`VSDStep`) alternates:

1. **generator step** — ``x0 = G(cond, z)``; ``t ~ U{t_min·N … t_max·N}``; ``x_t = α_t x0 + σ_t ε``;
   ``g = ε_teacher(x_t; CFG 4) − ε_fake(x_t; CFG 1)`` (no grad, both from the same ``x_t`` and the
   same reference-pass noise); loss ``0.5 · ‖x0 − stopgrad(x0 − g)‖² / B`` ("sum" reduction divided
   by the batch size, no w(t)), so that ``∂loss/∂x0 = g / B`` exactly;
2. **fake-score step** — the ordinary v-prediction diffusion loss of the fake score on
   ``x0.detach()`` (same particles as step 1, its own t and noise).

Sign of the VSD gradient (derivation; this is what threestudio's VSD guidance and GECO's training
loop compute: ``grad = noise_pred_pretrain − noise_pred_est``, ``target = (x − grad).detach()``)
---------------------------------------------------------------------------------------------------
VSD/DMD minimise ``KL(q_θ ‖ p_teacher)`` between the generator's output distribution and the
teacher's, measured at every noise level t. With ``x_t = α_t x0 + σ_t ε`` and the scores
``s(x_t) = ∇ log p_t(x_t) = −ε̂(x_t) / σ_t``::

    ∇_θ KL = E_{t,ε}[ w(t) · (s_fake(x_t) − s_teacher(x_t)) · α_t · ∂x0/∂θ ]
           = E_{t,ε}[ w'(t) · (ε_teacher(x_t) − ε_fake(x_t)) · ∂x0/∂θ ],   w' = w α_t / σ_t.

The paper drops the weighting (w' = 1), so the gradient to push into x0 is
``g = ε_teacher − ε_fake``, and gradient **descent** moves ``x0 ← x0 − η g = x0 + η σ_t
(s_teacher − s_fake)``: up the teacher's log-density and down the fake score's (which models the
generator's own outputs), i.e. towards what the teacher would generate and the generator does not
yet. Check on point masses: a teacher whose data is μ_T predicts ``ε_T = (x_t − α μ_T)/σ``, a fake
score fitted to outputs at μ_F predicts ``ε_F = (x_t − α μ_F)/σ``; ``g = α (μ_F − μ_T) / σ`` and
``−g`` points from μ_F to μ_T (tested in ``tests/unit/test_vsd.py``).

Memory (see :func:`estimate_stage1_memory` for the numbers and their assumptions): gradient
checkpointing per UNet (``VSDSettings.gradient_checkpointing``; diffusers' block-level
``torch.utils.checkpoint``, non-reentrant); attention is torch SDPA already (the teacher's
:class:`~geco.models.teacher.ReferenceAttnProcessor` chains ``AttnProcessor2_0``), so there is no
separate xformers switch. Checkpointing is safe with reference attention because the attention
mode travels in ``cross_attention_kwargs`` (recomputation sees the same mode), and safe with the
LoRA fake score because the adapter is never toggled (it is always on in the fake score's module,
never present in the teacher's).
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geco.models.teacher import Condition, Zero123PlusTeacher, _randn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from geco.models.generator import OneStepGenerator

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FakeScore",
    "RegressionBatch",
    "VSDSettings",
    "VSDStep",
    "estimate_stage1_memory",
    "fake_score_loss",
    "generator_loss",
    "make_fake_score",
    "predict_eps",
    "regression_loss",
    "sample_timesteps",
    "set_gradient_checkpointing",
    "vsd_gradient",
    "vsd_loss_from_gradient",
]

# LoRA on every attention projection (self- and cross-attention): what threestudio's VSD and GECO's
# code put LoRA on (diffusers' LoRAAttnProcessor: q, k, v, out), here as peft target names.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


# ================================================================================================
# The fake score ("student")
# ================================================================================================
class FakeScore(nn.Module):
    """The fake-score network: a UNet of the teacher's architecture, evaluated through the teacher's
    conditioning code (``teacher.predict_v(..., unet=fake.unet)``).

    ``mode="full"``: ``unet`` is a deep copy of the teacher's UNet, all parameters trained.
    ``mode="lora"``: ``unet`` is a separate module whose base parameters **are** the teacher's
    parameter tensors (same storage, frozen) with a peft LoRA adapter injected; only the adapter is
    trained. Train with ``optimizer(fake.trainable_parameters())`` (``parameters()`` also lists the
    shared frozen base in LoRA mode). Moving devices/dtypes: move the teacher and the fake score
    together (the base tensors are shared)."""

    def __init__(self, unet: "UNet2DConditionModel", mode: Literal["full", "lora"], teacher_unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.mode = mode
        object.__setattr__(self, "_teacher_unet", teacher_unet)  # a reference, not a submodule

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs: the whole UNet (full) or the adapter tensors alone (LoRA)."""
        if self.mode == "full":
            return self.unet.state_dict()
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    @property
    def shares_teacher_weights(self) -> bool:
        """True when the base weights are the teacher's tensors (LoRA mode)."""
        t = dict(self._teacher_unet.named_parameters())
        return any(p is t.get(n.replace(".base_layer", "")) for n, p in self.unet.named_parameters())

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """LoRA mode: within the block the fake score computes the bare base weights, i.e. exactly
        the teacher (for checks and diagnostics; training never needs it). No-op in full mode."""
        if self.mode != "lora":
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def forward(self, teacher: Zero123PlusTeacher, x_t: torch.Tensor, t, cond: Condition, **kwargs) -> torch.Tensor:
        """v-prediction of the fake score (the teacher's conditioning, this UNet's weights)."""
        return teacher.predict_v(x_t, t, cond, unet=self.unet, **kwargs)


def _shared_base_copy(unet: nn.Module) -> nn.Module:
    """A new module tree with the same structure whose parameters and buffers are ``unet``'s own
    tensor objects (deepcopy with a memo that maps every tensor to itself): no weight memory."""
    memo: dict[int, Any] = {id(p): p for p in unet.parameters()}
    memo.update({id(b): b for b in unet.buffers()})
    return copy.deepcopy(unet, memo)


def make_fake_score(teacher: Zero123PlusTeacher, mode: Literal["lora", "full"] = "lora", *, lora_rank: int = 4,
                    lora_alpha: float | None = None, target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
                    lora_dropout: float = 0.0, seed: int = 0,
                    trainable_dtype: torch.dtype | None = torch.float32) -> FakeScore:
    """The fake-score network initialised from the teacher's UNet (so at step 0 it equals the teacher).

    ``mode="full"`` (the paper): a deep copy of the teacher's UNet, all parameters trainable.

    ``mode="lora"`` (memory-saving, threestudio's choice): a peft LoRA adapter (rank ``lora_rank``,
    ``lora_alpha`` default = rank, i.e. scale 1 like diffusers' old ``LoRAAttnProcessor``; up
    weights zero-initialised) on ``target_modules`` of a UNet module that **shares the teacher's
    base tensors**. The adapter is injected into that separate module object — never into
    ``teacher.unet`` itself — so every teacher call (here, in sampling, in stage 2, in a generator
    deep-copied from the teacher later) stays exactly the teacher with nothing to toggle, and
    gradient checkpointing cannot recompute a block with the wrong adapter state. The cost over
    toggling an adapter on the teacher's own module is a second set of small module objects only.
    The adapter's down weights are drawn from ``seed`` (the global RNG is left untouched), so the
    same seed gives the same fake score.

    ``trainable_dtype`` (default float32): the dtype of what is trained — the adapter weights, or
    the full copy — whatever the teacher's dtype. With a 16-bit teacher, Adam steps of lr 1e-6 are
    below bf16/fp16 resolution, so trained weights must be fp32 (peft runs an fp32 adapter on a
    16-bit base: the input is cast to the adapter's dtype and the sum back). ``None`` keeps the
    teacher's dtype.

    Either way the teacher's UNet is frozen here (``requires_grad_(False)``): peft would freeze the
    shared base anyway, and the teacher must never receive gradients."""
    if mode not in ("lora", "full"):
        raise ValueError(f"fake-score mode must be 'lora' or 'full', got {mode!r}")
    teacher_unet = teacher.unet
    teacher_unet.requires_grad_(False)
    if mode == "full":
        unet = copy.deepcopy(teacher_unet)
        if trainable_dtype is not None:
            unet.to(trainable_dtype)
        unet.requires_grad_(True)
        return FakeScore(unet, "full", teacher_unet)

    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    from peft import LoraConfig

    if getattr(teacher_unet, "_hf_peft_config_loaded", False):
        raise ValueError("the teacher's UNet already carries a peft adapter; the teacher must be the bare UNet")
    unet = _shared_base_copy(teacher_unet)
    config = LoraConfig(r=int(lora_rank), lora_alpha=float(lora_alpha if lora_alpha is not None else lora_rank),
                        target_modules=list(target_modules), lora_dropout=float(lora_dropout),
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)  # peft: injects lora layers (A ~ kaiming, B = 0), freezes the rest
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not lora_params:
        raise ValueError(f"LoRA target modules {list(target_modules)} matched nothing in the UNet")
    for p in lora_params:
        if trainable_dtype is not None:
            p.data = p.data.to(trainable_dtype)
        p.requires_grad_(True)
    return FakeScore(unet, "lora", teacher_unet)


# ================================================================================================
# Timesteps, predictions, the VSD gradient
# ================================================================================================
def sample_timesteps(batch: int, generator: torch.Generator | None = None, t_min: float = 0.02, t_max: float = 0.98,
                     num_train_timesteps: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer timesteps [batch], uniform on ``{int(t_min·N), …, int(t_max·N)}`` (threestudio's
    ``min_step``/``max_step``; 20…980 by default), clamped to ``N − 1``. Drawn on ``generator``'s
    device (CPU when none) and moved to ``device``."""
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    lo = min(int(t_min * num_train_timesteps), num_train_timesteps - 1)
    hi = min(int(t_max * num_train_timesteps), num_train_timesteps - 1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(lo, hi + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def predict_eps(teacher: Zero123PlusTeacher, x_t: torch.Tensor, t, cond: Condition, guidance_scale: float = 1.0, *,
                cond_noise: torch.Tensor | None = None, unet: nn.Module | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ε-prediction (``σ_t x_t + α_t v``) of ``unet`` (default the teacher's) with the teacher's
    conditioning; CFG is applied to v, which is the same as applying it to ε (the conversion is
    affine with the same ``x_t`` in both halves)."""
    v = teacher.predict_v(x_t, t, cond, guidance_scale=guidance_scale, cond_noise=cond_noise, unet=unet,
                          generator=generator)
    return teacher.v_to_eps(x_t, t, v.float())


def _cond_noise(teacher: Zero123PlusTeacher, cond: Condition, batch: int,
                generator: torch.Generator | None) -> torch.Tensor:
    shape = (batch, *cond.cond_lat.shape[1:])
    return _randn(shape, generator, teacher.device)


@torch.no_grad()
def vsd_gradient(teacher: Zero123PlusTeacher, fake_score: FakeScore, x0: torch.Tensor, cond: Condition, t,
                 noise: torch.Tensor, *, teacher_cfg: float = 4.0, fake_cfg: float = 1.0,
                 cond_noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``g = ε_teacher(x_t; CFG teacher_cfg) − ε_fake(x_t; CFG fake_cfg)`` at ``x_t = α_t x0 + σ_t·noise``
    (float32, NaN/inf zeroed like upstream's ``nan_to_num``). Both networks see the same ``x_t`` and
    the same reference-pass noise ``cond_noise`` (drawn from ``generator`` when not given), which
    removes that noise from the difference. Returns ``(g, parts)`` with the two ε's in ``parts``."""
    b = x0.shape[0]
    cond = cond.expand(b)
    x0 = x0.detach().float()
    x_t = teacher.add_noise(x0, noise.to(x0), t)
    if cond_noise is None:
        cond_noise = _cond_noise(teacher, cond, b, generator)
    eps_teacher = predict_eps(teacher, x_t, t, cond, teacher_cfg, cond_noise=cond_noise, unet=None)
    eps_fake = predict_eps(teacher, x_t, t, cond, fake_cfg, cond_noise=cond_noise, unet=fake_score.unet)
    g = torch.nan_to_num(eps_teacher - eps_fake)
    return g, {"x_t": x_t, "eps_teacher": eps_teacher, "eps_fake": eps_fake}


def vsd_loss_from_gradient(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 · ‖x0 − stopgrad(x0 − grad)‖² / B`` (sum over everything, divided by the batch size):
    a scalar whose gradient with respect to ``x0`` is ``grad / B`` and whose value is
    ``0.5 · ‖grad‖² / B`` (a magnitude to log, not a quantity that decreases)."""
    x0 = x0.float()
    target = (x0 - grad.float()).detach()
    return 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]


def generator_loss(teacher: Zero123PlusTeacher, fake_score: FakeScore, x0_latents: torch.Tensor, cond: Condition, t,
                   noise: torch.Tensor, teacher_cfg: float = 4.0, fake_cfg: float = 1.0, *,
                   cond_noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's VSD loss on its outputs ``x0_latents`` [B, 4, h, w] (with grad).

    ``∂loss/∂x0 = (ε_teacher − ε_fake) / B``; gradient descent therefore moves x0 towards the
    teacher's distribution and away from the fake score's (module docstring: derivation). No
    gradient reaches the teacher or the fake score (their predictions run under ``no_grad``).
    Stats: the loss, mean |g|, RMS of g, mean t."""
    g, _ = vsd_gradient(teacher, fake_score, x0_latents, cond, t, noise, teacher_cfg=teacher_cfg, fake_cfg=fake_cfg,
                        cond_noise=cond_noise, generator=generator)
    loss = vsd_loss_from_gradient(x0_latents, g)
    t_f = teacher._timesteps(t, x0_latents.shape[0])
    stats = {
        "loss_vsd": float(loss.detach()),
        "vsd_grad_abs_mean": float(g.abs().mean()),
        "vsd_grad_rms": float(g.pow(2).mean().sqrt()),
        "t_mean": float(t_f.mean()),
    }
    return loss, stats


def fake_score_loss(teacher: Zero123PlusTeacher, fake_score: FakeScore, x0_latents: torch.Tensor, cond: Condition, t,
                    noise: torch.Tensor, *, cond_noise: torch.Tensor | None = None, drop_cond_prob: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The fake score's ordinary v-prediction diffusion loss ``mean ‖v_fake(x_t) − (α_t ε − σ_t x0)‖²``
    on the generator's **detached** outputs (so only the fake score's trainable parameters get
    gradients). Reference pass noised to ``t`` like the teacher's (``cond_noise``, default fresh
    from ``generator``). ``drop_cond_prob`` > 0 swaps the condition for the CFG-unconditional one per
    sample (only needed when the fake score is queried with CFG ≠ 1)."""
    x0 = x0_latents.detach().float()
    b = x0.shape[0]
    cond = cond.expand(b)
    noise = noise.to(x0)
    x_t = teacher.add_noise(x0, noise, t)
    target = teacher.get_v(x0, noise, t)
    if drop_cond_prob > 0:
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        drop = torch.rand(b, generator=generator, device=gen_dev).to(teacher.device) < drop_cond_prob
        cond = cond.where(drop, cond.uncond())
    v = teacher.predict_v(x_t, t, cond, guidance_scale=1.0, cond_noise=cond_noise, unet=fake_score.unet,
                          generator=generator)
    return F.mse_loss(v.float(), target.float())


# ================================================================================================
# Optional regression term (DMD-style pairs)
# ================================================================================================
def _as_image_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 4 or x.shape[-3] != 3:
        raise ValueError(f"expected images [..., 3, H, W], got {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-3:])


def regression_loss(generator_x0_images: torch.Tensor, teacher_samples_images: torch.Tensor, lpips: Any = None,
                    mse_weight: float = 1.0, lpips_weight: float = 1.0,
                    lpips_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``mse_weight · MSE + lpips_weight · LPIPS`` between the generator's decoded outputs and the
    teacher's multi-step samples made from the **same saved noise** (DMD-style pairs; GECO's code:
    L2 + LPIPS(VGG)). Images in [0, 1], any leading shape ``[..., 3, H, W]`` (grids or views); they
    are compared as a batch of images. ``lpips``: a :class:`geco.models.lpips.LPIPSLoss` (its own
    ``weight`` multiplies too), an ``LPIPS`` model, or any callable returning distances. When it is
    ``None`` or an ``LPIPSLoss`` without weights, the LPIPS term is skipped with a warning.
    ``lpips_size``: resize (bilinear) to this side before LPIPS (GECO: 256/224)."""
    pred = _as_image_batch(generator_x0_images).float()
    target = _as_image_batch(teacher_samples_images).to(pred)
    if pred.shape != target.shape:
        raise ValueError(f"generator images {tuple(pred.shape)} and teacher samples {tuple(target.shape)} differ")
    mse = F.mse_loss(pred, target)
    loss = mse_weight * mse
    stats: dict[str, float] = {"reg_mse": float(mse.detach())}
    if lpips_weight != 0.0:
        reason = ""
        if lpips is None:
            reason = "no LPIPS model given"
        elif getattr(lpips, "model", True) is None:  # an LPIPSLoss without weights
            reason = getattr(lpips, "reason", "") or "LPIPS weights unavailable"
        if reason:
            from geco.models.lpips import LPIPSUnavailableWarning

            msg = f"regression loss: LPIPS term skipped ({reason}); using MSE alone"
            log.warning(msg)
            warnings.warn(msg, LPIPSUnavailableWarning, stacklevel=2)
            stats["reg_lpips_skipped"] = 1.0
        else:
            p, q = pred, target
            if lpips_size is not None and p.shape[-2:] != (lpips_size, lpips_size):
                p = F.interpolate(p, size=(lpips_size, lpips_size), mode="bilinear", align_corners=False)
                q = F.interpolate(q, size=(lpips_size, lpips_size), mode="bilinear", align_corners=False)
            d = lpips(p, q).mean()
            loss = loss + lpips_weight * d
            stats["reg_lpips"] = float(d.detach())
    stats["loss_reg"] = float(loss.detach())
    return loss, stats


@dataclass
class RegressionBatch:
    """One DMD-style pair batch: the condition, the saved noise ``z`` the teacher sample was made
    from, and the teacher's sample decoded to images in [0, 1] (grid ``[B, 3, H, W]``)."""

    cond: Condition
    z: torch.Tensor
    teacher_images: torch.Tensor


# ================================================================================================
# Memory options
# ================================================================================================
def set_gradient_checkpointing(unet: nn.Module, enabled: bool) -> None:
    """diffusers' block-level activation checkpointing on one UNet (generator or fake score; a LoRA
    fake score's module is its own, so the teacher's module is untouched)."""
    if enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, "float32": 4, "float16": 2, "bfloat16": 2,
                "fp32": 4, "fp16": 2, "bf16": 2}

# Saved-for-backward activations of the SD2-shaped UNet (block_out_channels 320/640/1280/1280, 2
# layers per block, attention_head_dim 5/10/20/20, linear projections, cross-attention 1024) in one
# reference-attention evaluation (reference pass + sample pass), counted with
# torch.autograd.graph.saved_tensors_hooks (unique storages, parameters excluded) on CPU in bf16 at
# 24x16 .. 72x48 sample latents, with SDPA replaced by a flash-style function that saves only
# q, k, v, out and the log-sum-exp (what CUDA's flash / memory-efficient kernels keep): 258, 245,
# 243 KiB per latent pixel (sample + reference pixels) -> 243 KiB. With diffusers' gradient
# checkpointing 37 KiB/px stay saved; the block being recomputed during backward adds its own
# activations transiently (one resnet or transformer block, a few % of the total): 50 KiB/px.
_ACT_BYTES_PER_LATENT_PX_16BIT = 243 * 1024
_ACT_BYTES_PER_LATENT_PX_16BIT_CKPT = 50 * 1024
_SD2_UNET_PARAMS = 865_910_724
_SD2_LORA_PARAMS_PER_RANK = 207_488  # q/k/v/out LoRA on every attention of the SD2 UNet (829,952 at rank 4)


def estimate_stage1_memory(unet_params: int = _SD2_UNET_PARAMS, latent_shape: Sequence[int] = (4, 120, 80),
                           batch: int = 1, lora: bool = True, dtype: torch.dtype | str = torch.float16, *,
                           lora_params: int | None = None, lora_rank: int = 4, cond_latent_hw: Sequence[int] = (64, 64),
                           gradient_checkpointing: bool = False, master_weights_fp32: bool = True) -> dict[str, float]:
    """Back-of-envelope GPU memory (GiB) per component for one stage-1 step on one device.

    Assumptions (state them when quoting the numbers):

    * **Weights.** Teacher UNet in ``dtype``; generator: trained, kept in fp32 when
      ``master_weights_fp32`` (mixed precision keeps an fp32 master copy; its 16-bit compute copy
      lives transiently) else in ``dtype``; fake score: a full copy like the generator, or
      (``lora``) the teacher's shared base + ``lora_params`` fp32 adapter weights (default:
      ``lora_rank`` on q/k/v/out of every attention, 207,488 per rank for the SD2 UNet, scaled by
      ``unet_params``; 0.1 % of the UNet at rank 4). The VAE, CLIP vision
      encoder and text states are ignored (≈ 0.4 GB at fp16; the text encoder is not kept).
    * **Gradients** same dtype as the trained weights; **Adam** two fp32 moments per trained weight.
    * **Activations** (the rough part): the autograd-saved tensors of one UNet forward scale with the
      latent pixels; we use a measured constant per input latent pixel of the SD2 UNet at 16 bit
      (243 KiB/px; 50 KiB/px with gradient checkpointing; ×2 for fp32; scaled by ``unet_params`` /
      866 M for other widths, a crude proxy; the comment above the constants says how they were
      measured). Activations are taken in ``dtype`` (autocast / 16-bit compute). A reference-attention evaluation is two UNet passes: the reference pass on the
      condition latent (``cond_latent_hw``, 64×64 for 512² condition images) and the sample pass on
      the grid latent (120×80); both are kept for backward (the generator's gradient flows through
      the reference tokens). The generator step and the fake-score step run one after the other, so
      the peak activation is the larger of the two (they are equal). The teacher/fake no-grad
      predictions (CFG batch 2B) only need transient memory, ignored. Allocator fragmentation and
      the CUDA context (~0.5–1 GB) are not included.

    Returns GiB per component and ``total``; ``activations`` is the peak for one training pass."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    wb = _DTYPE_BYTES[dtype]
    gib = 1024 ** 3
    trained_b = 4 if master_weights_fp32 else wb
    if lora_params is None:
        lora_params = int(round(_SD2_LORA_PARAMS_PER_RANK * lora_rank * unet_params / _SD2_UNET_PARAMS)) if lora else 0
    out: dict[str, float] = {}
    out["teacher_weights"] = unet_params * wb / gib
    out["generator_weights"] = unet_params * trained_b / gib
    out["generator_grads"] = unet_params * trained_b / gib
    out["generator_adam"] = unet_params * 8 / gib
    fake_trained = lora_params if lora else unet_params
    out["fake_weights"] = fake_trained * (4 if lora else trained_b) / gib  # LoRA: base shared with the teacher
    out["fake_grads"] = fake_trained * (4 if lora else trained_b) / gib
    out["fake_adam"] = fake_trained * 8 / gib
    per_px = _ACT_BYTES_PER_LATENT_PX_16BIT_CKPT if gradient_checkpointing else _ACT_BYTES_PER_LATENT_PX_16BIT
    per_px *= (wb / 2) * (unet_params / _SD2_UNET_PARAMS)
    px = latent_shape[-2] * latent_shape[-1] + cond_latent_hw[0] * cond_latent_hw[1]
    out["activations"] = batch * px * per_px / gib
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


# ================================================================================================
# One alternating update
# ================================================================================================
@dataclass
class VSDSettings:
    """Hyper-parameters of :class:`VSDStep` (PAPER.md defaults)."""

    lr_generator: float = 1e-6
    lr_fake: float = 1e-6
    betas_generator: tuple[float, float] = (0.9, 0.999)  # the paper; GECO's code: (0.0, 0.99)
    betas_fake: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    teacher_cfg: float = 4.0
    fake_cfg: float = 1.0
    t_min: float = 0.02  # generator-loss timesteps, fraction of the 1000-step schedule
    t_max: float = 0.98
    fake_t_min: float = 0.02  # fake-score-loss timesteps (GECO's code: the same range)
    fake_t_max: float = 0.98
    fake_drop_cond_prob: float = 0.0  # condition dropout for the fake score (needed only if fake_cfg != 1)
    fake_steps: int = 1  # fake-score updates per generator update
    max_grad_norm: float | None = None  # clip each network's gradient norm (None: no clipping)
    regression_weight: float = 1.0  # weight of the optional regression term (when a batch is given)
    regression_mse_weight: float = 1.0
    regression_lpips_weight: float = 1.0
    gradient_checkpointing: bool = False  # on the generator's and the fake score's UNets
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, logged with the run


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


class VSDStep:
    """One alternating stage-1 update, diffusers-training-example style::

        fake = make_fake_score(teacher, "lora")
        step = VSDStep(teacher, generator, fake, VSDSettings(lr_generator=1e-6, lr_fake=1e-6))
        for batch in loader:
            cond = teacher.encode_condition(batch["cond_rgb"])
            stats = step(cond)              # generator step, then fake-score step
            tracker.log(stats)

    Optimisers: Adam on the generator's UNet and on the fake score's trainable parameters, with
    separate learning rates and betas (``VSDSettings``); pass your own to override. A step whose
    gradient norm is not finite is skipped (``*_skipped`` = 1 in the stats) rather than written
    into the weights."""

    def __init__(self, teacher: Zero123PlusTeacher, generator: "OneStepGenerator", fake_score: FakeScore,
                 settings: VSDSettings | None = None, *, optimizer_g: torch.optim.Optimizer | None = None,
                 optimizer_f: torch.optim.Optimizer | None = None, lpips: Any = None):
        self.teacher = teacher
        self.generator = generator
        self.fake_score = fake_score
        self.settings = s = settings or VSDSettings()
        self.lpips = lpips
        teacher.unet.requires_grad_(False)
        self.params_g = [p for p in generator.unet.parameters() if p.requires_grad]
        self.params_f = fake_score.trainable_parameters()
        if not self.params_g:
            raise ValueError("the generator has no trainable parameters")
        if not self.params_f:
            raise ValueError("the fake score has no trainable parameters")
        shared = {id(p) for p in self.params_g} & {id(p) for p in teacher.unet.parameters()}
        if shared:
            raise ValueError("the generator's UNet shares parameters with the teacher; build it with "
                             "OneStepGenerator.from_teacher (a deep copy)")
        self.optimizer_g = optimizer_g or torch.optim.Adam(self.params_g, lr=s.lr_generator, betas=s.betas_generator,
                                                           weight_decay=s.weight_decay)
        self.optimizer_f = optimizer_f or torch.optim.Adam(self.params_f, lr=s.lr_fake, betas=s.betas_fake,
                                                           weight_decay=s.weight_decay)
        set_gradient_checkpointing(generator.unet, s.gradient_checkpointing)
        set_gradient_checkpointing(fake_score.unet, s.gradient_checkpointing)
        self.step_count = 0

    def _noise(self, shape, generator: torch.Generator | None) -> torch.Tensor:
        return _randn(shape, generator, self.teacher.device)

    def __call__(self, cond: Condition, z: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 regression: RegressionBatch | None = None) -> dict[str, float]:
        """One generator update then ``fake_steps`` fake-score updates on the same (detached)
        generator outputs. ``z``: the generator's input noise (default fresh, batch = the
        condition's). All randomness comes from ``generator`` when given."""
        s, teacher = self.settings, self.teacher
        n_t = teacher.num_train_timesteps
        b = cond.batch_size if z is None else z.shape[0]
        if z is None:
            z = self._noise(teacher.latent_shape(b), generator)
        stats: dict[str, float] = {}

        # -- (1) generator step ------------------------------------------------------------------
        self.optimizer_g.zero_grad(set_to_none=True)
        x0 = self.generator(cond, z)
        t = sample_timesteps(b, generator, s.t_min, s.t_max, n_t, device=teacher.device)
        noise = self._noise(x0.shape, generator)
        loss_g, st = generator_loss(teacher, self.fake_score, x0, cond, t, noise, s.teacher_cfg, s.fake_cfg,
                                    generator=generator)
        stats.update(st)
        total = loss_g
        if regression is not None:
            x0_reg = self.generator(regression.cond, regression.z)
            images = teacher.decode_latents(x0_reg, clamp=False)
            loss_r, st_r = regression_loss(images, regression.teacher_images, self.lpips,
                                           s.regression_mse_weight, s.regression_lpips_weight)
            stats.update(st_r)
            total = total + s.regression_weight * loss_r
        total.backward()
        stats["grad_norm_g"] = _grad_norm(self.params_g, s.max_grad_norm)
        stats["g_skipped"] = 0.0 if math.isfinite(stats["grad_norm_g"]) else 1.0
        if not stats["g_skipped"]:
            self.optimizer_g.step()
        self.optimizer_g.zero_grad(set_to_none=True)

        # -- (2) fake-score step(s) on the same particles, detached --------------------------------
        particles = x0.detach()
        del x0, total, loss_g
        for _ in range(max(1, s.fake_steps)):
            self.optimizer_f.zero_grad(set_to_none=True)
            t_f = sample_timesteps(b, generator, s.fake_t_min, s.fake_t_max, n_t, device=teacher.device)
            noise_f = self._noise(particles.shape, generator)
            loss_f = fake_score_loss(teacher, self.fake_score, particles, cond, t_f, noise_f,
                                     drop_cond_prob=s.fake_drop_cond_prob, generator=generator)
            loss_f.backward()
            stats["loss_fake"] = float(loss_f.detach())
            stats["grad_norm_f"] = _grad_norm(self.params_f, s.max_grad_norm)
            stats["f_skipped"] = 0.0 if math.isfinite(stats["grad_norm_f"]) else 1.0
            if not stats["f_skipped"]:
                self.optimizer_f.step()
            self.optimizer_f.zero_grad(set_to_none=True)
            stats["t_fake_mean"] = float(t_f.float().mean())

        stats["x0_abs_mean"] = float(particles.abs().mean())
        stats["lr_g"] = float(self.optimizer_g.param_groups[0]["lr"])
        stats["lr_f"] = float(self.optimizer_f.param_groups[0]["lr"])
        self.step_count += 1
        stats["step"] = float(self.step_count)
        return stats
