"""The per-step training pattern, and the interface a training stage implements.

One optimiser step, as in the diffusers training examples::

    stepper = GradientStep(params, optimizer, scheduler, accumulation=job.grad_accumulation,
                           max_grad_norm=job.max_grad_norm)
    for i, micro in enumerate(micro_batches):            # job.grad_accumulation of them
        with stepper.no_sync(ddp_model, i), autocast(ctx.device, job.mixed_precision):
            loss = ddp_model(micro)["loss"]
        stepper.backward(loss)                           # scaled by 1 / accumulation; DDP syncs
    stats = stepper.step()                               # on the last micro-batch only
    # clip, optimizer.step, scheduler.step, zero_grad -> {"grad_norm", "lr"}

(``backward`` must run inside ``no_sync`` for DDP to skip the all-reduce; :meth:`GradientStep.micro`
bundles both contexts.) bf16 autocast is used on CUDA only: CPU runs in float32 (autocast on CPU
is slow and changes numerics for nothing at test sizes). bf16 needs no loss scaling.

:class:`TrainTask` is what a stage writes (the models, one optimiser step, evaluation, export);
``pipelines/training/`` runs any task under Ray Train - data, checkpoints, resumption, MLflow -
so stage 1 and stage 2 reuse it by writing a task. A task's inputs from earlier stages (weights'
URIs, by name) arrive explicitly as ``inputs``; the config says how to train, never where an
earlier stage put its outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
from torch import nn

Schedule = Literal["constant", "cosine", "linear"]


# ---------------------------------------------------------------------------------------------
# learning-rate schedule
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, *, schedule: Schedule, warmup_steps: int, total_steps: int,
              min_ratio: float = 0.0) -> float:
    """The LR multiplier after ``step`` optimiser steps: linear warmup from 1/warmup to 1 over
    ``warmup_steps``, then constant, cosine or linear decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown LR schedule {schedule!r} (constant, cosine, linear)")
    return min_ratio + (1.0 - min_ratio) * decay


