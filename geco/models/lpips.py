"""LPIPS v0.1 (Zhang et al. 2018) in plain torch: AlexNet and VGG16 trunks, our own code.

Why our own: the ``lpips`` and torchmetrics implementations build their trunks with torchvision,
which does not import here. This module builds the same trunks with **torchvision's parameter
names**, so torchvision's ImageNet files load as they are:

    AlexNet  ``alexnet-owt-7be5be79.pth``  features.{0,3,6,8,10}.{weight,bias}
    VGG16    ``vgg16-397923af.pth``        features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}

(``classifier.*`` keys are ignored), and the LPIPS v0.1 linear layers load from the lpips
package's ``weights/v0.1/{alex,vgg}.pth`` (keys ``lin{0..4}.model.1.weight``, shape [1, C, 1, 1]).

The distance, as in the reference implementation:
    x in [-1, 1] -> (x - shift) / scale, shift = (-.030, -.088, -.188), scale = (.458, .448, .450)
    trunk activations at 5 taps (AlexNet relu1..relu5 = outputs of features[1, 4, 7, 9, 11];
    VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = outputs of features[3, 8, 15, 22, 29])
    each tap unit-normalised over channels: f / (sqrt(sum_c f^2) + 1e-10)
    d = sum_k mean_hw( lin_k((f0_k - f1_k)^2) ), lin_k a bias-free 1x1 conv C_k -> 1.

Weights (see :func:`load_lpips`) come from a local path, an ``s3://`` URI, a ``file://`` or
``http(s)://`` URL, the torch hub cache (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``)
or, for the linear layers, an installed ``lpips`` package's own files (found without importing
it). ``.safetensors`` copies (e.g. made by ``geco weights import``) load too. When they cannot be
loaded, nothing stands in: :func:`load_lpips` raises :class:`LPIPSUnavailable` with every place it
looked, :class:`LPIPSLoss` switches its term off with a logged warning, and :class:`LPIPSMetric`
reports "unavailable" (``None``) with the reason.

The model is frozen: eval mode always (``.train()`` is a no-op), no parameter requires grad, but
the distance is differentiable with respect to both inputs.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from geco import storage

log = logging.getLogger(__name__)

Net = Literal["alex", "vgg"]

# -- architecture (torchvision's layer lists) --------------------------------------------------
# ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride)
_ALEX_LAYERS: tuple[tuple, ...] = (
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
    ("pool", 3, 2),
)


def _vgg_layers(cfg: tuple) -> tuple[tuple, ...]:
    out: list[tuple] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            out.append(("pool", 2, 2))
        else:
            out += [("conv", c_in, v, 3, 1, 1), ("relu",)]
            c_in = v
    return tuple(out)


_VGG16_LAYERS = _vgg_layers((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                             512, 512, 512, "M"))

# index of the layer whose output is each LPIPS tap; channels of each tap
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

# torchvision's published files (the 8 hex digits are the start of the file's sha256)
TORCHVISION_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}
# older torchvision name for the same AlexNet weights
_ALT_BACKBONE_NAMES = {"alex": ("alexnet-owt-4df8aa71.pth",), "vgg": ()}
LINEAR_URLS = {
    net: f"https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{net}.pth"
    for net in ("alex", "vgg")
}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class LPIPSUnavailable(RuntimeError):
    """LPIPS weights could not be loaded; the message says what was tried."""


class LPIPSUnavailableWarning(UserWarning):
    """Emitted once when a disabled LPIPS loss term is first used."""


def _build(layers: tuple[tuple, ...]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for spec in layers:
        if spec[0] == "conv":
            _, c_in, c_out, k, s, p = spec
            mods.append(nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=p))
        elif spec[0] == "relu":
            mods.append(nn.ReLU(inplace=False))  # taps are kept; in-place would overwrite them
        else:
            mods.append(nn.MaxPool2d(kernel_size=spec[1], stride=spec[2]))
    return nn.Sequential(*mods)


class Backbone(nn.Module):
    """torchvision's ``features`` of AlexNet or VGG16 (same module indices, same key names),
    returning the five LPIPS taps. ``state_dict()`` keys: ``features.<i>.weight|bias``."""

    def __init__(self, net: Net):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        layers = _ALEX_LAYERS if net == "alex" else _VGG16_LAYERS
        taps = _TAPS[net]
        # only the layers up to the last tap run (AlexNet's final max-pool never does)
        self.features = _build(layers)
        self._taps = taps
        self._depth = taps[-1] + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(self._depth):
            x = self.features[i](x)
            if i in self._taps:
                outs.append(x)
        return outs


class _Linear(nn.Module):
    """``model.1`` is the 1x1 conv, as in lpips' NetLinLayer (whose ``model.0`` is a Dropout that
    is inactive at evaluation; it has no parameters, so an Identity keeps the key names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + EPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. ``forward(x, y)`` -> [B] distances (``per_layer=True`` also returns
    the five per-tap terms, each [B]).

    ``input_range``: "[0,1]" (default; mapped to [-1, 1] internally) or "[-1,1]" (used as given,
    like the lpips package with ``normalize=False``). Inputs are [B, 3, H, W] RGB. Built with
    default (random) initialisation: use :func:`load_lpips`, or :meth:`load_backbone` and
    :meth:`load_linear`, to get the real metric.

    ``state_dict()`` keys: ``net.features.<i>.*`` and ``lin<k>.model.1.weight``.
    """

    def __init__(self, net: Net = "vgg", *, input_range: str = "[0,1]"):
        super().__init__()
        if input_range not in ("[0,1]", "[-1,1]"):
            raise ValueError(f"input_range must be '[0,1]' or '[-1,1]', got {input_range!r}")
        self.net_name = net
        self.input_range = input_range
        self.net = Backbone(net)
        for k, c in enumerate(CHANNELS[net]):
            self.add_module(f"lin{k}", _Linear(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.sources: dict[str, str] = {}  # where the loaded weights came from
        self.requires_grad_(False)
        super().train(False)

    # frozen: stays in eval mode whatever a parent module asks
    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    @property
    def lins(self) -> list[_Linear]:
        return [getattr(self, f"lin{k}") for k in range(len(CHANNELS[self.net_name]))]

    # -- loading ---------------------------------------------------------------------------
    def load_backbone(self, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
        """Load a torchvision AlexNet/VGG16 state dict (``features.*``; ``classifier.*`` and other
        keys ignored; a ``net.`` prefix, as in our own state dict, is accepted). Raises
        :class:`LPIPSUnavailable` naming the first missing or mis-shaped key."""
        own = self.net.state_dict()
        sd = {k[4:] if k.startswith("net.") else k: v for k, v in state_dict.items()}
        what = (f"{source or 'backbone state dict'}: not a torchvision "
                f"{'AlexNet' if self.net_name == 'alex' else 'VGG16'} state dict")
        new = {}
        for key, ref in own.items():
            if key not in sd:
                raise LPIPSUnavailable(f"{what} (missing {key!r})")
            t = sd[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
                raise LPIPSUnavailable(f"{what} ({key!r} has shape {tuple(getattr(t, 'shape', ()))}, "
                                       f"expected {tuple(ref.shape)})")
            new[key] = t.to(ref.dtype)
        self.net.load_state_dict(new, strict=True)
        if source:
            self.sources["backbone"] = source

    def load_linear(self, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
        """Load LPIPS linear layers (``lin<k>.model.1.weight``, as in lpips' ``v0.1/<net>.pth``)."""
        for k, lin in enumerate(self.lins):
            key = f"lin{k}.model.1.weight"
            ref = lin.model[1].weight
            t = state_dict.get(key)
            if t is None:
                raise LPIPSUnavailable(f"{source or 'linear state dict'}: not LPIPS linear weights "
                                       f"(missing {key!r})")
            if tuple(t.shape) != tuple(ref.shape):
                raise LPIPSUnavailable(f"{source or 'linear state dict'}: {key!r} has shape "
                                       f"{tuple(t.shape)}, expected {tuple(ref.shape)} — "
                                       f"linear weights for another trunk than {self.net_name!r}?")
            with torch.no_grad():
                ref.copy_(t.to(ref.dtype))
        if source:
            self.sources["linear"] = source

    # -- distance --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, *, per_layer: bool = False,
                input_range: str | None = None):
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants [B, 3, H, W] RGB, got {tuple(x.shape)}")
        rng = input_range or self.input_range
        dtype = self.shift.dtype
        x, y = x.to(dtype), y.to(dtype)
        if rng == "[0,1]":
            x, y = 2 * x - 1, 2 * y - 1
        elif rng != "[-1,1]":
            raise ValueError(f"input_range must be '[0,1]' or '[-1,1]', got {rng!r}")
        b = x.shape[0]
        both = torch.cat([x, y], 0)  # one trunk pass for the pair
        feats = self.net((both - self.shift) / self.scale)
        terms = []
        # the head in float32, outside autocast: sums of squares overflow float16
        with torch.autocast(device_type=both.device.type, enabled=False):
            for f, lin in zip(feats, self.lins):
                f = _unit_normalize(f.float())
                d = (f[:b] - f[b:]) ** 2
                terms.append(F.conv2d(d, lin.model[1].weight.float()).mean(dim=(1, 2, 3)))
        total = torch.stack(terms, 0).sum(0)
        return (total, terms) if per_layer else total


