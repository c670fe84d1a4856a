"""Zero123++-style multi-view diffusion teacher, built from diffusers/transformers parts.

What it does (UPSTREAM.md, "Zero123++"):

* **Global condition.** The CLIP text encoding of the empty prompt ([1, 77, D], computed once and
  kept as the buffer ``text_states``) plus the condition image's CLIP ``image_embeds`` ramped per
  token: ``hidden = text + image_embeds[:, None, :] * ramp[:, None]``.
* **Local condition: reference attention.** ``cond_lat`` (VAE posterior of the condition image
  normalised with (x-0.5)/0.8, *not* multiplied by the scaling factor) is noised to the sample's
  timestep, t = 0 included (or to ``cond_timestep``; only an explicit ``cond_timestep=CLEAN_REFERENCE``
  means the clean latent, the one-step generator's convention) and run through the same UNet with the same
  encoder states; every self-attention (``attn1``) stores its post-norm input tokens ("write"); then
  the UNet runs on the sample and every ``attn1`` attends to ``[own tokens, stored tokens]`` as the
  key/value source, with queries from the sample only ("read"). Implemented by
  :class:`ReferenceAttnProcessor`, a diffusers attention processor chained to SDPA
  (``AttnProcessor2_0``); the mode and the token bank travel in ``cross_attention_kwargs`` so that a
  gradient-checkpointed block recomputes with the same mode (no global state).
* **Classifier-free guidance.** Unconditional = the empty-prompt text states with no image
  embedding, and ``cond_lat`` of a mid-grey image (zeros after normalisation); both halves use
  reference attention; one batched UNet call of 2B.
* **Latent scaling.** target latent = (vae_latent * scaling_factor - 0.22) * 0.75; decode
  z / 0.75 + 0.22, / scaling_factor, VAE decode, * 1.6 -> [-1, 1]. Images in [0, 1] enter the VAE as
  (x - 0.5) / 0.8.
* **Output grid.** 3 rows x 2 columns of square tiles, row-major: view k at row k // 2, column k % 2.

Weights: :func:`load_teacher` reads a local folder or an ``s3://`` prefix in the published
``sudo-ai/zero123plus-v1.2`` layout (each component through its class's ``from_pretrained``, since the
pipeline class is not part of diffusers), optionally replacing the UNet (InstantMesh's fine-tune:
a diffusers folder or a state-dict file, any key prefix such as ``unet.unet.``).
:func:`build_tiny_teacher` makes a randomly initialised model of the same classes for tests and the
embedded demo; :func:`save_teacher` writes the same upstream layout (safetensors).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from geco import storage
from geco.config import TeacherConfig

if TYPE_CHECKING:  # heavy imports stay lazy: grid helpers are used by light modules too
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

log = logging.getLogger(__name__)

# -- constants (identical for Zero123++ v1.1 and v1.2) ------------------------------------------
LATENT_SHIFT = 0.22  # target latent = (vae_latent * scaling_factor - 0.22) * 0.75
LATENT_SCALE = 0.75
IMAGE_MEAN = 0.5  # images in [0, 1] enter the VAE as (x - 0.5) / 0.8 (= [-1, 1] * 0.5 / 0.8)
IMAGE_STD = 0.8
GRID_ROWS, GRID_COLS = 3, 2
NUM_VIEWS = GRID_ROWS * GRID_COLS
NUM_TRAIN_TIMESTEPS = 1000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESAMPLE, VAE_RESAMPLE = 3, 2  # PIL filters of the published preprocessor configs: bicubic, bilinear
TEXT_LENGTH = 77  # CLIP text positions = number of ramping coefficients
# predict_v(..., cond_timestep=CLEAN_REFERENCE): the reference pass sees the clean condition latent
# (at UNet timestep 0). A sampler's t = 0 is not this: Zero123++ noises the reference there too.
CLEAN_REFERENCE = 0

# The scheduler Zero123++ ships (v-prediction, linear betas) and the extra keys its config carries.
ZERO123PP_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}
UPSTREAM_SCHEDULER_EXTRAS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}

# model_index.json entries of the published folder (class per subfolder).
COMPONENTS: dict[str, tuple[str, str]] = {
    "feature_extractor_clip": ("transformers", "CLIPImageProcessor"),
    "feature_extractor_vae": ("transformers", "CLIPImageProcessor"),
    "scheduler": ("diffusers", "EulerAncestralDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "vision_encoder": ("transformers", "CLIPVisionModelWithProjection"),
}

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin",
                         "model.safetensors.index.json", "pytorch_model.bin.index.json")
# Each entry: a list of requirements; a requirement is a tuple of alternatives (any one will do).
_REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "vae": [("config.json",), _DIFFUSERS_WEIGHTS],
    "unet": [("config.json",), _DIFFUSERS_WEIGHTS],
    "text_encoder": [("config.json",), _TRANSFORMERS_WEIGHTS],
    "vision_encoder": [("config.json",), _TRANSFORMERS_WEIGHTS],
    "tokenizer": [("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")],
    "scheduler": [("scheduler_config.json",)],
    "feature_extractor_clip": [("preprocessor_config.json",)],
    "feature_extractor_vae": [("preprocessor_config.json",)],
}


class TeacherFolderError(FileNotFoundError):
    """A teacher folder (or UNet override) is missing files or is not in the expected layout."""


# ================================================================================================
# The 3 x 2 view grid and the latent/image scaling
# ================================================================================================
def grid_from_views(views: torch.Tensor) -> torch.Tensor:
    """``[B, 6, C, h, w]`` -> ``[B, C, 3h, 2w]``; view k lands at row k // 2, column k % 2."""
    if views.ndim != 5 or views.shape[1] != NUM_VIEWS:
        raise ValueError(f"expected views [B, {NUM_VIEWS}, C, h, w], got {tuple(views.shape)}")
    b, _, c, h, w = views.shape
    return (views.reshape(b, GRID_ROWS, GRID_COLS, c, h, w)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(b, c, GRID_ROWS * h, GRID_COLS * w))


def views_from_grid(grid: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """``[B, C, 3h, 2w]`` -> ``[B, 6, C, h, w]`` (inverse of :func:`grid_from_views`).

    ``tile_size``, when given, is checked against the grid (h == w == tile_size)."""
    if grid.ndim != 4 or grid.shape[2] % GRID_ROWS or grid.shape[3] % GRID_COLS:
        raise ValueError(f"expected a grid [B, C, 3h, 2w], got {tuple(grid.shape)}")
    b, c, hh, ww = grid.shape
    h, w = hh // GRID_ROWS, ww // GRID_COLS
    if tile_size is not None and (h, w) != (tile_size, tile_size):
        raise ValueError(f"grid {hh}x{ww} does not hold 3x2 tiles of {tile_size}px (tiles are {h}x{w})")
    return (grid.reshape(b, c, GRID_ROWS, h, GRID_COLS, w)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, NUM_VIEWS, c, h, w))