def make_lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: Schedule = "cosine", warmup_steps: int = 0,
                      total_steps: int = 1, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`. Its state dict holds plain numbers only (the
    lambda is a closure, which LambdaLR leaves out), so it checkpoints as JSON; the schedule
    itself comes from the config, so a resumed run may extend ``total_steps``."""
    def factor(step: int) -> float:
        return lr_factor(step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
def autocast(device: torch.device | str, mixed_precision: str = "no"):
    """bf16 autocast on CUDA when ``mixed_precision == "bf16"``; a no-op elsewhere."""
    device = torch.device(device)
    if mixed_precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    return contextlib.nullcontext()


def no_autocast(device: torch.device | str):
    """A block in float32 inside an autocast region (the rasterizer and rendering losses: gsplat on
    CUDA wants float32); a no-op off CUDA, where :func:`autocast` never turns anything on."""
    device = torch.device(device)
    return torch.autocast(device_type="cuda", enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def effective_precision(device: torch.device | str, mixed_precision: str) -> str:
    """What :func:`autocast` will actually do on ``device``: "bf16" or "no"."""
    return "bf16" if mixed_precision == "bf16" and torch.device(device).type == "cuda" else "no"


# ---------------------------------------------------------------------------------------------
# one optimiser step
# ---------------------------------------------------------------------------------------------
class GradientStep:
    """Gradient accumulation + clipping + optimiser and scheduler step for one set of parameters.

    A stage with several optimisers (stage 1: generator and fake score) keeps one per optimiser."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None = None, *, accumulation: int = 1, max_grad_norm: float = 0.0,
                 device: torch.device | str = "cpu", mixed_precision: str = "no"):
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation = accumulation
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self._micro = 0

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, micro_index: int) -> Iterator[None]:
        """DDP's ``no_sync`` for every micro-batch but the last (a no-op without DDP)."""
        last = micro_index == self.accumulation - 1
        if not last and hasattr(module, "no_sync"):
            with module.no_sync():
                yield
        else:
            yield

    @contextlib.contextmanager
    def micro(self, module: nn.Module, micro_index: int) -> Iterator[None]:
        """``no_sync`` + autocast for the forward; call :meth:`backward` inside it."""
        with self.no_sync(module, micro_index), autocast(self.device, self.mixed_precision):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()
        self._micro += 1

    def step(self) -> dict[str, float]:
        """Clip, step the optimiser and the scheduler, zero the gradients -> {"grad_norm", "lr"}."""
        if self._micro != self.accumulation:
            raise RuntimeError(f"step() after {self._micro} backward() calls, expected {self.accumulation}")
        self._micro = 0
        grads = [p for p in self.params if p.grad is not None]
        if self.max_grad_norm > 0 and grads:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        elif grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.grad.detach()) for g in grads]))
        else:
            norm = torch.zeros(())
        lr = float(self.optimizer.param_groups[0]["lr"])  # the LR this step used
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr}


def make_adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay)


def job_optimizer(params: Iterable[torch.nn.Parameter], job: Any, ctx: "WorkerContext"
                  ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, GradientStep]:
    """The recipe of a task with one optimiser, from its job config (``TrainJobConfig``): AdamW
    (``lr``, ``weight_decay``, ``adam_betas``) over the parameters that require grad, the job's
    learning-rate schedule, and the :class:`GradientStep` (accumulation, clipping, precision)."""
    params = [p for p in params if p.requires_grad]
    optimizer = make_adamw(params, lr=job.lr, weight_decay=job.weight_decay, betas=job.adam_betas)
    scheduler = make_lr_scheduler(optimizer, schedule=job.lr_schedule, warmup_steps=job.lr_warmup_steps,
                                  total_steps=job.steps, min_ratio=job.lr_min_ratio)
    stepper = GradientStep(params, optimizer, scheduler, accumulation=job.grad_accumulation,
                           max_grad_norm=job.max_grad_norm, device=ctx.device, mixed_precision=ctx.mixed_precision)
    return optimizer, scheduler, stepper


# ---------------------------------------------------------------------------------------------
# helpers for tasks
# ---------------------------------------------------------------------------------------------
def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The mean over images of each image's PSNR in dB (images in [0, 1]; see geco.metrics)."""
    from geco.metrics import mean_psnr

    return mean_psnr(pred, target)


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (e.g. ``("stage2", seed, rank, step)``): the same parts give the
    same seed in every process (unlike ``hash()``), so a resumed run draws what an uninterrupted one would."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def config_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (pydantic models are dumped first)."""
    def plain(p):
        return p.model_dump(mode="json") if hasattr(p, "model_dump") else p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# the task interface
# ---------------------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """Where a task runs: its rank, the world size, its device and the effective precision.

    ``wrap`` puts a module on the device and, in a distributed run, inside DDP (the Ray Train glue
    passes ``ray.train.torch.prepare_model``); the default only moves it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mixed_precision: str = "no"
    wrap: Callable[[nn.Module], nn.Module] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module) -> nn.Module:
        return self.wrap(module) if self.wrap is not None else module.to(self.device)


@dataclass(frozen=True)
class StepPlan:
    """What the glue will do right after an optimiser step, passed into :meth:`TrainTask.train_step`
    so a task never mirrors the glue's schedule (e.g. FSDP gathers full state only before a
    checkpoint or an evaluation)."""

    checkpoint: bool = False  # a checkpoint is saved after this step
    evaluate: bool = False  # rank 0 evaluates after this step

    @classmethod
    def after(cls, step_after: int, *, steps: int, checkpoint_every: int, eval_every: int) -> "StepPlan":
        """The plan for the step that ends at ``step_after`` steps, under a job's schedule."""
        last = step_after == steps
        return cls(checkpoint=last or step_after % checkpoint_every == 0,
                   evaluate=last or bool(eval_every and step_after % eval_every == 0))


@dataclass
class EvalResult:
    """Scalar metrics (logged under ``eval/``) and images (HxWx3 uint8, logged as artifacts)."""

    metrics: dict[str, float]
    images: dict[str, np.ndarray]


class TrainTask:
    """One training job's model logic; the Ray Train glue (``pipelines/training/``) builds it
    on every worker and drives it. Subclasses set ``name`` and implement the methods below.

    ``inputs``: URIs from earlier stages, by name (e.g. ``{"teacher": ..., "reconstructor": ...}``
    for stage 1; empty for pretraining), passed by the glue as the stage received them.

    Life cycle on a worker: ``__init__(cfg, job, ctx, inputs)`` builds models, optimisers and schedulers
    (random init, seeded); the glue loads the latest checkpoint into :meth:`modules`,
    :meth:`optimizers`, :meth:`schedulers` and :meth:`load_extra_state`; then per optimiser step
    ``train_step([prepare(rows) for each micro-batch], step, plan)``; every ``eval_every`` steps rank 0
    calls ``evaluate(prepare(val_rows), step)``; at the end rank 0 calls ``export(uri)``."""

    name: str = "task"

    def __init__(self, cfg: Any, job: Any, ctx: WorkerContext, inputs: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.job = job
        self.ctx = ctx
        self.inputs: dict[str, str] = dict(inputs or {})

    # -- state that checkpoints hold
    def modules(self) -> dict[str, nn.Module]:
        """The trained models (unwrapped), saved as ``models/<name>.safetensors``."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def schedulers(self) -> dict[str, Any]:
        return {}

    def extra_state(self) -> dict:
        """Any other JSON-able state to checkpoint (tensors allowed)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @classmethod
    def config_hash(cls, cfg: Any, job: Any, inputs: Mapping[str, str] | None = None) -> str:
        """What must not change between a checkpoint and the run that resumes from it (the model
        architecture and the input weights, not the schedule): part of the default Ray Train run
        name, and checked when a checkpoint loads. Called on the driver too, so it must not build
        anything."""
        return config_hash(cls.name)

    # -- work
    def prepare(self, rows: list[dict], training: bool = True) -> Any:
        """Raw shard rows (``{"__key__", "cond.png": bytes, ...}``) -> a batch on ``ctx.device``
        (``training=False``: the evaluation batch, e.g. every view instead of a random subset)."""
        raise NotImplementedError

    def train_step(self, micro_batches: list[Any], step: int, plan: StepPlan = StepPlan()) -> dict[str, float]:
        """One optimiser step over ``micro_batches`` (gradient accumulation); returns scalar metrics
        (at least ``loss`` and ``lr``). ``plan``: whether the glue checkpoints / evaluates after it."""
        raise NotImplementedError

    def evaluate(self, batch: Any, step: int) -> EvalResult:
        raise NotImplementedError

    def export(self, output_uri: str) -> dict[str, str]:
        """Write the final weights under ``output_uri``; returns {what: uri}."""
        raise NotImplementedError
