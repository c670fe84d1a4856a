"""One-step generator G: a copy of the teacher's UNet that maps pure noise to clean 6-view latents.

GECO's generator (PAPER.md "Pipeline" 2, UPSTREAM.md "How GECO joins them"):

* **Weights**: its own ``UNet2DConditionModel``, initialised as a copy of the teacher's
  (:meth:`OneStepGenerator.from_teacher`) and then trained (stage 1 VSD, stage 2 3D consistency).
  The VAE, the CLIP vision encoder and the empty prompt's text states are the teacher's, shared **by
  reference**: they are frozen and are *not* parameters of the generator (its ``state_dict`` holds
  the UNet alone, and an optimiser over ``generator.parameters()`` trains the UNet only).
* **One evaluation**: ``x_in = z * sigma_t*`` (``scale_input_by_sigma``; else ``x_in = z``) at the
  fixed timestep ``t*`` (default 950), conditioned like the teacher with guidance 1 (the conditional
  half only), the reference pass attending to the **clean** condition latent (condition timestep 0).
  The v-prediction becomes x0 through the exact identity on what the UNet saw::

      x0 = alpha_t* * x_in - sigma_t* * v,   alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)

  with ``abar`` the teacher's DDPM schedule (linear betas 0.00085-0.012, 1000 steps): at t* = 950,
  alpha = 0.0531, sigma = 0.9986 (:data:`ALPHA_950`, :data:`SIGMA_950`; asserted in the tests).
  One generator call = one UNet evaluation on the sample plus its reference pass (two UNet
  ``forward`` calls), whatever the batch size.
* **Seeds**: :meth:`OneStepGenerator.generate` draws every random number (the condition latent's
  posterior sample and the noise ``z``) from one ``torch.Generator`` (or an int seed, turned into a
  CPU generator so a seed means the same on CPU and GPU): same seed -> same output.

Checkpoints: :func:`save_generator` writes ``<dest>/unet/`` with diffusers ``save_pretrained``
(``config.json`` + ``diffusion_pytorch_model.safetensors``) and ``<dest>/generator.json`` (t*, the
input scaling); :func:`load_generator` reads it (local or ``s3://``), refusing a UNet whose
architecture does not fit the teacher.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from geco import storage
from geco.config import GeneratorConfig
from geco.models.teacher import (
    CLEAN_REFERENCE,
    Condition,
    Zero123PlusTeacher,
    _randn,
    install_reference_attention,
    views_from_grid,
)

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)

__all__ = [
    "ALPHA_950",
    "SIGMA_950",
    "GeneratorLoadError",
    "OneStepGenerator",
    "load_generator",
    "make_generator",
    "generator_config_from_checkpoint",
    "save_generator",
    "torch_generator",
]

# The DDPM linear-beta schedule (0.00085-0.012, 1000 steps) at t = 950.
ALPHA_950 = 0.05306  # sqrt(abar_950)
SIGMA_950 = 0.99859  # sqrt(1 - abar_950)

GENERATOR_META = "generator.json"
FORMAT_NAME = "geco-one-step-generator"
FORMAT_VERSION = 1


class GeneratorLoadError(FileNotFoundError):
    """A generator checkpoint is missing files or does not fit the teacher."""


def torch_generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    """An int seed -> a CPU ``torch.Generator`` seeded with it (the same numbers on any device);
    a generator or ``None`` passes through."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator("cpu").manual_seed(int(seed))