def scale_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latent already multiplied by the scaling factor -> the teacher's latent space."""
    return (latents - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`scale_latents` (still to be divided by the VAE scaling factor)."""
    return latents / LATENT_SCALE + LATENT_SHIFT


def images_to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the VAE's input range, (x - 0.5) / 0.8."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def vae_output_to_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE decoder output -> images in [0, 1]: x 1.6 gives [-1, 1], then (x + 1) / 2."""
    return (decoded * (IMAGE_STD / IMAGE_MEAN) + 1.0) * 0.5


# ================================================================================================
# Reference attention
# ================================================================================================
class ReferenceAttnProcessor:
    """Attention processor for reference ("reference-only") attention.

    Installed on every attention layer of a UNet by :func:`install_reference_attention`, active on
    self-attention (``attn1``) only (``enabled``); cross-attention layers pass straight through (they
    get the processor too so that the extra kwargs are accepted quietly). The mode comes per call in
    ``cross_attention_kwargs``:

    * ``ref_mode="write"``: store this layer's input tokens (the block's post-norm hidden states) in
      ``ref_bank[name]``, then attend normally;
    * ``ref_mode="read"``: keys/values come from ``cat([own tokens, ref_bank[name]], dim=1)`` through
      this layer's own ``to_k``/``to_v``; queries from the sample only, so the output keeps the
      sample's token count;
    * ``ref_mode=None`` (off): plain attention.
    """

    def __init__(self, name: str, enabled: bool = True):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.name = name
        self.enabled = enabled
        self.inner = AttnProcessor2_0()  # torch scaled_dot_product_attention

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ref_mode: str | None = None, ref_bank: dict | None = None) -> torch.Tensor:
        if self.enabled and ref_mode is not None:
            if ref_bank is None:
                raise ValueError("reference attention: ref_mode given without a ref_bank dict")
            if ref_mode == "write":
                ref_bank[self.name] = hidden_states
            elif ref_mode == "read":
                ref = ref_bank.get(self.name)
                if ref is None:
                    raise RuntimeError(f"reference attention: no tokens stored for {self.name}; "
                                       "run the UNet in 'write' mode on the reference first")
                own = hidden_states if encoder_hidden_states is None else encoder_hidden_states
                if ref.shape[0] != own.shape[0]:
                    raise ValueError(f"reference attention: reference batch {ref.shape[0]} != sample batch "
                                     f"{own.shape[0]} at {self.name}")
                encoder_hidden_states = torch.cat([own, ref.to(own.dtype)], dim=1)
            else:
                raise ValueError(f"ref_mode must be 'write', 'read' or None, got {ref_mode!r}")
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_reference_attention(unet: "UNet2DConditionModel") -> None:
    """Put a :class:`ReferenceAttnProcessor` on every attention layer (enabled on ``attn1``)."""
    procs = {name: ReferenceAttnProcessor(name, enabled=name.endswith("attn1.processor"))
             for name in unet.attn_processors}
    unet.set_attn_processor(procs)


def has_reference_attention(unet: "UNet2DConditionModel") -> bool:
    procs = unet.attn_processors
    return bool(procs) and all(isinstance(p, ReferenceAttnProcessor) for p in procs.values())


def ensure_reference_attention(unet: "UNet2DConditionModel") -> None:
    """Install the processors unless they are there already (e.g. after someone reset them)."""
    if not has_reference_attention(unet):
        install_reference_attention(unet)


def set_reference_attention_enabled(unet: "UNet2DConditionModel", enabled: bool) -> None:
    """Switch reference attention on/off on every ``attn1`` processor of ``unet``."""
    ensure_reference_attention(unet)
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            proc.enabled = enabled


@contextlib.contextmanager
def reference_attention_disabled(unet: "UNet2DConditionModel") -> Iterator[None]:
    """Within the block the reference tokens are neither stored nor read."""
    set_reference_attention_enabled(unet, False)
    try:
        yield
    finally:
        set_reference_attention_enabled(unet, True)


def unet_forward_with_reference(unet: "UNet2DConditionModel", sample: torch.Tensor, timestep: torch.Tensor,
                                encoder_hidden_states: torch.Tensor, reference: torch.Tensor | None,
                                reference_timestep: torch.Tensor | None = None) -> torch.Tensor:
    """One reference-attention UNet evaluation: the reference pass ("write", output discarded) on
    the already-noised ``reference`` latent at ``reference_timestep`` (default ``timestep``), then the
    sample pass ("read"). ``reference=None`` runs the sample pass alone (attention off)."""
    ensure_reference_attention(unet)
    cak = None
    if reference is not None:
        bank: dict[str, torch.Tensor] = {}
        unet(reference, timestep if reference_timestep is None else reference_timestep,
             encoder_hidden_states=encoder_hidden_states,
             cross_attention_kwargs={"ref_mode": "write", "ref_bank": bank}, return_dict=False)
        cak = {"ref_mode": "read", "ref_bank": bank}
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cak, return_dict=False)[0]