# -- weight discovery ----------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("GECO_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's rules: TORCH_HOME, else XDG_CACHE_HOME/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_dir() -> Path | None:
    """Where an installed ``lpips`` package lives, found without importing it (its import pulls
    in torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from geco.weights import WeightsImportError, read_state_dict

    try:
        return read_state_dict(path)
    except WeightsImportError as e:
        raise LPIPSUnavailable(f"{path}: cannot be read as a plain state dict ({e})") from None


def _download(url: str, target: Path, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``target`` atomically; a torchvision-style name ``*-<8 hex>.pth`` is
    checked against the file's sha256 prefix, as torch.hub does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        stem = target.stem.rsplit("-", 1)
        if len(stem) == 2 and len(stem[1]) == 8 and all(c in "0123456789abcdef" for c in stem[1]):
            if not h.hexdigest().startswith(stem[1]):
                raise LPIPSUnavailable(f"{url}: sha256 {h.hexdigest()[:8]}… does not match the "
                                       f"name's {stem[1]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _fetch(uri: str, cache: Path, allow_download: bool,
           name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """State dict from an explicit local path / s3:// / file:// / http(s):// location (a URL is
    downloaded once into ``cache``, as ``name`` or its own file name; an s3:// object is cached
    under ``cache/s3`` by :func:`geco.storage.local_copy`)."""
    uri = str(uri)
    if storage.is_s3(uri):
        try:
            local = storage.local_copy(uri, cache_dir=cache / "s3")
        except Exception as e:
            raise LPIPSUnavailable(f"{uri}: cannot be read ({type(e).__name__}: {e})") from None
        return _read_state_dict(local), uri
    if "://" in uri:
        target = cache / (name or uri.rstrip("/").rsplit("/", 1)[-1])
        if not target.is_file():
            if not allow_download:
                raise LPIPSUnavailable(f"{uri}: not in the cache {target} and downloads are off")
            try:
                _download(uri, target)
            except LPIPSUnavailable:
                raise
            except Exception as e:
                raise LPIPSUnavailable(f"{uri}: download failed ({type(e).__name__}: {e})") from None
        return _read_state_dict(target), uri
    p = Path(uri).expanduser()
    if not p.is_file():
        raise LPIPSUnavailable(f"{uri}: no such file")
    return _read_state_dict(p), str(p)


def _find(explicit: str, candidates: list[Path], url: str | None, cache: Path,
          allow_download: bool, what: str, name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    if explicit:  # a named source is used or reported, never silently replaced
        return _fetch(explicit, cache, allow_download)
    tried = []
    for c in candidates:
        if c.is_file():
            return _read_state_dict(c), str(c)
        tried.append(str(c))
    if url and allow_download:
        try:
            return _fetch(url, cache, True, name)
        except LPIPSUnavailable as e:
            tried.append(str(e))
    elif url:
        tried.append(f"{url} (downloads off)")
    raise LPIPSUnavailable(f"no {what} found; tried: " + "; ".join(tried))


def backbone_candidates(net: Net, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local files tried, in order, for the trunk when no path is given."""
    names = (TORCHVISION_FILES[net][0],) + _ALT_BACKBONE_NAMES[net]
    dirs = ([Path(cache_dir)] if cache_dir else []) + [hub_checkpoint_dir()]
    out = []
    for d in dirs:
        for n in names:
            out += [d / n, d / (Path(n).stem + ".safetensors")]
    return out