class OneStepGenerator(nn.Module):
    """G(cond, z) -> x0 grid latents in one UNet evaluation (see the module docstring).

    Only ``unet`` is a registered submodule; ``teacher`` is a plain reference (its VAE and encoders
    are used frozen, and moving the generator with ``.to()`` moves the UNet only: move the teacher
    yourself, e.g. through :class:`geco.models.bundle.Bundle.to`)."""

    def __init__(self, teacher: Zero123PlusTeacher, unet: "UNet2DConditionModel", cfg: GeneratorConfig | None = None):
        super().__init__()
        cfg = cfg or GeneratorConfig()
        t_cross = teacher.text_states.shape[-1]
        if unet.config.cross_attention_dim != t_cross or unet.config.in_channels != teacher.latent_channels:
            raise GeneratorLoadError(
                f"generator UNet (in_channels={unet.config.in_channels}, cross_attention_dim="
                f"{unet.config.cross_attention_dim}) does not fit the teacher (in_channels="
                f"{teacher.latent_channels}, cross_attention_dim={t_cross})")
        if not 0 < cfg.timestep < teacher.num_train_timesteps:
            raise ValueError(f"generator timestep {cfg.timestep} outside the teacher's schedule "
                             f"[1, {teacher.num_train_timesteps - 1}]")
        self.cfg = cfg
        self.unet = unet
        object.__setattr__(self, "_teacher", teacher)  # a reference, not a submodule
        install_reference_attention(unet)

    @classmethod
    def from_teacher(cls, teacher: Zero123PlusTeacher, cfg: GeneratorConfig | None = None) -> "OneStepGenerator":
        """A generator whose UNet is a deep copy of the teacher's (GECO's initialisation)."""
        if not isinstance(teacher.unet, nn.Module) or not list(teacher.unet.parameters()):
            raise ValueError("this teacher has no UNet weights (loaded from an inference bundle): a generator "
                             "cannot be initialised from it; load the bundle's generator instead")
        unet = copy.deepcopy(teacher.unet)
        unet.requires_grad_(True)
        return cls(teacher, unet, cfg)

    def __deepcopy__(self, memo):
        """A copy of the UNet that still shares the teacher (e.g. an EMA copy of the generator)."""
        memo.setdefault(id(self._teacher), self._teacher)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    # -- properties ----------------------------------------------------------------------------
    @property
    def teacher(self) -> Zero123PlusTeacher:
        return self._teacher

    @property
    def timestep(self) -> int:
        return int(self.cfg.timestep)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def alpha_sigma(self) -> tuple[float, float]:
        """(alpha_t*, sigma_t*) from the teacher's schedule."""
        abar = float(self.teacher.alphas_cumprod[self.timestep])
        return abar ** 0.5, (1.0 - abar) ** 0.5

    # -- the generator -------------------------------------------------------------------------
    def model_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the UNet sees: ``z * sigma_t*`` (``scale_input_by_sigma``) or ``z``."""
        if not self.cfg.scale_input_by_sigma:
            return z
        _, sigma = self.teacher.alpha_sigma(self.timestep, z)
        return z * sigma

    def forward(self, cond: Condition, z: torch.Tensor) -> torch.Tensor:
        """x0 grid latents [B, 4, h, w] (the teacher's scaled latent space) from noise ``z`` [B, 4, h, w].

        Differentiable in the UNet's parameters (training calls it with gradients on). A batch-1
        ``cond`` is broadcast to ``z``'s batch."""
        expected = tuple(self.teacher.latent_shape(1)[1:])
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"noise must be [B, {', '.join(map(str, expected))}], got {tuple(z.shape)}")
        t = self.timestep
        x_in = self.model_input(z.to(self.teacher.device, torch.float32))
        cond = cond.expand(x_in.shape[0]).to(self.teacher.device)
        # condition timestep 0: the clean reference latent; its noise is multiplied by 0, so pass
        # zeros rather than drawing (and consuming) random numbers
        v = self.teacher.predict_v(x_in, t, cond, cond_timestep=CLEAN_REFERENCE, guidance_scale=1.0,
                                   cond_noise=torch.zeros_like(cond.cond_lat), unet=self.unet)
        return self.teacher.v_to_x0(x_in, t, v.float())

    def sample_noise(self, batch: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
        return _randn(self.teacher.latent_shape(batch), torch_generator(generator), self.teacher.device)

    @torch.no_grad()
    def generate(self, cond_rgb: torch.Tensor | Condition, generator: torch.Generator | int | None = None,
                 z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition images in [0, 1] [B, 3, H, W] (background composited) or an encoded
        :class:`Condition` -> (x0 latents [B, 4, h, w], views [B, 6, 3, tile, tile] in [0, 1]).

        ``generator``: a ``torch.Generator`` or an int seed; it draws the condition latent's posterior
        sample, then ``z`` (unless given). One UNet evaluation (+ its reference pass) per call."""
        gen = torch_generator(generator)
        if isinstance(cond_rgb, Condition):
            cond = cond_rgb
        else:
            if cond_rgb.ndim == 3:
                cond_rgb = cond_rgb[None]
            cond = self.teacher.encode_condition(cond_rgb, generator=gen)
        b = cond.batch_size if z is None else z.shape[0]
        if z is None:
            z = self.sample_noise(b, gen)
        latents = self(cond, z)
        views = views_from_grid(self.teacher.decode_latents(latents), self.teacher.tile_size)
        return latents, views


# ================================================================================================
# Checkpoints
# ================================================================================================
def _write_generator(gen: OneStepGenerator, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    gen.unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "timestep": gen.timestep,
            "scale_input_by_sigma": bool(gen.cfg.scale_input_by_sigma), "dtype": str(gen.dtype).replace("torch.", "")}
    (root / GENERATOR_META).write_text(json.dumps(meta, indent=2) + "\n")


def save_generator(gen: OneStepGenerator, dest: str | os.PathLike) -> str:
    """Write ``<dest>/unet/`` (diffusers ``save_pretrained``, safetensors) and ``<dest>/generator.json``
    to a local folder or an ``s3://`` prefix. Locally the folder appears whole (written beside it,
    then renamed); on S3 ``generator.json`` is uploaded last."""
    return storage.write_folder(str(dest), lambda root: _write_generator(gen, root), marker=GENERATOR_META,
                                what="generator checkpoint")


def _unet_folder(root: Path, where: str) -> Path:
    for cand in (root / "unet", root):
        if (cand / "config.json").is_file():
            if not any((cand / n).is_file() for n in ("diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.safetensors.index.json")):
                raise GeneratorLoadError(f"{where}: {cand.name}/config.json has no "
                                         "diffusion_pytorch_model.safetensors beside it")
            return cand
    raise GeneratorLoadError(f"{where}: not a generator checkpoint; expected unet/config.json + "
                             "unet/diffusion_pytorch_model.safetensors (+ generator.json), as save_generator writes")


def generator_config_from_checkpoint(cfg: GeneratorConfig, root: str | os.PathLike) -> GeneratorConfig:
    """``cfg`` with t* and the input scaling taken from ``<root>/generator.json`` when present (the
    weights were trained for them; a differing config value is overridden with a warning)."""
    meta_path = Path(root) / GENERATOR_META
    if not meta_path.is_file():
        return cfg
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GeneratorLoadError(f"{meta_path}: cannot read ({e})") from None
    saved = {"timestep": int(meta.get("timestep", cfg.timestep)),
             "scale_input_by_sigma": bool(meta.get("scale_input_by_sigma", cfg.scale_input_by_sigma))}
    differs = {k: v for k, v in saved.items() if getattr(cfg, k) != v}
    if differs:
        log.warning("generator %s was saved with %s; using the checkpoint's values over the config's",
                    root, differs)
    return cfg.model_copy(update=saved)


def load_generator(cfg: GeneratorConfig, teacher: Zero123PlusTeacher,
                   cache_dir: str | os.PathLike | None = None) -> OneStepGenerator:
    """The generator stored at ``cfg.pretrained`` (local folder or ``s3://`` prefix written by
    :func:`save_generator`, or a bare diffusers UNet folder), on the teacher's device and dtype.

    t* and the input scaling come from the checkpoint's ``generator.json`` when it has one (the
    weights were trained for them; a different value in ``cfg`` is overridden with a warning)."""
    from diffusers import UNet2DConditionModel

    if not cfg.pretrained:
        raise ValueError("GeneratorConfig.pretrained is empty: use OneStepGenerator.from_teacher or make_generator")
    try:
        root = storage.local_copy(cfg.pretrained, cache_dir)
    except FileNotFoundError as e:
        raise GeneratorLoadError(f"generator checkpoint: {e}") from None
    folder = _unet_folder(root, cfg.pretrained)
    cfg = generator_config_from_checkpoint(cfg, root)
    dtype = getattr(torch, teacher.cfg.dtype)
    unet, info = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                      output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise GeneratorLoadError(f"{folder}: weights do not match config.json (missing {missing[:3]}, "
                                 f"mismatched {mismatched[:3]})")
    return OneStepGenerator(teacher, unet.to(teacher.device), cfg)


def make_generator(cfg: GeneratorConfig, teacher: Zero123PlusTeacher) -> OneStepGenerator:
    """A trained generator when ``cfg.pretrained`` is set, else a fresh copy of the teacher's UNet."""
    return load_generator(cfg, teacher) if cfg.pretrained else OneStepGenerator.from_teacher(teacher, cfg)