# ================================================================================================
# Condition
# ================================================================================================
@dataclass
class Condition:
    """Everything the UNet is conditioned on, for a batch of condition images.

    ``encoder_hidden_states`` [B, 77, D]: text states + ramped CLIP image embedding;
    ``cond_lat`` [B, 4, h, w]: the condition image's VAE latent (unscaled);
    ``uncond_hidden_states`` / ``uncond_lat``: the CFG-unconditional counterparts (text states alone,
    the mid-grey image's latent)."""

    encoder_hidden_states: torch.Tensor
    cond_lat: torch.Tensor
    uncond_hidden_states: torch.Tensor | None = None
    uncond_lat: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]

    @property
    def has_uncond(self) -> bool:
        return self.uncond_hidden_states is not None and self.uncond_lat is not None

    def uncond(self) -> "Condition":
        """The CFG-unconditional condition (its own ``uncond()`` is itself)."""
        if not self.has_uncond:
            raise ValueError("this Condition carries no unconditional branch (build it with encode_condition)")
        return Condition(self.uncond_hidden_states, self.uncond_lat, self.uncond_hidden_states, self.uncond_lat)

    def _map(self, fn) -> "Condition":
        return Condition(*(None if x is None else fn(x) for x in
                           (self.encoder_hidden_states, self.cond_lat, self.uncond_hidden_states, self.uncond_lat)))

    def to(self, *args, **kwargs) -> "Condition":
        return self._map(lambda x: x.to(*args, **kwargs))

    def detach(self) -> "Condition":
        return self._map(lambda x: x.detach())

    def __getitem__(self, index) -> "Condition":
        """Select batch elements (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda x: x[index])

    def expand(self, batch: int) -> "Condition":
        """Broadcast a batch-1 condition to ``batch`` (no copy); other sizes must already match."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"condition batch {self.batch_size} does not match sample batch {batch}")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    def where(self, mask: torch.Tensor, other: "Condition") -> "Condition":
        """Per batch element: ``other`` where ``mask`` is true, else self (condition dropout)."""
        def pick(a, b):
            m = mask.to(a.device).view(-1, *([1] * (a.ndim - 1)))
            return torch.where(m, b.to(a.dtype), a)
        return Condition(pick(self.encoder_hidden_states, other.encoder_hidden_states),
                         pick(self.cond_lat, other.cond_lat), self.uncond_hidden_states, self.uncond_lat)


# PIL.Image.Resampling codes, as preprocessor configs store them
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImagePreprocess:
    """What a ``CLIPImageProcessor`` config says, done as transformers' PIL processor does it: resize
    the shortest edge to ``size`` (the other edge ``int(size * long / short)``) with PIL's ``resample``
    filter on uint8, centre-crop, rescale to [0, 1], normalise. Zero123++ ships bicubic (3) for CLIP
    and bilinear (2) for the VAE input."""

    size: int  # shortest edge after resizing
    crop: tuple[int, int]  # (height, width) of the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL.Image.Resampling code: 2 bilinear, 3 bicubic (CLIPImageProcessor's default)

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "ImagePreprocess":
        def edge(v, key):
            if isinstance(v, (int, float)):
                return int(v)
            if isinstance(v, dict):
                for k in ("shortest_edge", "height"):
                    if k in v:
                        return int(v[k])
            raise TeacherFolderError(f"{where}: cannot read {key}={v!r}")

        def triple(v, key):
            if isinstance(v, (int, float)):
                return (float(v),) * 3
            if isinstance(v, (list, tuple)) and len(v) in (1, 3):
                return tuple(float(x) for x in (v * 3 if len(v) == 1 else v))
            raise TeacherFolderError(f"{where}: cannot read {key}={v!r}")

        size = edge(cfg.get("size", 224), "size")
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict) and "height" in crop:
            crop_hw = (int(crop["height"]), int(crop["width"]))
        else:
            c = edge(crop, "crop_size")
            crop_hw = (c, c)
        if not cfg.get("do_center_crop", True):
            crop_hw = (size, size)
        mean = triple(cfg.get("image_mean", 0.0), "image_mean") if cfg.get("do_normalize", True) else (0.0,) * 3
        std = triple(cfg.get("image_std", 1.0), "image_std") if cfg.get("do_normalize", True) else (1.0,) * 3
        resample = cfg.get("resample", 3)
        if resample not in _PIL_FILTERS:
            raise TeacherFolderError(f"{where}: resample={resample!r} is not a PIL filter code "
                                     f"({', '.join(f'{k} {v}' for k, v in _PIL_FILTERS.items())})")
        return cls(size, crop_hw, mean, std, int(resample))

    def to_config(self, scalar_stats: bool = False) -> dict:
        """A ``preprocessor_config.json`` in the upstream (CLIPImageProcessor) format."""
        mean: Any = list(self.mean)
        std: Any = list(self.std)
        if scalar_stats and len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            mean, std = self.mean[0], self.std[0]
        return {
            "crop_size": {"height": self.crop[0], "width": self.crop[1]},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": mean,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": std,
            "resample": self.resample,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": self.size},
        }

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after resizing the shortest edge to ``size`` (transformers' rule)."""
        if w <= h:
            return int(self.size * h / w), self.size
        return self.size, int(self.size * w / h)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], [B, 3, H, W] -> normalised [B, 3, crop_h, crop_w]. Images that need
        resizing go through PIL on uint8 (rounded), like the upstream pipeline's PIL input; images
        already at the size stay float and on their device (not differentiable through a resize)."""
        _, _, h, w = images.shape
        nh, nw = self.resized_hw(h, w)
        if (nh, nw) != (h, w):
            images = _pil_resize(images, (nh, nw), self.resample)
        ch, cw = self.crop
        if (nh, nw) != (ch, cw):
            if nh < ch or nw < cw:
                raise ValueError(f"image {nh}x{nw} is smaller than the crop {ch}x{cw}")
            top, left = (nh - ch) // 2, (nw - cw) // 2
            images = images[:, :, top:top + ch, left:left + cw]
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std


def _pil_resize(images: torch.Tensor, hw: tuple[int, int], resample: int) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> [B, 3, h, w]: rounded to uint8, resized by PIL with ``resample``,
    back to [0, 1] floats on the input's device."""
    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    u8 = u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    out = [np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), resample=Image.Resampling(resample))) for a in u8]
    return torch.from_numpy(np.stack(out)).to(images.device).permute(0, 3, 1, 2).float() / 255


