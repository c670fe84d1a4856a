"""The Ray Train worker function every training stage runs (:func:`train_loop_per_worker`).

The driver (:mod:`pipelines.training.driver`) hands each worker a plain dict: the config as JSON,
the job section's path (``"stage1.train"``), the task as ``module:Class``, the stage's input URIs,
the MLflow run id and where outputs go. On every worker:

* ``torch.set_num_threads(torch_threads)``, seeds (``seed + rank``), the device, bf16 on GPU;
* the task, ``task_cls(cfg, job, ctx, inputs)``, with ``ray.train.torch.prepare_model`` for DDP
  (or FSDP when the stage asks for it);
* resume: ``ray.train.get_checkpoint()`` -> models, optimisers, schedulers, RNG states of this
  rank, the step and the data position (epoch + rows consumed in it, which are skipped);
* rows from ``ray.train.get_dataset_shard("train")`` through :class:`geco.train.stream.RowStream`
  (a seeded local shuffle buffer) and :class:`~geco.train.stream.Prefetcher` (decoding ahead),
  ``batch_size`` rows per micro-batch, ``grad_accumulation`` micro-batches per step;
* rank 0: metrics to MLflow every ``log_every`` steps (``train/<loss>``, ``train/lr`` ...),
  evaluation on the held-out objects at step 0 (fresh runs), every ``eval_every`` steps and at
  the end (``eval/<metric>`` + image artifacts ``<name>/step_NNNNNNNN.png``);
* every ``checkpoint_every`` steps and at the end: a checkpoint (:mod:`geco.train.checkpoint`;
  rank 0 writes the state, every rank its RNG) through
  ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``; it counts as saved
  once the Ray Train controller has collected the report (:func:`_wait_until_collected`), so a
  worker killed right after a checkpoint still resumes from it;
* at the end, rank 0 evaluates, exports the final weights (``task.export(output_uri)``), logs them
  as MLflow artifacts, reports the last checkpoint, and writes ``geco-train-result.json`` (step,
  exported URIs, final metrics, the MLflow run id) beside the run's checkpoints: the driver reads
  it back, and a re-run finds the stage complete from it.

Test-only fault points (:mod:`geco.faults`, inert unless ``GECO_TEST_FAULTS`` is set):
``kill-at-step`` right after an optimiser step and ``kill-in-checkpoint`` inside a checkpoint
report (files written, report not sent). Ray Train then restarts the worker group, which resumes
from the last checkpoint it collected. ``hold-at-step`` makes every rank record itself (pid, Ray
node id) after that step, once, and wait for its node to be removed (tests/integration/test_node_loss.py).
The driver forwards the switch to the workers.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

from geco import faults, storage
from geco.config import GecoConfig
from geco.tracking import Tracker
from geco.train.stream import Prefetcher, RowStream
from pipelines.training.progress import StepReporter

log = logging.getLogger(__name__)

RESULT_FILE = "geco-train-result.json"  # rank 0's summary of a finished run, beside Ray Train's files


# ---------------------------------------------------------------------------------------------
# naming a job: the config section and the task class travel to the workers as strings
# ---------------------------------------------------------------------------------------------
def section(cfg: GecoConfig, path: str):
    """``section(cfg, "pretrain.teacher")`` -> ``cfg.pretrain.teacher``."""
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def task_path(task_cls) -> str:
    return f"{task_cls.__module__}:{task_cls.__qualname__}"


def resolve_task(path: str):
    module, _, name = path.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# test-only fault points (geco.faults: inert unless a test sets its switch)
# ---------------------------------------------------------------------------------------------
def _test_fault(kind: str, step: int, rank: int) -> None:
    """``<kind>:<step>:<marker>[:<rank>]`` (``kill-at-step``, ``kill-in-checkpoint``) kills this worker once."""
    for args in faults.matching(kind):
        n, marker = int(args[0]), args[1]
        target = int(args[2]) if len(args) > 2 and args[2] else 0
        if step == n and rank == target and faults.once(marker, f"rank {rank} step {step} {kind}"):
            log.warning("%s: %s: killing worker rank %d at step %d", faults.ENV, kind, rank, step)
            os._exit(1)


def _hold_fault(step: int, rank: int) -> None:
    """``hold-at-step:<step>:<folder>``: every rank writes ``<folder>/rank-<r>`` (pid, Ray node id)
    after that step, once, and waits (at most 10 min) for its node to be removed from under it."""
    for args in faults.matching("hold-at-step"):
        n, folder = int(args[0]), Path(args[1])
        if step != n:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        import ray  # lazy, as elsewhere in this module

        note = json.dumps({"pid": os.getpid(), "rank": rank, "step": step,
                           "node_id": ray.get_runtime_context().get_node_id()})
        if faults.once(folder / f"rank-{rank}", note):
            log.warning("%s: rank %d holds after step %d for its node to be removed", faults.ENV, rank, step)
            time.sleep(600)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _report(task, job, step: int, position, metrics: dict, rank: int, with_checkpoint: bool) -> None:
    import ray.train

    from geco.train.checkpoint import save_checkpoint, save_rng_state

    metrics = {"step": step, "epoch": position.epoch, **metrics}
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="geco-ckpt-", ignore_cleanup_errors=True) as tmp:
        if rank == 0:
            save_checkpoint(tmp, step=step, models=task.modules(), optimizers=task.optimizers(),
                            schedulers=task.schedulers(), data_position=position,
                            config_hash=task.config_hash(task.cfg, job, task.inputs), extra=task.extra_state(), rank=0)
        else:
            save_rng_state(tmp, rank)
        _test_fault("kill-in-checkpoint", step, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")
    _wait_until_collected()


def _wait_until_collected(timeout_s: float = 60.0) -> None:
    """Block until the Ray Train controller has collected this worker's last report.

    Ray Train 2.60 (V2) hands a report to the controller through a one-slot queue that the controller
    polls every few seconds (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s); a worker that dies before the
    poll loses the report, and with it the checkpoint it names, so the restarted group would resume
    from an older one. Waiting here makes a checkpoint count as saved only once Ray Train knows it.
    (Uses Ray Train internals; without them it returns at once.)"""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        q = get_train_context().get_result_queue()
    except Exception:  # another Ray version: nothing to wait for
        return
    deadline = time.monotonic() + timeout_s
    while getattr(q, "unfinished_tasks", 0) and time.monotonic() < deadline:
        time.sleep(0.05)


def _log_eval(tracker: Tracker, result, step: int) -> dict[str, float]:
    metrics = {f"eval/{k}": float(v) for k, v in result.metrics.items()}
    tracker.log_metrics(metrics, step)
    for name, image in result.images.items():
        tracker.log_image(image, f"{name}/step_{step:08d}.png")
    return metrics


def _final_metrics(metrics: dict, last_eval: dict, resumed_from: int, exported: dict) -> dict:
    return {**metrics, **last_eval, "resumed_from": resumed_from, **{f"exported/{k}": v for k, v in exported.items()}}


def _timing(what: str, t_start: float, rank: int) -> None:
    if os.environ.get("GECO_TRAIN_TIMING"):
        print(f"[geco-train] rank {rank}: {what} at {time.perf_counter() - t_start:.1f} s", flush=True)


def log_weights(tracker: Tracker, what: str, uri: str) -> None:
    """Log exported weights (a file or a folder, local or s3://) as artifacts under ``weights/<what>``."""
    if not tracker.enabled:
        return
    with tempfile.TemporaryDirectory(prefix="geco-weights-") as tmp:
        if storage.is_s3(uri):
            files = storage.listdir(uri)
            if files:  # a folder
                local = Path(tmp) / storage.basename(uri)
                for f in files:
                    storage.download(f, local / f[len(uri.rstrip("/")) + 1:])
            else:
                local = storage.download(uri, Path(tmp) / storage.basename(uri))
        else:
            local = Path(uri)
        if local.is_dir():
            tracker.log_artifacts(local, f"weights/{what}")
        else:
            tracker.log_artifact(local, f"weights/{what}")


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from geco.train.checkpoint import DataPosition, load_checkpoint
    from geco.train.loop import StepPlan, WorkerContext, effective_precision

    t_start = time.perf_counter()
    cfg = GecoConfig.model_validate_json(config["cfg_json"])
    job = section(cfg, config["job_path"])
    task_cls = resolve_task(config["task"])
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    random.seed(job.seed + rank)
    np.random.seed((job.seed + rank) % 2**32)
    torch.manual_seed(job.seed + rank)

    strategy = config.get("parallel_strategy") or "ddp"
    strategy_kwargs = config.get("parallel_strategy_kwargs") or {}

    def wrap(module, parallel_strategy: str | None = None, parallel_strategy_kwargs: dict | None = None):
        if world <= 1:
            return module.to(device)
        which = parallel_strategy or strategy
        kwargs = parallel_strategy_kwargs if parallel_strategy_kwargs is not None else (
            strategy_kwargs if which == strategy else {})
        return ray.train.torch.prepare_model(module, parallel_strategy=which, parallel_strategy_kwargs=kwargs)

    ctx = WorkerContext(rank=rank, world_size=world, device=device,
                        mixed_precision=effective_precision(device, job.mixed_precision), wrap=wrap)
    task = task_cls(cfg, job, ctx, config.get("inputs") or {})

    step, position, resumed_from = 0, DataPosition(), -1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d, models=task.modules(), optimizers=task.optimizers(),
                                    schedulers=task.schedulers(), config_hash=task.config_hash(task.cfg, job, task.inputs),
                                    rank=rank)
        task.load_extra_state(state.extra)
        step, position, resumed_from = state.step, state.data_position, state.step
        if not state.rng_restored:  # another world size: distinct, reproducible streams per rank
            torch.manual_seed(job.seed + rank + 1000003 * step)
        log.info("rank %d: resumed from step %d (epoch %d, %d rows in)", rank, step, position.epoch, position.samples)

    tracker = Tracker.attach(config["tracking_uri"], config["run_id"]) if rank == 0 else Tracker()
    val_batch = None
    if rank == 0:
        val_rows = list(ray.train.get_dataset_shard("val").iter_rows())
        val_batch = task.prepare(val_rows, training=False) if val_rows else None
    last_eval: dict[str, float] = {}
    if val_batch is not None and step == 0 and step < job.steps:
        last_eval = _log_eval(tracker, task.evaluate(val_batch, 0), 0)  # the untrained baseline
    eval_step = 0 if step == 0 else -1

    stream = RowStream(ray.train.get_dataset_shard("train"), position, seed=job.seed, rank=rank,
                       buffer=job.shuffle_buffer)
    loader = Prefetcher(stream, task.prepare, batch_size=job.batch_size, accumulation=job.grad_accumulation,
                        depth=job.prefetch_batches if step < job.steps else 0)
    position = loader.position  # what checkpoints record: the rows of the steps taken so far
    metrics: dict[str, float] = {}
    start_step = step
    t_log, rows_since, data_wait = time.perf_counter(), 0, 0.0
    exported: dict[str, str] = {}
    progress = StepReporter(config.get("progress_actor"), rank)  # the driver draws the bar
    postfix: dict[str, str] = {}

    def finish() -> None:  # rank 0, once training is complete: final evaluation and the weights
        nonlocal last_eval, exported
        if rank != 0:
            return
        if val_batch is not None and eval_step != step:
            last_eval = _log_eval(tracker, task.evaluate(val_batch, step), step)
        exported = task.export(config["output_uri"])
        wanted = config.get("log_weights")  # True (all), False, or the names of the exports to log
        for what, uri in exported.items():
            if wanted is True or (isinstance(wanted, list) and what in wanted):
                log_weights(tracker, what, uri)

    _timing("ready", t_start, rank)
    while step < job.steps:
        t_wait = time.perf_counter()
        micro = loader.next()
        data_wait += time.perf_counter() - t_wait
        plan = StepPlan.after(step + 1, steps=job.steps, checkpoint_every=job.checkpoint_every,
                              eval_every=job.eval_every if val_batch is not None else 0)
        metrics = task.train_step(micro, step, plan)
        step += 1
        progress.update(step, postfix, force=step == job.steps)
        rows_since += job.batch_size * job.grad_accumulation
        _test_fault("kill-at-step", step, rank)
        _hold_fault(step, rank)
        if step % job.log_every == 0 or step == job.steps:
            now = time.perf_counter()
            span = max(now - t_log, 1e-9)
            metrics["step_s"] = span * job.batch_size * job.grad_accumulation / max(rows_since, 1)  # wall per step
            metrics["samples_per_s"] = rows_since * world / span
            metrics["data_wait_fraction"] = data_wait / span  # > 0.1: input-bound
            logged = {f"train/{k}": v for k, v in metrics.items()}
            tracker.log_metrics(logged, step)
            postfix = {k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")}
            t_log, rows_since, data_wait = now, 0, 0.0
        if val_batch is not None and job.eval_every and step % job.eval_every == 0:
            last_eval = _log_eval(tracker, task.evaluate(val_batch, step), step)
            eval_step = step
        if step == job.steps:
            _timing("trained", t_start, rank)
            finish()  # before the last checkpoint: Ray Train's result carries that checkpoint's metrics
        if step % job.checkpoint_every == 0 or step == job.steps:
            _report(task, job, step, position, _final_metrics(metrics, last_eval, resumed_from, exported), rank, True)
    loader.close()
    if step == start_step:  # nothing to train (complete already): export again, report without a checkpoint
        finish()
        _report(task, job, step, position, _final_metrics(metrics, last_eval, resumed_from, exported), rank, False)
    if rank == 0 and config.get("result_uri"):
        storage.write_text(config["result_uri"], json.dumps(
            {"step": step, "resumed_from": resumed_from, "exported": exported, "eval": last_eval,
             "train": metrics, "mlflow_run_id": config["run_id"],
             "mlflow_run_ids": config.get("run_ids") or {}, "checkpoint": storage.join(config["storage_uri"], config["run_name"],
                                                          f"checkpoint_{step:08d}")}, indent=1, default=float))
    _timing("done", t_start, rank)
