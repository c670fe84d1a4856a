"""Resumable training checkpoints: one folder of safetensors + JSON files, never pickle.

Layout (everything a run needs to continue exactly where it stopped)::

    <dir>/checkpoint.json                 format, step, data position, config hash, the names of
                                          every part below, the extra state, creation time
    <dir>/models/<name>.safetensors       each model's state dict (safetensors.torch.save_model:
                                          tied weights are stored once)
    <dir>/optimizers/<name>.json          an optimiser's state dict with every tensor replaced by a
    <dir>/optimizers/<name>.safetensors   reference into the .safetensors file beside it
    <dir>/schedulers/<name>.json          an LR scheduler's state dict (same encoding)
    <dir>/rng/rank_<r>.json               RNG states of rank r: python ``random``, numpy, torch CPU
    <dir>/rng/rank_<r>.safetensors        and every CUDA device

``checkpoint.json`` is written last: a folder without it is not a checkpoint. State dicts are
encoded by :func:`encode_state` - tensors go to safetensors, everything else to JSON, with tuples,
non-string dict keys (optimiser state is keyed by int) and numpy arrays tagged so that
:func:`decode_state` rebuilds exactly what was saved. Anything else (an arbitrary object) is
refused with a ``TypeError``: a checkpoint can always be loaded without running code.

Distributed runs: rank 0 writes the models, optimisers and schedulers; every rank writes its own
RNG file (:func:`save_rng_state`); Ray Train merges the ranks' folders into one.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "geco-train-checkpoint"
VERSION = 1
META = "checkpoint.json"

# JSON tags of encode_state (a dict holding one of these keys is itself tagged, see _needs_items)
_TENSOR, _TUPLE, _ITEMS, _NDARRAY, _FLOAT = "__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__"
_TAGS = {_TENSOR, _TUPLE, _ITEMS, _NDARRAY, _FLOAT}


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, of another format, or does not fit what loads it."""