# ================================================================================================
# The teacher
# ================================================================================================
def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def encode_empty_prompt(text_encoder: "CLIPTextModel", tokenizer: "CLIPTokenizer") -> torch.Tensor:
    """The text encoder's last hidden state for "" padded to the tokenizer's max length, as diffusers'
    StableDiffusionPipeline.encode_prompt computes it (no attention mask unless the config asks)."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = ids.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    out = text_encoder(ids.input_ids.to(device), attention_mask=mask)
    return out[0].float()


class Zero123PlusTeacher(nn.Module):
    """The Zero123++ teacher: UNet with reference attention, VAE, CLIP vision encoder, the empty
    prompt's text states, the ramp, and the v-prediction noise schedule.

    Timesteps index the 1000-step DDPM schedule; ``x_t = alpha_t * x0 + sigma_t * eps`` with
    ``alpha_t = sqrt(alphas_cumprod[t])`` (variance-preserving, what the UNet sees)."""

    def __init__(self, *, cfg: TeacherConfig, unet: "UNet2DConditionModel", vae: "AutoencoderKL", scheduler,
                 vision_encoder: "CLIPVisionModelWithProjection", text_states: torch.Tensor,
                 ramping_coefficients: list[float] | torch.Tensor, clip_preprocess: ImagePreprocess,
                 vae_preprocess: ImagePreprocess, text_encoder: "CLIPTextModel | None" = None,
                 tokenizer: "CLIPTokenizer | None" = None, source: str = "", source_dir: str | None = None):
        super().__init__()
        if scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"the teacher expects a v-prediction scheduler, got "
                             f"prediction_type={scheduler.config.prediction_type!r}")
        ramp = torch.as_tensor(ramping_coefficients, dtype=torch.float32).flatten()
        if text_states.ndim != 3 or text_states.shape[0] != 1 or text_states.shape[1] != ramp.numel():
            raise ValueError(f"text states {tuple(text_states.shape)} must be [1, {ramp.numel()}, D] "
                             f"(one ramping coefficient per token)")
        cross = unet.config.cross_attention_dim
        if text_states.shape[2] != cross:
            raise ValueError(f"text width {text_states.shape[2]} != UNet cross_attention_dim {cross}")
        self.cfg = cfg
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clip_preprocess = clip_preprocess
        self.vae_preprocess = vae_preprocess
        self.tile_size = cfg.tile_size
        self.cond_size = vae_preprocess.crop[0]
        self.source = source  # where the weights came from ("" = tiny random)
        self.source_dir = source_dir  # local folder in the upstream layout, if any
        self.register_buffer("text_states", text_states.detach().float().clone())
        self.register_buffer("ramp", ramp)
        self.register_buffer("alphas_cumprod",
                             torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32).clone(),
                             persistent=False)
        for frozen in (vae, vision_encoder, text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        unet.eval()
        install_reference_attention(unet)

    # -- basic properties ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(height, width) of the grid latent: 3 x 2 tiles of tile_size / vae_scale_factor."""
        t = self.tile_size // self.vae_scale_factor
        return GRID_ROWS * t, GRID_COLS * t

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.latent_channels, *self.latent_hw)

    def refresh_text_states(self) -> None:
        """Recompute the empty prompt's encoding (after changing the text encoder's weights)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("no text encoder in memory (load with keep_text_encoder=True)")
        self.text_states.copy_(encode_empty_prompt(self.text_encoder, self.tokenizer))

    # -- noise schedule ------------------------------------------------------------------------
    def _timesteps(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or [{batch}], got {tuple(t.shape)}")
        return t.float()

    def alpha_sigma(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) broadcastable against ``like`` ([B, ...]): (sqrt(abar_t), sqrt(1 - abar_t))
        at integer t. A fractional t (Euler with "linspace" spacing gives t = 749.25) takes the noise
        level Euler-ancestral uses there: its sigma ``sqrt((1 - abar) / abar)`` interpolated linearly
        between the neighbouring integer timesteps, then alpha = 1 / sqrt(1 + sigma^2) and sigma_t =
        sigma * alpha (computed in float64)."""
        t = self._timesteps(t, like.shape[0]).double().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor()
        w = t - lo
        abar = self.alphas_cumprod.double()
        edm_sigma = ((1 - abar) / abar).sqrt()  # Euler's sigma per integer timestep
        lo_i = lo.long()
        hi_i = (lo_i + 1).clamp(max=self.num_train_timesteps - 1)
        sig = (1 - w) * edm_sigma[lo_i] + w * edm_sigma[hi_i]
        alpha = (1 + sig * sig).rsqrt()
        shape = (-1, *([1] * (like.ndim - 1)))
        return alpha.view(shape).to(like.dtype), (sig * alpha).view(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def get_v(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The v-prediction target: alpha_t * eps - sigma_t * x0."""
        a, s = self.alpha_sigma(t, x0)
        return a * noise - s * x0

    def v_to_x0(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return a * x_t - s * v

    def v_to_eps(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return s * x_t + a * v

    def make_scheduler(self, sampler: Literal["euler_ancestral", "ddim"] | None = None):
        """A fresh inference scheduler (never the shared ``self.scheduler``: sampling has state)."""
        from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

        sampler = sampler or self.cfg.sampler
        # keyword overrides: from_config would otherwise re-apply the new class's defaults for keys
        # the stored config did not carry (diffusers' `_use_default_values`)
        spacing = {"timestep_spacing": self.cfg.timestep_spacing}
        if sampler == "euler_ancestral":
            return EulerAncestralDiscreteScheduler.from_config(self.scheduler.config, **spacing)
        if sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=False, **spacing)
        raise ValueError(f"sampler must be 'euler_ancestral' or 'ddim', got {sampler!r}")

    # -- images <-> latents --------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] [B, 3, H, W] -> the teacher's (scaled) latents [B, 4, H/f, W/f]."""
        x = images_to_vae_input(images.to(self.device, self.vae.dtype))
        post = self.vae.encode(x).latent_dist
        lat = post.sample(generator) if sample else post.mode()
        return scale_latents(lat.float() * self.vae.config.scaling_factor)

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """The teacher's latents -> images in [0, 1] (differentiable; clamped unless ``clamp=False``)."""
        z = unscale_latents(latents.to(self.device, torch.float32)) / self.vae.config.scaling_factor
        decoded = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        images = vae_output_to_images(decoded)
        return images.clamp(0, 1) if clamp else images

    # -- condition -----------------------------------------------------------------------------
    def encode_condition(self, cond_rgb: torch.Tensor, generator: torch.Generator | None = None) -> Condition:
        """Condition images in [0, 1] [B, 3, H, W] (background already composited) -> :class:`Condition`.
        No gradient, except into an image encoder that is being trained (teacher pretraining)."""
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.no_grad():
            cond = self._encode_condition(cond_rgb, generator, trainable)
        return cond

    def _encode_condition(self, cond_rgb: torch.Tensor, generator: torch.Generator | None,
                          image_grad: bool) -> Condition:
        if cond_rgb.ndim != 4 or cond_rgb.shape[1] != 3:
            raise ValueError(f"expected condition images [B, 3, H, W], got {tuple(cond_rgb.shape)}")
        x = cond_rgb.to(self.device, torch.float32).clamp(0, 1)
        b = x.shape[0]
        sample = self.cfg.cond_latent == "sample"
        # local condition: VAE posterior of the normalised image, NOT multiplied by scaling_factor
        post = self.vae.encode(self.vae_preprocess(x).to(self.vae.dtype)).latent_dist
        cond_lat = (post.sample(generator) if sample else post.mode()).float()
        # global condition: text states + ramped CLIP image embedding
        clip_in = self.clip_preprocess(x).to(self.vision_encoder.dtype)
        text = self.text_states.expand(b, -1, -1)
        with torch.enable_grad() if image_grad else contextlib.nullcontext():
            embeds = self.vision_encoder(pixel_values=clip_in).image_embeds.float()
            hidden = text + embeds[:, None, :] * self.ramp[None, :, None]
        # unconditional: text alone, and the latent of a uniform grey image (zeros when 0.5)
        ch, cw = self.vae_preprocess.crop
        grey = torch.full((1, 3, ch, cw), float(self.cfg.uncond_image_value), device=self.device)
        mean = grey.new_tensor(self.vae_preprocess.mean).view(1, 3, 1, 1)
        std = grey.new_tensor(self.vae_preprocess.std).view(1, 3, 1, 1)
        gpost = self.vae.encode(((grey - mean) / std).to(self.vae.dtype)).latent_dist
        if sample:
            eps = _randn((b, *gpost.mean.shape[1:]), generator, self.device)
            uncond_lat = gpost.mean.float() + gpost.std.float() * eps
        else:
            uncond_lat = gpost.mode().float().expand(b, -1, -1, -1).clone()
        return Condition(hidden, cond_lat, text.clone(), uncond_lat)

    def noise_condition(self, cond_lat: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """The reference latent at timestep ``t``: ``alpha_t * cond_lat + sigma_t * noise``, at every
        timestep, 0 included (sigma_0 ~ 0.029), as Zero123++'s ``scheduler.add_noise`` followed by
        ``scale_model_input`` gives it. The clean latent is not a timestep: see ``predict_v``'s
        ``cond_timestep=CLEAN_REFERENCE``."""
        a, s = self.alpha_sigma(t, cond_lat)
        return a * cond_lat + s * noise.to(cond_lat.dtype)

    # -- the UNet ------------------------------------------------------------------------------
    def predict_v(self, x_t: torch.Tensor, t, cond: Condition, cond_timestep=None, guidance_scale: float = 1.0,
                  *, cond_noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  unet: "UNet2DConditionModel | None" = None, use_reference: bool = True) -> torch.Tensor:
        """v-prediction for ``x_t`` (what the UNet sees, [B, 4, h, w]) at timestep ``t`` (scalar or [B]).

        The reference pass noises ``cond.cond_lat`` with ``cond_noise`` (default: fresh noise from
        ``generator``) to the sample's timestep ``t`` (``cond_timestep=None``, as Zero123++ does, at
        t = 0 too) or to ``cond_timestep``. ``cond_timestep=CLEAN_REFERENCE`` (0) asks for the clean
        latent instead, run at UNet timestep 0 (the one-step generator's convention, DESIGN.md); only
        this explicit request skips the noise. ``guidance_scale != 1`` runs batched CFG:
        ``v_u + s * (v_c - v_u)``, both halves with reference attention; ``cond_noise`` may then be [B]
        (shared by both halves) or [2B] (unconditional half first). ``unet`` overrides ``self.unet``
        (a generator or fake-score copy: same conditioning, other weights). ``use_reference=False``
        skips the reference pass (the condition latent then has no effect)."""
        unet = self.unet if unet is None else unet
        b = x_t.shape[0]
        t = self._timesteps(t, b)
        tc = t if cond_timestep is None else self._timesteps(cond_timestep, b)
        # the caller's explicit cond_timestep == CLEAN_REFERENCE: the clean latent (never a sampler's t)
        clean = None if cond_timestep is None else tc == CLEAN_REFERENCE
        cond = cond.expand(b).to(self.device)
        cfg = guidance_scale != 1.0
        if cfg:
            if not cond.has_uncond:
                raise ValueError("guidance_scale != 1 needs a Condition with its unconditional branch")
            hidden = torch.cat([cond.uncond_hidden_states, cond.encoder_hidden_states])
            lat = torch.cat([cond.uncond_lat, cond.cond_lat])
            x, t, tc = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([tc, tc])
            clean = None if clean is None else torch.cat([clean, clean])
        else:
            hidden, lat, x = cond.encoder_hidden_states, cond.cond_lat, x_t
        n = x.shape[0]
        reference = None
        if use_reference:
            if cond_noise is None:
                cond_noise = _randn(lat.shape, generator, self.device)
            elif cond_noise.shape[0] == b and n == 2 * b:
                cond_noise = torch.cat([cond_noise, cond_noise])
            if cond_noise.shape != lat.shape:
                raise ValueError(f"cond_noise {tuple(cond_noise.shape)} does not match the condition latents "
                                 f"{tuple(lat.shape)}")
            reference = self.noise_condition(lat.float(), tc, cond_noise.to(self.device))
            if clean is not None:
                reference = torch.where(clean.view(-1, 1, 1, 1), lat.float(), reference)
        dtype = unet.dtype
        v = unet_forward_with_reference(
            unet, x.to(dtype), t, hidden.to(dtype),
            None if reference is None else reference.to(dtype), tc,
        ).to(x_t.dtype)
        if cfg:
            v_u, v_c = v.chunk(2)
            return v_u + guidance_scale * (v_c - v_u)
        return v

    def diffusion_loss(self, cond_rgb: torch.Tensor | Condition, target_grid_rgb: torch.Tensor, *,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, drop_cond_prob: float = 0.0,
                       unet: "UNet2DConditionModel | None" = None) -> torch.Tensor:
        """MSE on v for a batch (pretraining / InstantMesh-style fine-tuning): targets are 3 x 2 grids
        in [0, 1]; t uniform in [0, 999]; the condition is dropped to the CFG-unconditional one with
        probability ``drop_cond_prob`` per sample."""
        cond = cond_rgb if isinstance(cond_rgb, Condition) else self.encode_condition(cond_rgb, generator)
        with torch.no_grad():
            x0 = self.encode_images(target_grid_rgb, sample=True, generator=generator)
        b = x0.shape[0]
        cond = cond.expand(b).to(self.device)
        if t is None:
            gen_dev = generator.device if generator is not None else self.device
            t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=gen_dev).to(self.device)
        if noise is None:
            noise = _randn(x0.shape, generator, self.device)
        x_t = self.add_noise(x0, noise, t)
        target = self.get_v(x0, noise, t)
        if drop_cond_prob > 0:
            gen_dev = generator.device if generator is not None else self.device
            drop = torch.rand(b, generator=generator, device=gen_dev).to(self.device) < drop_cond_prob
            cond = cond.where(drop, cond.uncond())
        v = self.predict_v(x_t, t, cond, generator=generator, unet=unet)
        return F.mse_loss(v.float(), target.float())

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond_rgb: torch.Tensor | Condition, num_steps: int | None = None,
               guidance_scale: float | None = None, sampler: Literal["euler_ancestral", "ddim"] | None = None,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None, *,
               eta: float = 0.0, cond_timestep=None, unet: "UNet2DConditionModel | None" = None) -> torch.Tensor:
        """Sample grid latents (the teacher's scaled latent space; decode with :meth:`decode_latents`).

        Defaults come from the config (75 steps, CFG 4, Euler-ancestral, "trailing" spacing).
        ``latents`` is the initial N(0, I) noise (Euler scales it by the scheduler's
        ``init_noise_sigma``). All randomness (condition latents, initial noise, the reference pass's
        condition noise, ancestral noise) comes from ``generator``: the same generator seed gives the
        same sample."""
        num_steps = num_steps or self.cfg.num_inference_steps
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        sampler = sampler or self.cfg.sampler
        cond = cond_rgb if isinstance(cond_rgb, Condition) else self.encode_condition(cond_rgb, generator)
        b = cond.batch_size if latents is None else latents.shape[0]
        if latents is None:
            latents = _randn(self.latent_shape(b), generator, self.device)
        sched = self.make_scheduler(sampler)
        sched.set_timesteps(num_steps, device=self.device)
        x = latents.to(self.device, torch.float32) * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            v = self.predict_v(x_in, t, cond, cond_timestep, guidance_scale, generator=generator, unet=unet)
            if sampler == "ddim":
                x = sched.step(v, t, x, eta=eta, generator=generator, return_dict=False)[0]
            else:
                x = sched.step(v, t, x, generator=generator, return_dict=False)[0]
        return x


# ================================================================================================
# Tiny random teacher
# ================================================================================================
def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: the 256 printable stand-ins for bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_tokenizer_files() -> dict[str, Any]:
    """A minimal CLIP BPE vocabulary: the byte alphabet, each byte as a word end, and the two special
    tokens (no merges). Tokenises any text; "" -> [<|startoftext|>, <|endoftext|>, "!" padding], like
    SD2's tokenizer. Returns the upstream files' contents (vocab.json, merges.txt, configs)."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    def special(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n",
        "special_tokens_map.json": {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
                                    "pad_token": "!", "unk_token": special("<|endoftext|>")},
        "tokenizer_config.json": {"add_prefix_space": False, "bos_token": special("<|startoftext|>"),
                                  "do_lower_case": True, "eos_token": special("<|endoftext|>"), "errors": "replace",
                                  "model_max_length": TEXT_LENGTH, "pad_token": "!",
                                  "tokenizer_class": "CLIPTokenizer", "unk_token": special("<|endoftext|>")},
    }


def _tiny_tokenizer() -> "CLIPTokenizer":
    from transformers import CLIPTokenizer

    files = tiny_tokenizer_files()
    return CLIPTokenizer(vocab=files["vocab.json"], merges=[], bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="!",
                         model_max_length=TEXT_LENGTH)


def _groups(*channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def _heads(width: int) -> int:
    return max(1, width // 8) if width % 8 == 0 else 1


def build_tiny_teacher(cfg: TeacherConfig, seed: int = 0) -> Zero123PlusTeacher:
    """A randomly initialised teacher of the same classes, sized by the ``tiny_*`` fields (CPU tests,
    the embedded demo). Tile and condition sizes come from ``cfg.tile_size`` / ``cfg.cond_size``.
    Deterministic for a given ``seed`` (the global RNG is left untouched)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    cross = cfg.tiny_cross_attention_dim
    blocks = tuple(cfg.tiny_block_out_channels)
    vae_ch = tuple(cfg.tiny_vae_channels)
    img = cfg.tiny_clip_image_size
    patch = img // 4 if img % 4 == 0 else img
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tiny_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cross, intermediate_size=2 * cross,
            num_hidden_layers=cfg.tiny_clip_layers, num_attention_heads=_heads(cross),
            max_position_embeddings=TEXT_LENGTH, hidden_act="gelu", projection_dim=cross,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        vision_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=cfg.tiny_clip_hidden, intermediate_size=2 * cfg.tiny_clip_hidden,
            num_hidden_layers=cfg.tiny_clip_layers, num_attention_heads=_heads(cfg.tiny_clip_hidden),
            image_size=img, patch_size=patch, projection_dim=cross, hidden_act="gelu"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_ch,
            down_block_types=("DownEncoderBlock2D",) * len(vae_ch), up_block_types=("UpDecoderBlock2D",) * len(vae_ch),
            layers_per_block=1, norm_num_groups=_groups(*vae_ch), sample_size=cfg.cond_size)
        unet = UNet2DConditionModel(
            sample_size=cfg.tile_size // 2 ** (len(vae_ch) - 1), in_channels=4, out_channels=4,
            block_out_channels=blocks, layers_per_block=cfg.tiny_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * len(blocks), up_block_types=("CrossAttnUpBlock2D",) * len(blocks),
            cross_attention_dim=cross, attention_head_dim=cfg.tiny_attention_head_dim,
            use_linear_projection=True, norm_num_groups=_groups(*blocks))
        scheduler = EulerAncestralDiscreteScheduler(**ZERO123PP_SCHEDULER)
        dtype = getattr(torch, cfg.dtype)
        if dtype != torch.float32:
            for m in (text_encoder, vision_encoder, vae, unet):
                m.to(dtype)
        text_encoder.eval()
        text_states = encode_empty_prompt(text_encoder, tokenizer)
        ramp = torch.linspace(0.0, 1.0, TEXT_LENGTH).tolist()
    clip_pre = ImagePreprocess(img, (img, img), CLIP_MEAN, CLIP_STD, resample=CLIP_RESAMPLE)
    vae_pre = ImagePreprocess(cfg.cond_size, (cfg.cond_size, cfg.cond_size), (IMAGE_MEAN,) * 3, (IMAGE_STD,) * 3,
                              resample=VAE_RESAMPLE)
    teacher = Zero123PlusTeacher(cfg=cfg, unet=unet, vae=vae, scheduler=scheduler, vision_encoder=vision_encoder,
                                 text_states=text_states, ramping_coefficients=ramp, clip_preprocess=clip_pre,
                                 vae_preprocess=vae_pre, text_encoder=text_encoder, tokenizer=tokenizer)
    return teacher