def linear_candidates(net: Net, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local files tried, in order, for the linear layers when no path is given: the cache
    (``lpips-v0.1-<net>.pth|.safetensors``, or an ``lpips/weights/v0.1/<net>.pth`` tree under
    ``cache_dir``), the torch hub cache, then an installed lpips package's own file."""
    out = []
    dirs = ([Path(cache_dir)] if cache_dir else []) + [hub_checkpoint_dir()]
    for d in dirs:
        out += [d / f"lpips-v0.1-{net}.pth", d / f"lpips-v0.1-{net}.safetensors"]
    if cache_dir:
        out.append(Path(cache_dir) / "lpips" / "weights" / "v0.1" / f"{net}.pth")
    pkg = _lpips_package_dir()
    if pkg is not None:
        out.append(pkg / "weights" / "v0.1" / f"{net}.pth")
    return out


def load_lpips(net: Net = "vgg", backbone_weights: str = "", linear_weights: str = "",
               cache_dir: str | os.PathLike | None = None, *, input_range: str = "[0,1]",
               allow_download: bool | None = None, device: str | torch.device | None = None) -> LPIPS:
    """A loaded, frozen :class:`LPIPS`, or :class:`LPIPSUnavailable` saying what was tried.

    ``backbone_weights`` / ``linear_weights``: a local path, ``s3://`` URI or URL of a state dict
    (``.pth``/``.bin`` read with ``weights_only=True``, or ``.safetensors``). Empty: search
    ``cache_dir``, then ``$TORCH_HOME/hub/checkpoints`` for torchvision's file names (and
    ``lpips-v0.1-<net>.pth`` / an installed lpips package for the linear layers), then download
    from the official URL into the cache unless ``allow_download`` is False (default: True unless
    ``GECO_OFFLINE=1``). Downloads go to ``cache_dir`` or the hub cache.
    The keyword names match ``config.LPIPSConfig``: ``load_lpips(**cfg.models.lpips.model_dump())``.
    """
    if net not in _TAPS:
        raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
    if allow_download is None:
        allow_download = not _offline()
    cache = Path(cache_dir) if cache_dir else hub_checkpoint_dir()
    model = LPIPS(net, input_range=input_range)
    bb, bb_src = _find(backbone_weights, backbone_candidates(net, cache_dir), TORCHVISION_FILES[net][1],
                       cache, allow_download, f"{net} backbone weights")
    model.load_backbone(bb, bb_src)
    lin, lin_src = _find(linear_weights, linear_candidates(net, cache_dir), LINEAR_URLS[net],
                         cache, allow_download, f"LPIPS v0.1 {net} linear weights",
                         name=f"lpips-v0.1-{net}.pth")
    model.load_linear(lin, lin_src)
    if device is not None:
        model = model.to(device)
    log.info("LPIPS %s loaded (backbone %s, linear %s)", net, bb_src, lin_src)
    return model


def try_load_lpips(*args, **kwargs) -> tuple[LPIPS | None, str]:
    """``(model, "")`` or ``(None, reason)``; same arguments as :func:`load_lpips`."""
    try:
        return load_lpips(*args, **kwargs), ""
    except LPIPSUnavailable as e:
        return None, str(e)


# -- loss and metric -----------------------------------------------------------------------------
class LPIPSLoss(nn.Module):
    """A training-loss term: ``weight * mean_b LPIPS(pred, target)``.

    Built from a loaded model, or with ``LPIPSLoss.load(...)`` (arguments of :func:`load_lpips`).
    Without weights the term is **off**: ``enabled`` is False, ``reason`` says why, a warning is
    logged when it is built and warned once when first called, and calling it returns a zero
    scalar on the inputs' device. Keep it outside the trained module (its weights are frozen and
    would otherwise land in the checkpoints).
    """

    def __init__(self, model: LPIPS | None, *, weight: float = 1.0, reason: str = ""):
        super().__init__()
        self.model = model
        self.weight = float(weight)
        self.reason = "" if model is not None else (reason or "no LPIPS model given")
        self._warned = False
        if model is None:
            log.warning("LPIPS loss term is OFF: %s", self.reason)

    @classmethod
    def load(cls, *args, weight: float = 1.0, **kwargs) -> "LPIPSLoss":
        model, reason = try_load_lpips(*args, **kwargs)
        return cls(model, weight=weight, reason=reason)

    @property
    def enabled(self) -> bool:
        return self.model is not None and self.weight != 0.0

    def train(self, mode: bool = True) -> "LPIPSLoss":
        self.training = mode  # the frozen model stays in eval mode
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.model is None:
            if not self._warned:
                self._warned = True
                msg = f"LPIPS loss term is off (returns 0): {self.reason}"
                log.warning(msg)
                warnings.warn(msg, LPIPSUnavailableWarning, stacklevel=2)
            return torch.zeros((), device=pred.device, dtype=pred.dtype)
        return self.weight * self.model(pred, target, **kwargs).mean()


class LPIPSMetric:
    """An evaluation metric: ``metric(pred, target)`` -> [B] distances, or ``None`` when LPIPS is
    unavailable (``available`` False, ``reason`` says why; report it as "unavailable")."""

    def __init__(self, model: LPIPS | None, reason: str = ""):
        self.model = model
        self.reason = "" if model is not None else (reason or "no LPIPS model given")

    @classmethod
    def load(cls, *args, **kwargs) -> "LPIPSMetric":
        model, reason = try_load_lpips(*args, **kwargs)
        if model is None:
            log.warning("LPIPS metric unavailable: %s", reason)
        return cls(model, reason)

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor | None:
        if self.model is None:
            return None
        return self.model(pred, target, **kwargs)


@functools.lru_cache(maxsize=4)
def _cached_model(net: str, backbone_weights: str, linear_weights: str, cache_dir: str | None,
                  input_range: str, allow_download: bool | None) -> LPIPS:
    return load_lpips(net, backbone_weights, linear_weights, cache_dir, input_range=input_range,
                      allow_download=allow_download)


def lpips_metric(pred: torch.Tensor, target: torch.Tensor, *, net: Net = "alex",
                 backbone_weights: str = "", linear_weights: str = "", cache_dir: str | None = None,
                 input_range: str = "[0,1]", allow_download: bool | None = None) -> torch.Tensor:
    """One-shot LPIPS distances [B] (no grad; the model is loaded once per argument set).
    Raises :class:`LPIPSUnavailable` with the reason when the weights cannot be loaded."""
    model = _cached_model(net, str(backbone_weights), str(linear_weights),
                          str(cache_dir) if cache_dir else None, input_range, allow_download)
    model = model.to(pred.device)
    with torch.no_grad():
        return model(pred, target)


__all__: list[Any] = [
    "CHANNELS", "LPIPS", "LPIPSLoss", "LPIPSMetric", "LPIPSUnavailable", "LPIPSUnavailableWarning",
    "TORCHVISION_FILES", "Backbone", "backbone_candidates", "hub_checkpoint_dir", "linear_candidates",
    "load_lpips", "lpips_metric", "try_load_lpips",
]
