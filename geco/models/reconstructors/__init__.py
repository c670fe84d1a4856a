"""Reconstructors: multi-view images -> 3D Gaussians, one module per ``models.reconstructor.kind``.

Call sites never name a kind's functions; they go through this registry::

    model = build_reconstructor(cfg)           # random weights, sized by cfg
    model = load_reconstructor(cfg, device)    # cfg.pretrained (local or s3://), or random when empty
    save_reconstructor(model, uri)             # in the kind's own released layout
    K, c2w = input_cameras(cfg, cond_azimuth, size)  # the cameras its six input views are described with,
                                                     # K in pixels of the size-px views it is given

``cfg`` is a :class:`geco.config.ReconstructorConfig`; the model satisfies
:class:`~geco.models.reconstructors.base.Reconstructor`. Adding a kind (e.g. InstantMesh's mesh
reconstructor, the paper's v2): a new module here, a config class for its section in
geco/config.py (``models.reconstructor.<kind>``) and its ``kind`` literal, and one :data:`KINDS` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from geco.models.reconstructors import lgm
from geco.models.reconstructors.base import Reconstructor, ReconstructorLoadError, zero123_input_cameras

__all__ = [
    "KINDS",
    "Reconstructor",
    "ReconstructorKind",
    "ReconstructorLoadError",
    "build_reconstructor",
    "input_cameras",
    "load_reconstructor",
    "save_reconstructor",
    "zero123_input_cameras",
]


@dataclass(frozen=True)
class ReconstructorKind:
    """One kind's entry points (see the module docstring for what each does)."""

    build: Callable[..., Reconstructor]  # (cfg) -> model
    load: Callable[..., Reconstructor]  # (cfg, device=None) -> model
    save: Callable[..., None]  # (model, uri, dtype=torch.float16)
    input_cameras: Callable[..., tuple[Tensor, Tensor]]  # (cfg, cond_azimuth=0.0) -> (K [6,3,3], c2w [6,4,4])


KINDS: dict[str, ReconstructorKind] = {
    "lgm": ReconstructorKind(build=lgm.build, load=lgm.load, save=lgm.save, input_cameras=lgm.input_cameras),
}


def _kind(cfg) -> ReconstructorKind:
    kind = getattr(cfg, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"models.reconstructor.kind={kind!r}: no such reconstructor (known: {', '.join(KINDS)})")
    return KINDS[kind]


def build_reconstructor(cfg) -> Reconstructor:
    """A randomly initialised reconstructor of ``cfg.kind``, sized by ``cfg``, in ``cfg.dtype``."""
    return _kind(cfg).build(cfg)


def load_reconstructor(cfg, device: torch.device | str | None = None) -> Reconstructor:
    """The reconstructor with ``cfg.pretrained``'s weights (eval mode); random when it is empty."""
    return _kind(cfg).load(cfg, device)


def save_reconstructor(model: Reconstructor, uri: str, dtype: torch.dtype | None = torch.float16) -> None:
    """Write ``model``'s weights to ``uri`` (local or s3://) in its kind's layout; ``dtype=None`` keeps them."""
    _kind(model.cfg).save(model, uri, dtype)


def input_cameras(cfg, cond_azimuth: float = 0.0, size: int | None = None) -> tuple[Tensor, Tensor]:
    """K [6,3,3] and c2w [6,4,4] of the input views the kind is told. K is in pixels of the views the
    reconstructor is *given*, ``size`` x ``size`` (default ``cfg.input_size``): it resizes them to its
    input size and scales K with them, so K for views of another size must say that size."""
    K, c2w = _kind(cfg).input_cameras(cfg, cond_azimuth)
    if size is not None and size != cfg.input_size:
        K = K.clone()
        K[:, :2, :] *= size / cfg.input_size
    return K, c2w