TINY = "tiny"  # ``models.teacher.pretrained: tiny``: the tiny random teacher, asked for by name (tests, demos)


def make_teacher(cfg: TeacherConfig) -> Zero123PlusTeacher:
    """Real weights when ``cfg.pretrained`` names them, else the tiny random teacher ("" or :data:`TINY`)."""
    return load_teacher(cfg) if cfg.pretrained not in ("", TINY) else build_tiny_teacher(cfg)


# ================================================================================================
# Loading real weights
# ================================================================================================
def _local_copy(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """:func:`geco.storage.local_copy` into ``cache_dir`` (default ``$GECO_CACHE/teacher``)."""
    try:
        return storage.local_copy(uri, cache_dir=cache_dir or storage.default_cache_dir("teacher"))
    except FileNotFoundError as e:
        raise TeacherFolderError(str(e)) from None


def _missing_files(root: Path, skip_unet_weights: bool) -> list[str]:
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub, reqs in _REQUIRED.items():
        if not (root / sub).is_dir():
            missing.append(f"{sub}/ (the {COMPONENTS[sub][1]} subfolder)")
            continue
        for alternatives in reqs:
            if sub == "unet" and skip_unet_weights and alternatives is _DIFFUSERS_WEIGHTS:
                continue
            if not any((root / sub / name).is_file() for name in alternatives):
                missing.append(f"{sub}/{alternatives[0]}" + (f" (or {', '.join(alternatives[1:])})"
                                                             if len(alternatives) > 1 else ""))
    return missing


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherFolderError(f"{path}: cannot read JSON ({e})") from None


def _check_loading_info(name: str, root: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise TeacherFolderError(
            f"{root / name}: weights do not match config.json: "
            + (f"missing {len(missing)} tensors (e.g. {missing[:3]})" if missing else "")
            + (f" shape mismatch for {mismatched[:3]}" if mismatched else ""))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a weights-only torch pickle (``geco.weights``)."""
    from geco.weights import WeightsImportError
    from geco.weights import read_state_dict as _read

    try:
        return _read(path)
    except WeightsImportError as e:
        raise TeacherFolderError(f"{e}; convert it to .safetensors") from None


def extract_unet_state_dict(sd: dict[str, torch.Tensor], expected: set[str], where: str = "") -> dict[str, torch.Tensor]:
    """Find the prefix under which UNet2DConditionModel keys live (``""``, ``unet.``, ``unet.unet.``,
    ``model.diffusion_model.``-style wrappers ...) and strip it."""
    probe = "conv_in.weight"
    prefixes = {""} | {k[: -len(probe)] for k in sd if k.endswith(probe)}
    best, best_n = "", -1
    for p in sorted(prefixes, key=len):
        n = sum(1 for k in sd if k.startswith(p) and k[len(p):] in expected)
        if n > best_n:
            best, best_n = p, n
    if best_n <= 0:
        raise TeacherFolderError(f"{where}: no UNet2DConditionModel tensors found (looked for keys such as "
                                 f"'conv_in.weight' under any prefix, e.g. 'unet.unet.')")
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}


def load_unet_override(spec: str, root: Path | None, dtype: torch.dtype,
                       cache_dir: str | os.PathLike | None = None) -> "UNet2DConditionModel":
    """A UNet replacing the folder's: a diffusers UNet folder (``config.json`` + weights, or a pipeline
    folder with ``unet/``), or a state-dict file whose architecture is the folder's ``unet/config.json``."""
    from diffusers import UNet2DConditionModel

    path = _local_copy(spec, cache_dir)
    if path.is_dir():
        sub = None if (path / "config.json").is_file() else "unet" if (path / "unet" / "config.json").is_file() else False
        if sub is False:
            raise TeacherFolderError(f"{spec}: a UNet folder needs config.json (or unet/config.json) and "
                                     "diffusion_pytorch_model.safetensors")
        unet, info = UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype,
                                                          local_files_only=True, output_loading_info=True)
        _check_loading_info(sub or "", path, info)
        return unet
    if root is None or not (root / "unet" / "config.json").is_file():
        raise TeacherFolderError(f"{spec}: a UNet weights file needs the teacher folder's unet/config.json "
                                 "for the architecture")
    config = UNet2DConditionModel.load_config(str(root), subfolder="unet")
    sd = read_state_dict(path)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights()
    except ImportError:  # pragma: no cover - accelerate comes with diffusers' extras here
        ctx = contextlib.nullcontext()
    with ctx:
        unet = UNet2DConditionModel.from_config(config)
    sd = extract_unet_state_dict(sd, set(unet.state_dict()), where=spec)
    try:
        result = unet.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise TeacherFolderError(f"{spec}: UNet weights do not fit {root / 'unet' / 'config.json'}: "
                                 f"{str(e).splitlines()[-1].strip()[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise TeacherFolderError(f"{spec}: UNet weights do not fit {root / 'unet' / 'config.json'}: missing "
                                 f"{result.missing_keys[:3]} ({len(result.missing_keys)}), unexpected "
                                 f"{result.unexpected_keys[:3]} ({len(result.unexpected_keys)})")
    return unet if unet.dtype == dtype else unet.to(dtype)


