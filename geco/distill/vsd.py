"""Stage 1 — multi-view score distillation (VSD) of the Zero123++ teacher into the one-step generator.

Three UNets with the same architecture and the same initial weights (PAPER.md, "Stage 1"):

* the **teacher** (frozen): ``teacher.unet``, CFG 4, reference attention noised to the sample's
  timestep, as Zero123++ samples;
* the **generator** G (trained): :class:`geco.models.generator.OneStepGenerator`, its own UNet copy;
* the **fake score** ("student", trained on G's outputs): :func:`make_fake_score`, either a full
  copy of the teacher's UNet (the paper and the authors' code) or a LoRA adapter on a UNet module
  that **shares the teacher's base weight tensors** (no second copy of the 866 M frozen parameters;
  see :func:`make_fake_score` for why the adapter lives on a separate module object rather than
  being toggled on the teacher's own module). A LoRA adapter learns far more slowly per step than a
  full copy at the same learning rate, so it needs its own, larger ``lr_fake``.

One optimiser step (:class:`VSDStep`, settings ``cfg.stage1``; ``geco.train.stage1.VSDTask`` runs it):

1. **generator update** — ``x0 = G(cond, z)``; ``t ~ U{t_min·N … t_max·N}``; ``x_t = α_t x0 + σ_t ε``;
   ``g = nan_to_num(ε_teacher(x_t; CFG 4) − ε_fake(x_t; CFG 1))`` (no grad, both from the same
   ``x_t`` and the same reference-pass noise, in float32 even under bf16 autocast: a small
   difference of two large predictions); loss ``0.5 · ‖x0 − stopgrad(x0 − g)‖² / B`` ("sum"
   reduction divided by the batch size, no w(t)), so that ``∂loss/∂x0 = g / B`` exactly. The
   generator's gradient is not clipped unless ``max_grad_norm_generator`` > 0 (clipping would
   reweight steps by ``1/‖∇‖``, a weighting the method does not have);
2. **fake-score update(s)** — its diffusion loss on ``x0.detach()`` (same particles as step 1, its
   own t and noise): ε-MSE (its v output converted to ε; the authors' code) or v-MSE
   (``fake_loss``; :func:`fake_score_loss`).

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
checkpointing per UNet (:func:`set_gradient_checkpointing`; diffusers' block-level
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
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geco.models.teacher import Condition, Zero123PlusTeacher, _randn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from geco.config import Stage1Config
    from geco.models.generator import OneStepGenerator
    from geco.train.loop import GradientStep

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FakeScore",
    "FakeScoreObjective",
    "GeneratorObjective",
    "RegressionPairs",
    "VSDStep",
    "clip_gradients",
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


def _full_precision(device: torch.device | str) -> AbstractContextManager:
    """Autocast off: what runs inside computes in the dtype of its inputs (float32 here)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def predict_eps(teacher: Zero123PlusTeacher, x_t: torch.Tensor, t, cond: Condition, guidance_scale: float = 1.0, *,
                cond_noise: torch.Tensor | None = None, unet: nn.Module | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ε-prediction (``σ_t x_t + α_t v``) of ``unet`` (default the teacher's) with the teacher's
    conditioning, in float32 whatever the UNet's dtype or autocast: the UNet runs as autocast says,
    its v output is cast to float32 before CFG (``predict_v`` casts it to ``x_t``'s dtype, float32
    here) and the ε conversion runs with autocast off. CFG is applied to v, which is the same as
    applying it to ε (the conversion is affine with the same ``x_t`` in both halves)."""
    x_t = x_t.float()
    v = teacher.predict_v(x_t, t, cond, guidance_scale=guidance_scale, cond_noise=cond_noise, unet=unet,
                          generator=generator)
    with _full_precision(x_t.device):
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
    """``g = ε_teacher(x_t; CFG teacher_cfg) − ε_fake(x_t; CFG fake_cfg)`` at ``x_t = α_t x0 + σ_t·noise``.

    Float32 throughout except inside the UNets (bf16 under autocast): both ε's are float32
    (:func:`predict_eps`) and their difference is taken with autocast off — it is a small
    difference of two large predictions, which 16 bits would mostly round away. NaN/inf in ``g``
    are zeroed (the authors' ``nan_to_num``). Both networks see the same ``x_t`` and the same
    reference-pass noise ``cond_noise`` (drawn from ``generator`` when not given), which removes that
    noise from the difference. Returns ``(g, parts)`` with ``x_t`` and the two ε's in ``parts``."""
    b = x0.shape[0]
    cond = cond.expand(b)
    x0 = x0.detach().float()
    x_t = teacher.add_noise(x0, noise.to(x0), t)
    if cond_noise is None:
        cond_noise = _cond_noise(teacher, cond, b, generator)
    eps_teacher = predict_eps(teacher, x_t, t, cond, teacher_cfg, cond_noise=cond_noise, unet=None)
    eps_fake = predict_eps(teacher, x_t, t, cond, fake_cfg, cond_noise=cond_noise, unet=fake_score.unet)
    with _full_precision(x_t.device):
        g = torch.nan_to_num(eps_teacher - eps_fake, nan=0.0, posinf=0.0, neginf=0.0)
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
                    noise: torch.Tensor, *, target: Literal["eps", "v"] = "eps", cond_noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The fake score's diffusion loss on the generator's **detached** outputs (so only the fake
    score's trainable parameters get gradients), conditional (CFG 1), at ``x_t = α_t x0 + σ_t·noise``:

    * ``target="eps"`` (the authors' code): ``mean ‖ε̂ − noise‖²`` with ``ε̂ = σ_t x_t + α_t v_fake``
      (its v output converted to ε);
    * ``target="v"``: ``mean ‖v_fake − (α_t·noise − σ_t x0)‖²``.

    Per sample ``ε̂ − noise = α_t (v_fake − v)``, so the ε loss is the v loss weighted by ``ᾱ_t``:
    the v loss puts ``1/ᾱ_t`` more weight on high timesteps. Computed in float32. Reference pass
    noised to ``t`` like the teacher's (``cond_noise``, default fresh from ``generator``)."""
    x0 = x0_latents.detach().float()
    b = x0.shape[0]
    cond = cond.expand(b)
    noise = noise.to(x0)
    x_t = teacher.add_noise(x0, noise, t)
    v = teacher.predict_v(x_t, t, cond, guidance_scale=1.0, cond_noise=cond_noise, unet=fake_score.unet,
                          generator=generator)
    with _full_precision(x_t.device):
        if target == "eps":
            pred, want = teacher.v_to_eps(x_t, t, v.float()), noise
        elif target == "v":
            pred, want = v.float(), teacher.get_v(x0, noise, t)
        else:
            raise ValueError(f"fake-score loss target must be 'eps' or 'v', got {target!r}")
        return F.mse_loss(pred, want)


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
# One optimiser step of stage 1
# ================================================================================================
class GeneratorObjective(nn.Module):
    """The generator's objective on one micro-batch, as a module whose only registered submodule is
    the generator (what DDP synchronises or FSDP shards); the teacher, the fake score and LPIPS are
    plain references. ``forward(cond, z, t, noise, cond_noise, reg_z=None, reg_target=None)`` ->
    ``{"loss", "x0" (detached), "stats"}``: :func:`generator_loss` on ``x0 = G(cond, z)``, plus
    ``regression_weight ×`` :func:`regression_loss` of ``G(cond, reg_z)`` against ``reg_target``
    (teacher images) when those are given."""

    def __init__(self, generator: "OneStepGenerator", teacher: Zero123PlusTeacher, fake_score: FakeScore,
                 settings: "Stage1Config", lpips: Any = None):
        super().__init__()
        self.generator = generator
        object.__setattr__(self, "_refs", (teacher, fake_score, lpips))  # references, not submodules
        self.settings = settings

    def forward(self, cond: Condition, z: torch.Tensor, t, noise: torch.Tensor, cond_noise: torch.Tensor,
                reg_z: torch.Tensor | None = None, reg_target: torch.Tensor | None = None) -> dict[str, Any]:
        teacher, fake, lpips = self._refs
        s = self.settings
        x0 = self.generator(cond, z)
        loss, stats = generator_loss(teacher, fake, x0, cond, t, noise, s.teacher_cfg, s.fake_cfg,
                                     cond_noise=cond_noise)
        total = loss
        if reg_z is not None:
            images = teacher.decode_latents(self.generator(cond, reg_z), clamp=False)
            lpips_w = s.regression_lpips_weight if lpips is not None else 0.0
            loss_r, st = regression_loss(images, reg_target, lpips, s.regression_mse_weight, lpips_w)
            stats.update(st)
            total = total + s.regression_weight * loss_r
        return {"loss": total, "x0": x0.detach(), "stats": stats}


class FakeScoreObjective(nn.Module):
    """The fake score's objective (:func:`fake_score_loss`, target ``settings.fake_loss``) as a
    module registering the fake score only (a LoRA fake score's frozen base is the teacher's: the
    caller keeps it out of DDP). ``forward(x0, cond, t, noise, cond_noise)`` -> the loss."""

    def __init__(self, fake_score: FakeScore, teacher: Zero123PlusTeacher, settings: "Stage1Config"):
        super().__init__()
        self.fake = fake_score
        object.__setattr__(self, "_teacher", teacher)
        self.target = settings.fake_loss

    def forward(self, x0: torch.Tensor, cond: Condition, t, noise: torch.Tensor, cond_noise: torch.Tensor) -> torch.Tensor:
        return fake_score_loss(self._teacher, self.fake, x0, cond, t, noise, target=self.target, cond_noise=cond_noise)


def clip_gradients(model: nn.Module, params: Sequence[nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of the gradients before clipping; they are scaled down to ``max_norm``
    when it is > 0 and left untouched when it is 0. A module that shards its parameters provides
    its own ``clip_grad_norm_`` (FSDP: the norm over every rank's shard), used when present."""
    own = getattr(model, "clip_grad_norm_", None)
    if own is not None:
        return float(own(max_norm if max_norm > 0 else math.inf))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])))


#: ``(object keys, condition) -> (saved noise z [B, 4, h, w], teacher images [B, 3, H, W])``: the
#: regression term's pairs for one micro-batch (the caller owns how they are made and cached)
RegressionPairs = Callable[[Sequence[str], Condition], "tuple[torch.Tensor, torch.Tensor]"]


class VSDStep:
    """One optimiser step of stage 1 on a list of micro-batches (gradient accumulation)::

        step = VSDStep(teacher, GeneratorObjective(G, teacher, fake, cfg.stage1),
                       FakeScoreObjective(fake, teacher, cfg.stage1), step_g, step_f, cfg.stage1)
        metrics = step(micro_batches, torch.Generator().manual_seed(...))

    ``generator`` / ``fake`` are the two objectives, possibly wrapped by DDP or FSDP; ``step_g`` /
    ``step_f`` the :class:`~geco.train.loop.GradientStep` of each network (its optimiser, scheduler,
    accumulation = the number of micro-batches, autocast; built with ``max_grad_norm=0``: this step
    clips, with ``settings.max_grad_norm_generator`` / ``max_grad_norm_fake``). Settings are
    ``cfg.stage1`` (:class:`geco.config.Stage1Config`). Micro-batches: ``{"cond": condition images
    [B, 3, H, W], "keys": object ids}`` (keys only for the regression term).

    1. **Generator update.** Per micro-batch: the condition is encoded, ``z``, ``t ~ U[t_min,
       t_max]·1000``, the noise and the reference-pass noise are drawn, and
       :class:`GeneratorObjective`'s loss is back-propagated; then one update of G.
    2. **Fake-score updates** (``fake_steps`` of them), on the detached outputs of step 1 (the same
       particles; their own t and noise; the condition dropped to the unconditional one with
       probability ``fake_drop_cond_prob``).

    Each update: the gradient norm before clipping is logged (``grad_norm_g`` / ``grad_norm_f``);
    when it is not finite that network's update is skipped (``g_skipped`` / ``f_skipped`` = 1; its
    scheduler still advances). Every random number is drawn from ``gen`` (a CPU generator) in a
    fixed order, so the caller seeding it by (seed, rank, step) makes a resumed run exact."""

    def __init__(self, teacher: Zero123PlusTeacher, generator: nn.Module, fake: nn.Module, step_g: "GradientStep",
                 step_f: "GradientStep", settings: "Stage1Config", *, regression_pairs: RegressionPairs | None = None):
        if settings.regression_weight > 0 and regression_pairs is None:
            raise ValueError("stage1.regression_weight > 0 needs regression_pairs (the teacher's samples)")
        self.teacher = teacher
        self.generator = generator
        self.fake = fake
        self.step_g = step_g
        self.step_f = step_f
        self.settings = settings
        self.regression_pairs = regression_pairs

    def __call__(self, micro_batches: Sequence[Mapping[str, Any]], gen: torch.Generator) -> dict[str, float]:
        s, teacher = self.settings, self.teacher
        dev, n_t, n = teacher.device, teacher.num_train_timesteps, len(micro_batches)
        sums: dict[str, float] = {}

        def add(k: str, v: float | torch.Tensor, count: int) -> None:
            sums[k] = sums.get(k, 0.0) + float(v) / count

        # -- (1) generator update ------------------------------------------------------------------
        conds, particles = [], []
        for i, mb in enumerate(micro_batches):
            cond = teacher.encode_condition(mb["cond"], generator=gen)
            b = cond.batch_size
            z = _randn(teacher.latent_shape(b), gen, dev)
            t = sample_timesteps(b, gen, s.t_min, s.t_max, n_t, device=dev)
            noise = _randn(teacher.latent_shape(b), gen, dev)
            cond_noise = _randn((b, *cond.cond_lat.shape[1:]), gen, dev)
            reg_z = reg_target = None
            if s.regression_weight > 0:
                reg_z, reg_target = self.regression_pairs(mb["keys"], cond)
            with self.step_g.micro(self.generator, i):
                out = self.generator(cond, z, t, noise, cond_noise, reg_z, reg_target)
                self.step_g.backward(out["loss"])
            conds.append(cond)
            particles.append(out["x0"])
            add("loss_generator", out["loss"].detach(), n)
            for k, v in out["stats"].items():
                add(k, v, n)
        sums.update(self._update(self.step_g, self.generator, s.max_grad_norm_generator, "g"))

        # -- (2) fake-score update(s) on the same particles -------------------------------------
        for _ in range(s.fake_steps):
            for i, (cond, x0) in enumerate(zip(conds, particles)):
                b = x0.shape[0]
                t_f = sample_timesteps(b, gen, s.t_min, s.t_max, n_t, device=dev)
                noise_f = _randn(tuple(x0.shape), gen, dev)
                cond_noise_f = _randn((b, *cond.cond_lat.shape[1:]), gen, dev)
                if s.fake_drop_cond_prob > 0:
                    drop = torch.rand(b, generator=gen) < s.fake_drop_cond_prob
                    cond = cond.where(drop.to(dev), cond.uncond())
                with self.step_f.micro(self.fake, i):
                    loss_f = self.fake(x0, cond, t_f, noise_f, cond_noise_f)
                    self.step_f.backward(loss_f)
                add("loss_fake", loss_f.detach(), n * s.fake_steps)
            sums.update(self._update(self.step_f, self.fake, s.max_grad_norm_fake, "f"))

        sums["x0_abs_mean"] = float(torch.stack([p.float().abs().mean() for p in particles]).mean())
        sums["loss"] = sums["loss_generator"]
        sums["lr"] = sums["lr_generator"]
        return sums

    @staticmethod
    def _update(stepper: "GradientStep", model: nn.Module, max_norm: float, which: str) -> dict[str, float]:
        name = {"g": "generator", "f": "fake"}[which]
        norm = clip_gradients(model, stepper.params, max_norm)
        finite = math.isfinite(norm)
        if not finite:  # skip this network's update (the scheduler still advances)
            log.warning("stage1: non-finite %s gradient; update skipped", name)
            for p in stepper.params:
                p.grad = None
        lr = stepper.step()["lr"]
        return {f"grad_norm_{which}": norm, f"lr_{name}": lr, f"{which}_skipped": 0.0 if finite else 1.0}