@dataclass
class DataPosition:
    """Where the data stream stood: ``samples`` rows of epoch ``epoch`` consumed (per worker)."""

    epoch: int = 0
    samples: int = 0

    def advance(self, n: int) -> None:
        self.samples += n

    def next_epoch(self) -> None:
        self.epoch += 1
        self.samples = 0


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` returns besides the objects it loaded in place."""

    step: int
    data_position: DataPosition
    config_hash: str
    extra: dict = field(default_factory=dict)
    created: str = ""
    rng_restored: bool = False


# ---------------------------------------------------------------------------------------------
# state dicts <-> (JSON, tensors)
# ---------------------------------------------------------------------------------------------
def _needs_items(d: Mapping) -> bool:
    return any(not isinstance(k, str) for k in d) or any(k in _TAGS for k in d)


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able copy of ``obj`` with each tensor moved into ``tensors`` (key = its path)."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{prefix}: numpy object arrays cannot be stored without pickle")
        return {_NDARRAY: obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, prefix)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if _needs_items(obj):
            return {_ITEMS: [[encode_state(k, tensors, f"{prefix}.k{i}"), encode_state(v, tensors, f"{prefix}.{k}")]
                             for i, (k, v) in enumerate(obj.items())]}
        return {k: encode_state(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
    raise TypeError(f"{prefix or 'state'}: cannot store a {type(obj).__name__} without pickle "
                    "(only tensors, numbers, strings, lists, tuples, dicts and numpy arrays)")


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(decode_state(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in obj[_ITEMS]}
        if _NDARRAY in obj:
            return np.asarray(obj[_NDARRAY], dtype=obj["dtype"]).reshape(obj["shape"])
        if _FLOAT in obj:
            return float(obj[_FLOAT])
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def save_state(state: Any, folder: str | Path, stem: str) -> None:
    """``<stem>.json`` (+ ``<stem>.safetensors`` when there are tensors) in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps({"state": encoded, "tensors": bool(tensors)}))


def load_state(folder: str | Path, stem: str, device: str | torch.device = "cpu") -> Any:
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / f"{stem}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    doc = json.loads(path.read_text())
    tensors = load_file(str(folder / f"{stem}.safetensors"), device=str(device)) if doc.get("tensors") else {}
    return decode_state(doc["state"], tensors)


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global RNG states: python ``random``, numpy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda])
        else:
            log.warning("checkpoint holds %d CUDA RNG states, this process sees %d devices: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())


def save_rng_state(directory: str | Path, rank: int = 0) -> None:
    """This process's RNG states as ``rng/rank_<rank>.*`` (each rank of a distributed run)."""
    save_state(rng_state(), Path(directory) / "rng", f"rank_{rank}")


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP-style wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _check_name(kind: str, name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{kind} name {name!r}: must be a plain file name")


def save_checkpoint(directory: str | Path, *, step: int, models: Mapping[str, nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    schedulers: Mapping[str, Any] | None = None,
                    data_position: DataPosition | None = None, config_hash: str = "",
                    extra: Mapping[str, Any] | None = None, rank: int = 0) -> Path:
    """Write a resumable checkpoint into ``directory`` (created; should be empty) and return it.

    ``models`` are saved unwrapped (``DDP.module``); ``schedulers`` are anything with
    ``state_dict()`` (LR schedulers, GradScaler); ``extra`` is JSON-able state of the task
    (tensors allowed). The RNG states are this process's, stored as rank ``rank``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    optimizers, schedulers = dict(optimizers or {}), dict(schedulers or {})
    for kind, names in (("model", models), ("optimizer", optimizers), ("scheduler", schedulers)):
        for n in names:
            _check_name(kind, n)
    (directory / "models").mkdir(exist_ok=True)
    for name, model in models.items():
        save_model(_unwrap(model), str(directory / "models" / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        save_state(opt.state_dict(), directory / "optimizers", name)
    for name, sched in schedulers.items():
        save_state(sched.state_dict(), directory / "schedulers", name)
    save_rng_state(directory, rank)
    extra_tensors: dict[str, torch.Tensor] = {}
    extra_json = encode_state(dict(extra or {}), extra_tensors, "extra")
    if extra_tensors:
        save_state(dict(extra or {}), directory, "extra")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "data_position": asdict(data_position or DataPosition()),
        "config_hash": config_hash,
        "models": sorted(models),
        "optimizers": sorted(optimizers),
        "schedulers": sorted(schedulers),
        "extra": None if extra_tensors else extra_json,
        "extra_file": bool(extra_tensors),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (directory / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")  # last: marks it whole
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {META}; an interrupted save?)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: version {meta['version']} is newer than this code reads ({VERSION})")
    return meta


def load_checkpoint(directory: str | Path, *, models: Mapping[str, nn.Module] | None = None,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    schedulers: Mapping[str, Any] | None = None, config_hash: str | None = None,
                    restore_rng: bool = True, rank: int = 0, strict: bool = True,
                    device: str | torch.device | None = None) -> CheckpointState:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects, in place.

    Every model / optimiser / scheduler passed must be in the checkpoint (and, with ``strict``, every
    one in the checkpoint must be passed). ``config_hash``, when given, must match the stored one
    (a different architecture or task would load wrong weights). The RNG states of ``rank`` are
    restored when present (``rng_restored`` says whether they were). Models load onto the device
    of their parameters (or ``device``)."""
    from safetensors.torch import load_model

    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise CheckpointError(f"{directory}: written for config hash {meta.get('config_hash')!r}, this run has "
                              f"{config_hash!r} (different models or task); start a new run instead of resuming")
    models, optimizers, schedulers = dict(models or {}), dict(optimizers or {}), dict(schedulers or {})
    for kind, given, stored in (("model", models, meta["models"]), ("optimizer", optimizers, meta["optimizers"]),
                                ("scheduler", schedulers, meta["schedulers"])):
        missing = sorted(set(given) - set(stored))
        if missing:
            raise CheckpointError(f"{directory}: no {kind} state for {missing} (it has {stored})")
        if strict and set(stored) - set(given):
            raise CheckpointError(f"{directory}: {kind} state for {sorted(set(stored) - set(given))} was not loaded "
                                  "(pass them, or strict=False)")
    for name, model in models.items():
        inner = _unwrap(model)
        dev = device or next((p.device for p in inner.parameters()), torch.device("cpu"))
        try:
            missing, unexpected = load_model(inner, str(directory / "models" / f"{name}.safetensors"),
                                             strict=False, device=str(dev))
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"{directory}: model {name!r} does not fit the checkpoint: "
                                  f"{str(e).strip().splitlines()[-1][:300]}") from None
        if missing or unexpected:
            raise CheckpointError(f"{directory}: model {name!r} does not fit the checkpoint: missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, opt in optimizers.items():
        opt.load_state_dict(load_state(directory / "optimizers", name))
    for name, sched in schedulers.items():
        sched.load_state_dict(load_state(directory / "schedulers", name))
    rng_ok = False
    if restore_rng:
        rng_dir = directory / "rng"
        if (rng_dir / f"rank_{rank}.json").is_file():
            set_rng_state(load_state(rng_dir, f"rank_{rank}"))
            rng_ok = True
        else:
            log.warning("%s: no RNG state for rank %d (the world size changed?); RNG not restored", directory, rank)
    if meta.get("extra_file"):
        extra = load_state(directory, "extra")
    else:
        extra = decode_state(meta.get("extra") or {}, {})
    return CheckpointState(step=int(meta["step"]), data_position=DataPosition(**meta.get("data_position", {})),
                           config_hash=meta.get("config_hash", ""), extra=extra, created=meta.get("created", ""),
                           rng_restored=rng_ok)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Every file of a checkpoint folder (for audits: only .json and .safetensors are expected)."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file())