def load_teacher(cfg: TeacherConfig, cache_dir: str | os.PathLike | None = None) -> Zero123PlusTeacher:
    """The teacher from ``cfg.pretrained`` (a local folder or ``s3://`` prefix in the
    ``sudo-ai/zero123plus-v1.2`` layout), with ``cfg.unet`` replacing the UNet when set."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    if cfg.pretrained in ("", TINY):
        raise ValueError(f"TeacherConfig.pretrained is {cfg.pretrained!r}: use build_tiny_teacher(cfg) or make_teacher(cfg)")
    cache_dir = cache_dir or cfg.cache_dir or None
    root = _local_copy(cfg.pretrained, cache_dir)
    if not root.is_dir():
        raise TeacherFolderError(f"{cfg.pretrained}: expected a folder in the zero123plus layout, got a file")
    missing = _missing_files(root, skip_unet_weights=bool(cfg.unet))
    if missing:
        raise TeacherFolderError(f"{cfg.pretrained}: incomplete Zero123++ folder (sudo-ai/zero123plus-v1.2 layout); "
                                 "missing: " + "; ".join(missing))
    index = _read_json(root / "model_index.json")
    ramp = index.get("ramping_coefficients")
    if not isinstance(ramp, list) or not ramp:
        raise TeacherFolderError(f"{root / 'model_index.json'}: no 'ramping_coefficients' list (Zero123++ stores "
                                 "one coefficient per text token there)")
    dtype = getattr(torch, cfg.dtype)
    src = str(root)
    common = {"local_files_only": True, "output_loading_info": True}
    vae, info = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **common)
    _check_loading_info("vae", root, info)
    if cfg.unet:
        unet = load_unet_override(cfg.unet, root, dtype, cache_dir)
    else:
        unet, info = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **common)
        _check_loading_info("unet", root, info)
    text_encoder, info = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **common)
    _check_loading_info("text_encoder", root, info)
    vision_encoder, info = CLIPVisionModelWithProjection.from_pretrained(src, subfolder="vision_encoder",
                                                                         dtype=dtype, **common)
    _check_loading_info("vision_encoder", root, info)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", local_files_only=True)
    scheduler = EulerAncestralDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
    sc = scheduler.config
    if (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps) != ("linear", 0.00085, 0.012, 1000):
        log.warning("teacher scheduler differs from Zero123++'s (linear 0.00085-0.012, 1000 steps): %s", dict(sc))
    clip_pre = ImagePreprocess.from_config(_read_json(root / "feature_extractor_clip" / "preprocessor_config.json"),
                                           str(root / "feature_extractor_clip"))
    vae_cfg = _read_json(root / "feature_extractor_vae" / "preprocessor_config.json")
    vae_pre = ImagePreprocess.from_config(vae_cfg, str(root / "feature_extractor_vae"))
    if vae_pre.crop != (cfg.cond_size, cfg.cond_size):
        log.info("teacher: condition images enter the VAE at %dpx (config cond_size) instead of the folder's %s",
                 cfg.cond_size, vae_pre.crop)
    vae_pre = replace(vae_pre, size=cfg.cond_size, crop=(cfg.cond_size, cfg.cond_size))  # its stats and filter
    text_encoder.eval()
    text_states = encode_empty_prompt(text_encoder, tokenizer)
    if len(ramp) != text_states.shape[1]:
        raise TeacherFolderError(f"{root / 'model_index.json'}: {len(ramp)} ramping coefficients for "
                                 f"{text_states.shape[1]} text tokens")
    keep = cfg.keep_text_encoder
    return Zero123PlusTeacher(cfg=cfg, unet=unet, vae=vae, scheduler=scheduler, vision_encoder=vision_encoder,
                              text_states=text_states, ramping_coefficients=ramp, clip_preprocess=clip_pre,
                              vae_preprocess=vae_pre, text_encoder=text_encoder if keep else None,
                              tokenizer=tokenizer if keep else None, source=cfg.pretrained, source_dir=str(root))


# ================================================================================================
# Saving in the upstream layout
# ================================================================================================
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _save_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _save_diffusers(model, folder: Path, dtype: torch.dtype | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    dtype = dtype or _model_dtype(model)
    _save_tensors({k: v.to(dtype) for k, v in model.state_dict().items()},
                  folder / "diffusion_pytorch_model.safetensors")


def _save_transformers(model, folder: Path, dtype: torch.dtype | None, key_prefix: str) -> None:
    """config.json + model.safetensors with transformers-4.x key names (``text_model.…``,
    ``vision_model.…``), as the published folder has them (transformers 5 reads both)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or _model_dtype(model)
    config = model.config.to_dict()
    config.pop("dtype", None)
    config["torch_dtype"] = _dtype_name(dtype)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sd = {}
    for k, v in model.state_dict().items():
        name = k if k.startswith(key_prefix) or k.startswith("visual_projection.") else key_prefix + k
        sd[name] = v.to(dtype) if v.is_floating_point() else v
    _save_tensors(sd, folder / "model.safetensors")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (transformers 5) and the upstream vocab.json/merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special = tiny_tokenizer_files()["special_tokens_map.json"]
    special["pad_token"] = tokenizer.pad_token
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _write_folder(teacher: Zero123PlusTeacher, root: Path, dtypes: str) -> None:
    import diffusers

    half = torch.float16 if dtypes == "upstream" else None
    unet_dtype = torch.float32 if dtypes == "upstream" else None
    _save_diffusers(teacher.vae, root / "vae", half)
    _save_diffusers(teacher.unet, root / "unet", unet_dtype)
    _save_transformers(teacher.vision_encoder, root / "vision_encoder", half, "vision_model.")
    if teacher.text_encoder is not None and teacher.tokenizer is not None:
        _save_transformers(teacher.text_encoder, root / "text_encoder", half, "text_model.")
        _save_tokenizer(teacher.tokenizer, root / "tokenizer")
    elif teacher.source_dir and (Path(teacher.source_dir) / "text_encoder").is_dir():
        for sub in ("text_encoder", "tokenizer"):
            shutil.copytree(Path(teacher.source_dir) / sub, root / sub)
    else:
        raise RuntimeError("save_teacher: the text encoder is not in memory and the source folder is unknown "
                           "(load with keep_text_encoder=True)")
    sched = {"_class_name": type(teacher.scheduler).__name__, "_diffusers_version": diffusers.__version__}
    sched.update({k: v for k, v in dict(teacher.scheduler.config).items() if not k.startswith("_")})
    sched.update(UPSTREAM_SCHEDULER_EXTRAS)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
    for sub, pre, scalar in (("feature_extractor_clip", teacher.clip_preprocess, False),
                             ("feature_extractor_vae", teacher.vae_preprocess, True)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "preprocessor_config.json").write_text(json.dumps(pre.to_config(scalar), indent=2) + "\n")
    index: dict[str, Any] = {"_class_name": "Zero123PlusPipeline", "_diffusers_version": diffusers.__version__,
                             "_name_or_path": teacher.source or "geco/tiny-zero123plus"}
    index.update({k: list(v) for k, v in COMPONENTS.items()})
    index["ramping_coefficients"] = [float(x) for x in teacher.ramp.tolist()]
    index["safety_checker"] = [None, None]
    # model_index.json last: its presence marks a whole folder
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def save_teacher(teacher: Zero123PlusTeacher, dest: str | os.PathLike,
                 dtypes: Literal["keep", "upstream"] = "keep") -> str:
    """Write ``teacher`` as a folder in the published Zero123++ layout (safetensors) at a local path or
    ``s3://`` prefix. ``dtypes="keep"`` stores each component in its in-memory dtype (lossless
    checkpoints); ``"upstream"`` stores VAE/text/vision encoders float16 and the UNet float32, as the
    published folder does. Locally the folder appears whole (written beside it, then renamed); on
    S3 ``model_index.json`` is uploaded last."""
    return storage.write_folder(str(dest), lambda root: _write_folder(teacher, root, dtypes),
                                marker="model_index.json", what="teacher folder")
