"""Ray Train glue shared by every training stage (pretrain, stage 1, stage 2).

A stage writes a :class:`geco.train.loop.TrainTask` (models, one optimiser step, evaluation,
export; pure torch) and a :class:`geco.config.TrainJobConfig` section, then calls
:func:`preflight` and :func:`run_training`::

    preflight(cfg, ["stage1.train"], dataset_uri=cfg.dataset.uri, output_uri=...)   # joins Ray
    train_ds, val_ds, info = training_datasets(cfg.dataset.uri, holdout_fraction=..., eval_objects=...)
    with start_run(cfg.tracking, f"{cfg.name}/stage1", parent_run_id=parent) as tracker:
        result = run_training(VSDTask, cfg, "stage1", stage="stage1", datasets={"train": train_ds, "val": val_ds},
                              output_uri=..., tracker=tracker)

Before anything is written (no MLflow run, no Ray Train run, no output folder), :func:`preflight`
fails with a :class:`TrainSetupError` that says what to fix when the dataset has no manifest, a shard
file its manifest lists is gone, or there are no train objects; when the Ray cluster cannot place
the job's workers (``use_gpu`` with too few GPUs, more CPUs than it has, or no CPU left for Ray
Data: Ray Train would wait forever; ``wait_for_resources`` skips this for autoscaling clusters);
or when the output or Ray Train storage cannot be written.

What the glue does, on the driver
    * a ``TorchTrainer`` from the job section: ``num_workers``, ``use_gpu``, CPUs/GPUs per worker,
      ``RunConfig(name, storage_path)`` (a local folder or ``s3://bucket/prefix`` through a pyarrow
      S3 filesystem for the endpoint in ``AWS_ENDPOINT_URL``), ``FailureConfig(max_failures)``,
      ``CheckpointConfig(num_to_keep=keep_checkpoints)``;
    * the run name defaults to ``<cfg.name>-<stage>-<task config hash>``: re-running the same config
      resumes from the run's latest checkpoint (Ray Train V2 does that for a known name + storage);
      a different model architecture gets a new run instead of loading wrong weights;
    * ``datasets={"train", "val"}``: only "train" is split over the workers
      (``DataConfig(datasets_to_split=["train"])``), in a deterministic order (``preserve_order``);
    * MLflow: the stage opens the run on the driver (config as params); its id goes to the workers.

and on every worker (:func:`train_loop_per_worker`)
    * ``torch.set_num_threads(torch_threads)``, seeds (``seed + rank``), the device, bf16 on GPU;
    * the task, with ``ray.train.torch.prepare_model`` for DDP;
    * resume: ``ray.train.get_checkpoint()`` -> models, optimisers, schedulers, RNG states of this
      rank, the step and the data position (epoch + rows consumed in it, which are skipped);
    * rows from ``ray.train.get_dataset_shard("train")`` through a seeded local shuffle buffer,
      ``batch_size`` rows per micro-batch, ``grad_accumulation`` micro-batches per step;
    * rank 0: metrics to MLflow every ``log_every`` steps (``train/<loss>``, ``train/lr`` ...),
      evaluation on the held-out objects at step 0 (fresh runs), every ``eval_every`` steps and at
      the end (``eval/<metric>`` + image artifacts ``<name>/step_NNNNNNNN.png``);
    * every ``checkpoint_every`` steps and at the end: a checkpoint (:mod:`geco.train.checkpoint`;
      rank 0 writes the state, every rank its RNG) through
      ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``;
    * a checkpoint counts as saved once the Ray Train controller has collected its report (the worker
      waits for that, see :func:`_wait_until_collected`), so a worker killed right after a checkpoint
      still resumes from it;
    * at the end, rank 0 evaluates, exports the final weights (``task.export(output_uri)``), logs them
      as MLflow artifacts, reports the last checkpoint, and writes ``geco-train-result.json`` (step,
      exported URIs, final metrics) beside the run's checkpoints. A re-run whose result file says the
      run reached its steps and whose exported weights exist returns at once, without a Ray Train job.

Test-only fault injection: ``GECO_TRAIN_FAULT=kill-at-step:<step>:<marker file>[:<rank>]`` (comma
separated) makes that worker ``os._exit(1)`` right after optimiser step ``<step>``, once (the
marker file records that it happened). Ray Train then restarts the worker group, which resumes
from the last checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from geco import storage
from geco.config import GecoConfig
from pipelines.cluster import init_ray, s3_filesystem

log = logging.getLogger(__name__)

FAULT_ENV = "GECO_TRAIN_FAULT"
RESULT_FILE = "geco-train-result.json"  # rank 0's summary of a finished run, beside Ray Train's files


class TrainSetupError(ValueError):
    """A training job cannot start for a reason the user can fix (data, targets, config)."""


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What one Ray Train job did."""

    task: str
    run_name: str
    storage_path: str  # where Ray Train keeps the run (checkpoints under <storage_path>/<run_name>)
    step: int  # the step training reached (== job.steps when complete)
    resumed_from: int | None  # step of the checkpoint the last worker group started from (None: fresh)
    checkpoint: str | None  # the latest checkpoint (path or s3:// URI)
    metrics: dict[str, Any] = field(default_factory=dict)  # the last metrics rank 0 reported
    exported: dict[str, str] = field(default_factory=dict)  # final weights, {what: uri}
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    already_complete: bool = False  # the run had reached its steps and exported before: nothing ran

    def summary(self) -> str:
        ev = {k[5:]: round(v, 3) for k, v in self.metrics.items() if k.startswith("eval/") and isinstance(v, float)}
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from else ""
        if self.already_complete:
            resumed = " (already complete: nothing to train)"
        lines = [f"{self.task}: step {self.step}{resumed} in {self.seconds:.1f} s (run {self.run_name})"]
        if ev:
            lines.append("  eval: " + ", ".join(f"{k} {v}" for k, v in sorted(ev.items())))
        for what, uri in sorted(self.exported.items()):
            lines.append(f"  {what}: {uri}")
        if self.checkpoint:
            lines.append(f"  checkpoint: {self.checkpoint}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver helpers
# ---------------------------------------------------------------------------------------------
def storage_for(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for ``RunConfig``: ``s3://b/p`` -> ("b/p", S3FileSystem);
    a local path -> (absolute path, None)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return f"{bucket}/{key}".rstrip("/"), s3_filesystem()
    return str(Path(uri).expanduser().resolve()), None


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory)."""
    return uri if storage.is_s3(uri) or "://" in uri else str(Path(uri).expanduser().resolve())


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////abs/relative.db`` (workers run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    if uri.startswith("file:") or "://" in uri:
        return uri
    return str(Path(uri).resolve()) if uri else uri


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


def _hash_rank(key: str) -> str:
    return hashlib.sha256(b"geco-holdout\x00" + key.encode()).hexdigest()


def holdout_keys(train_keys: list[str], fraction: float) -> set[str]:
    """A stable held-out subset of ``train_keys`` (at least 1 when there are 2+ objects), chosen
    by a hash of each key so it does not depend on the order or on objects added later."""
    keys = sorted(set(train_keys), key=_hash_rank)
    if len(keys) < 2:
        return set()
    n = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    return set(keys[:n])


@dataclass
class DatasetInfo:
    train_objects: int
    val_objects: int
    val_source: str  # "manifest" (the val split) or "holdout" (held out of train by hash)
    eval_keys: list[str]
    train_bytes: int = 0  # the train split's shard bytes
    materialized: bool = False  # the train split was read once into the object store (else streamed)


def should_materialize(mode: str, train_bytes: int) -> bool:
    """``dataset.training_input``: "materialize", "stream", or "auto" (the train split's shards fit
    in a quarter of the Ray cluster's object store)."""
    if mode != "auto":
        return mode == "materialize"
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return 0 < train_bytes <= 0.25 * store


def training_datasets(dataset_uri: str, *, holdout_fraction: float = 0.1, eval_objects: int = 4,
                      training_input: str = "stream"):
    """``(train_ds, val_ds, info)``: Ray Datasets of the manifest's current samples.

    Validation objects are the manifest's ``val`` split; when it is empty, a ``holdout_fraction``
    of the train objects is held out instead (by a hash of the key, so always the same ones) and
    left out of training. ``val_ds`` holds the first ``eval_objects`` of them in key order.
    ``training_input`` (:func:`should_materialize`): stream the train split every epoch, or read it
    once into the object store here (measured on 2 cores: streaming costs ~0.2 s a step in read work
    competing with training; see benchmarks/training.py)."""
    from geco.data.shards import current_samples, read_latest_manifest
    from pipelines.data import filter_keys, read_shards

    manifest = read_latest_manifest(dataset_uri)
    if manifest is None:
        raise FileNotFoundError(f"{dataset_uri}: no manifest; run `geco render` first")
    train_keys = sorted({k for keys in current_samples(manifest, "train").values() for k in keys})
    val_keys = sorted({k for keys in current_samples(manifest, "val").values() for k in keys})
    train_ds = read_shards(dataset_uri, "train")
    if val_keys:
        eval_keys = val_keys[:eval_objects]
        keep = set(eval_keys)
        val_ds = filter_keys(read_shards(dataset_uri, "val"), keep)
        info = DatasetInfo(len(train_keys), len(val_keys), "manifest", eval_keys)
    else:
        held = holdout_keys(train_keys, holdout_fraction)
        if not held:
            raise TrainSetupError(f"{dataset_uri}: {len(train_keys)} object(s) and no val split: nothing to hold out "
                             "for evaluation (render more objects or set dataset.val_fraction)")
        log.warning("%s: the manifest has no val objects; holding out %d of %d train objects for evaluation",
                    dataset_uri, len(held), len(train_keys))
        eval_keys = sorted(held)[:eval_objects]
        keep = set(eval_keys)
        val_ds = filter_keys(train_ds, keep)
        train_ds = filter_keys(train_ds, held, keep=False)
        info = DatasetInfo(len(train_keys) - len(held), len(held), "holdout", eval_keys)
    for ds in (train_ds, val_ds):  # the workers show training progress; Ray Data's bars there only flood the log
        ds.context.enable_progress_bars = False
    info.train_bytes = sum(int(s.get("bytes", 0)) for s in manifest["shards"] if s["split"] == "train")
    if should_materialize(training_input, info.train_bytes):
        log.info("%s: reading the train split (%.1f MB) into the object store", dataset_uri, info.train_bytes / 1e6)
        train_ds.context.execution_options.preserve_order = True  # the same row order on every run: exact resumes
        train_ds = train_ds.materialize()
        info.materialized = True
    return train_ds, val_ds, info


# ---------------------------------------------------------------------------------------------
# pre-flight: everything a user can get wrong, checked before any MLflow run or Ray Train job
# ---------------------------------------------------------------------------------------------
def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def check_dataset(dataset_uri: str) -> dict:
    """The latest manifest of ``dataset_uri`` once it is fit to train on, else :class:`TrainSetupError`:
    no manifest, a shard file that its current samples live in is gone, no train objects, or too
    few objects to hold one out for evaluation. Lists the dataset folder once (local or s3://)."""
    from geco.data.shards import current_samples, read_latest_manifest

    if not storage.is_s3(dataset_uri) and not Path(dataset_uri).expanduser().is_dir():
        raise TrainSetupError(f"dataset.uri={dataset_uri}: no such folder; render a dataset there with "
                              "`geco render --config <config>` or point dataset.uri (--data) at one")
    storage.check_readable(dataset_uri)  # S3: the endpoint and the bucket, with a clear message
    manifest = read_latest_manifest(dataset_uri)
    if manifest is None:
        raise TrainSetupError(f"dataset.uri={dataset_uri}: no shard manifest (manifest/v*.json): nothing was "
                              "rendered there; run `geco render --config <config>` with this dataset.uri first, "
                              "or point dataset.uri (--data) at a rendered dataset")
    version = f"manifest v{manifest.get('version', 0):06d}"
    live = {name: keys for split in ("train", "val") for name, keys in current_samples(manifest, split).items()}
    root = dataset_uri.rstrip("/") if storage.is_s3(dataset_uri) else str(Path(dataset_uri).expanduser())
    present = {uri[len(root) + 1:] for uri in storage.listdir(root)}
    missing = sorted(name for name in live if name not in present)
    if missing:
        objects = sum(len(live[name]) for name in missing)
        raise TrainSetupError(
            f"dataset.uri={dataset_uri}: {len(missing)} shard file(s) listed by its {version} are missing "
            f"({_few(missing)}; {objects} object(s)). Restore them, or delete their index files "
            f"({_few([n[:-len('.tar')] + '.json' for n in missing], 3)}) and re-run `geco render --config "
            "<config>`: it renders again the objects that no committed shard holds (`--force` renders all)")
    train = {k for keys in current_samples(manifest, "train").values() for k in keys}
    val = {k for keys in current_samples(manifest, "val").values() for k in keys}
    if not train:
        raise TrainSetupError(f"dataset.uri={dataset_uri}: its {version} has no train objects ({len(val)} val); "
                              "render objects into it (and check dataset.val_fraction)")
    if not val and len(train) < 2:
        raise TrainSetupError(f"dataset.uri={dataset_uri}: {len(train)} object(s) and no val split: nothing to "
                              "hold out for evaluation (render more objects or set dataset.val_fraction)")
    return manifest


def _cluster_address(cfg: GecoConfig) -> str:
    import ray

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client and other modes: the configured address says enough
        gcs = ""
    return f"{gcs} (ray.address={cfg.ray.address})" if gcs else f"ray.address={cfg.ray.address}"


DATA_CPUS = 1.0  # what one Ray Data task (shard read, filter) asks for: the CPU left beside the workers


def check_resources(cfg: GecoConfig, job_path: str, *, concurrent_cpus: float = 0.0) -> None:
    """Raise :class:`TrainSetupError` when the Ray cluster cannot run the job: its workers do not fit
    on the nodes that exist now (CPUs and, with ``use_gpu``, GPUs per worker), or they leave less than
    one CPU for Ray Data, which streams the shards to them. Either way Ray Train would wait forever.
    ``concurrent_cpus``: CPUs taken by workers of jobs running at the same time. Skipped with
    ``<job_path>.wait_for_resources`` (autoscaling clusters)."""
    import ray

    job = section(cfg, job_path)
    if job.wait_for_resources:
        return
    need = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        need["GPU"] = job.gpus_per_worker
    total = ray.cluster_resources()
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # no per-node view: the cluster as one node
        nodes = [total]

    def workers_on(res: dict) -> int:  # how many workers one node can hold
        ratios = [res.get(r, 0.0) / amount for r, amount in need.items() if amount > 0]
        return int(min(ratios) + 1e-9) if ratios else job.num_workers

    fit = sum(workers_on(res) for res in nodes)
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    asked_gpus, asked_cpus = job.num_workers * job.gpus_per_worker, job.num_workers * job.cpus_per_worker
    left = cpus - asked_cpus - concurrent_cpus
    if fit >= job.num_workers and left >= DATA_CPUS - 1e-9:
        return
    where = _cluster_address(cfg)
    hint = f"on an autoscaling cluster set {job_path}.wait_for_resources=true"
    if job.use_gpu and asked_gpus > gpus + 1e-9:
        raise TrainSetupError(
            f"{job_path}.use_gpu=true asks for {asked_gpus:g} GPU(s) (num_workers {job.num_workers} x gpus_per_worker "
            f"{job.gpus_per_worker:g}) but the Ray cluster at {where} has {gpus:g}; set {job_path}.use_gpu=false "
            f"(or fewer {job_path}.num_workers), or {hint}")
    if asked_cpus > cpus + 1e-9:
        raise TrainSetupError(
            f"{job_path} asks for {asked_cpus:g} CPU(s) (num_workers {job.num_workers} x cpus_per_worker "
            f"{job.cpus_per_worker:g}) but the Ray cluster at {where} has {cpus:g}; lower {job_path}.cpus_per_worker "
            f"or {job_path}.num_workers, or {hint}")
    if fit >= job.num_workers:  # the workers fit, but Ray Data would get no CPU
        others = f" and {concurrent_cpus:g} by the concurrent job(s)" if concurrent_cpus else ""
        raise TrainSetupError(
            f"{job_path}: its workers take {asked_cpus:g} CPU(s) (num_workers {job.num_workers} x cpus_per_worker "
            f"{job.cpus_per_worker:g}){others} out of the {cpus:g} CPU(s) of the Ray cluster at {where}, leaving {max(left, 0):g}; "
            f"Ray Data, which streams the shards to the workers, needs {DATA_CPUS:g} free and the job would hang. "
            f"Lower {job_path}.cpus_per_worker (fractions are fine, e.g. 0.5) or {job_path}.num_workers, or {hint}")
    per_node = ", ".join(f"{{{', '.join(f'{r}: {res.get(r, 0.0):g}' for r in need)}}}" for res in nodes[:8])
    raise TrainSetupError(
        f"{job_path}: only {fit} of num_workers={job.num_workers} worker(s) fit on the nodes of the Ray cluster at "
        f"{where} (each worker asks for {', '.join(f'{amount:g} {r}' for r, amount in need.items())} on one node; "
        f"nodes: {per_node}); lower {job_path}.num_workers or the per-worker resources, or {hint}")


def check_cluster(cfg: GecoConfig, job_paths: list[str], *, concurrent: bool = False) -> None:
    """Join Ray (``cfg.ray.address``) and :func:`check_resources` for every job; ``concurrent``:
    the jobs run side by side, so each must fit beside the others' workers."""
    init_ray(cfg.ray.address)
    jobs = {path: section(cfg, path) for path in job_paths}
    for path in job_paths:
        others = sum(j.num_workers * j.cpus_per_worker for p, j in jobs.items() if p != path) if concurrent else 0.0
        check_resources(cfg, path, concurrent_cpus=others)


def preflight(cfg: GecoConfig, job_paths: list[str], *, dataset_uri: str, output_uri: str,
              concurrent: bool = False) -> dict:
    """Everything checked before a training stage opens an MLflow run or starts a Ray Train job, each
    failing with a :class:`TrainSetupError` (or :class:`geco.storage.StorageError`) that says what
    to fix: the dataset (:func:`check_dataset`), joining Ray, the cluster's CPUs/GPUs for every job
    (:func:`check_resources`; ``concurrent``: the jobs run side by side), and that ``output_uri`` and
    every job's ``storage_path`` can be written (local folders are created by that check, and only
    then). Returns the manifest."""
    manifest = check_dataset(dataset_uri)
    check_cluster(cfg, job_paths, concurrent=concurrent)
    storage.check_writable(output_uri)
    for path in job_paths:
        storage.check_writable(section(cfg, path).storage_path)
    return manifest


# ---------------------------------------------------------------------------------------------
# the driver entry point
# ---------------------------------------------------------------------------------------------
def _completed_run(result_uri: str, steps: int, output_uri: str) -> dict | None:
    """The result file of a run that reached ``steps`` and whose exported weights under
    ``output_uri`` all exist, or None (then the run must be started or resumed)."""
    try:
        info = json.loads(storage.read_text(result_uri))
    except (FileNotFoundError, OSError, ValueError):
        return None
    except Exception as e:  # e.g. S3 errors: resuming through Ray Train is always correct
        log.debug("cannot read %s: %s", result_uri, e)
        return None
    exported = info.get("exported") or {}
    if int(info.get("step", -1)) != steps or not exported:
        return None
    prefix = output_uri.rstrip("/") + "/"
    if not all(str(u).startswith(prefix) and (storage.exists(u) or storage.listdir(u)) for u in exported.values()):
        return None
    return info


def run_training(task_cls, cfg: GecoConfig, job_path: str, *, stage: str, datasets: dict, output_uri: str,
                 tracker=None, log_weights: bool = True, run_name: str | None = None,
                 parallel_strategy: str = "ddp", parallel_strategy_kwargs: dict | None = None) -> TrainResult:
    """Run ``task_cls`` under Ray Train as configured by ``section(cfg, job_path)``.

    ``datasets``: ``{"train": Dataset, "val": Dataset}``; ``output_uri``: where the final weights go
    (local or s3://); ``tracker``: an open :class:`geco.tracking.Tracker` whose MLflow run the
    workers log into (``None`` or disabled: no MLflow). Raises ``ray.train.TrainingFailedError``
    when the job fails beyond ``max_failures`` restarts.

    ``parallel_strategy`` ("ddp" or "fsdp", with ``parallel_strategy_kwargs`` for the wrapper) is
    what ``ctx.wrap(module)`` asks ``ray.train.torch.prepare_model`` for in a multi-worker run; a task
    may ask for another one per module: ``ctx.wrap(module, parallel_strategy="ddp")``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    job = section(cfg, job_path)
    run_name = run_name or job.run_name or f"{cfg.name}-{stage}-{task_cls.config_hash(cfg, job)}"
    storage_path, fs = storage_for(job.storage_path)
    storage_uri = job.storage_path if storage.is_s3(job.storage_path) else storage_path
    output_uri = absolute_uri(output_uri)
    run_id = tracker.run_id if tracker is not None and tracker.enabled else None
    tracking_uri = absolute_tracking_uri(cfg.tracking.uri) if run_id else ""
    if tracker is not None and tracker.enabled:
        tracker.log_params({"train.task": task_path(task_cls), "train.run_name": run_name,
                            "train.storage": storage.join(storage_uri, run_name),
                            "train.config_hash": task_cls.config_hash(cfg, job), "train.output_uri": output_uri})
        tracker.set_tags({"geco.train.run_name": run_name})

    resources = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = job.gpus_per_worker
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    if job.torch_threads:
        env["OMP_NUM_THREADS"] = str(job.torch_threads)
    result_uri = storage.join(storage_uri, run_name, RESULT_FILE)
    done = _completed_run(result_uri, job.steps, output_uri)
    if done is not None:  # nothing to train: do not start a cluster job for it
        log.info("%s: run %s is complete (step %d); its weights are in place", stage, run_name, done["step"])
        metrics = {**{f"train/{k}": v for k, v in done.get("train", {}).items()}, **done.get("eval", {})}
        return TrainResult(task=task_cls.name, run_name=run_name, storage_path=storage_uri, step=int(done["step"]),
                           resumed_from=None, checkpoint=done.get("checkpoint"), metrics=metrics,
                           exported=done["exported"], mlflow_run_id=run_id, seconds=time.perf_counter() - t0,
                           already_complete=True)
    if storage.exists(result_uri):
        storage.delete(result_uri)  # rewritten by rank 0 when this run ends
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # the same rows in the same order every epoch: exact data positions
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg_json": cfg.model_dump_json(), "job_path": job_path, "task": task_path(task_cls),
                           "tracking_uri": tracking_uri, "run_id": run_id, "output_uri": output_uri,
                           "log_weights": bool(log_weights and run_id), "result_uri": result_uri,
                           "storage_uri": storage_uri, "run_name": run_name,
                           "parallel_strategy": parallel_strategy,
                           "parallel_strategy_kwargs": dict(parallel_strategy_kwargs or {})},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
                             worker_runtime_env={"env_vars": env} if env else None),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
    )
    log.info("%s: Ray Train run %s in %s (%d worker(s))", stage, run_name, storage_uri, job.num_workers)
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt and storage.is_s3(job.storage_path) and not ckpt.startswith("s3://"):
        ckpt = "s3://" + ckpt.lstrip("/")
    # rank 0's own account of the run (Ray Train's result holds the last *checkpoint's* metrics)
    info = json.loads(storage.read_text(result_uri)) if storage.exists(result_uri) else {}
    metrics = dict(result.metrics or {})
    metrics.update({f"train/{k}": v for k, v in info.get("train", {}).items()})
    metrics.update({f"eval/{k[5:] if k.startswith('eval/') else k}": v for k, v in info.get("eval", {}).items()})
    exported = info.get("exported") or {k[len("exported/"):]: v for k, v in metrics.items() if k.startswith("exported/")}
    resumed = info.get("resumed_from", metrics.get("resumed_from"))
    return TrainResult(task=task_cls.name, run_name=run_name, storage_path=storage_uri,
                       step=int(info.get("step", metrics.get("step", 0))),
                       resumed_from=int(resumed) if resumed is not None and resumed >= 0 else None,
                       checkpoint=ckpt, metrics=metrics, exported=exported, mlflow_run_id=run_id,
                       seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# on the workers
# ---------------------------------------------------------------------------------------------
class RunLogger:
    """MLflow logging into an existing run (opened on the driver); a no-op without one."""

    def __init__(self, tracking_uri: str = "", run_id: str | None = None):
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow import MlflowClient

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            self.client = MlflowClient(tracking_uri=tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in values.items()]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

    def image(self, image, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)


def maybe_inject_fault(step: int, rank: int) -> None:
    """Test-only: ``GECO_TRAIN_FAULT=kill-at-step:<n>:<marker>[:<rank>]`` kills this worker once."""
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        parts = spec.split(":")
        if len(parts) < 3 or parts[0] != "kill-at-step":
            continue
        n, marker = int(parts[1]), Path(parts[2])
        target = int(parts[3]) if len(parts) > 3 and parts[3] else 0
        if step == n and rank == target and not marker.exists():
            marker.write_text(f"pid {os.getpid()} rank {rank} step {step}\n")
            log.warning("%s: killing worker rank %d after step %d", FAULT_ENV, rank, step)
            os._exit(1)


class RowStream:
    """Rows of one worker's dataset shard, epoch after epoch, through a seeded shuffle buffer.

    ``position`` (a :class:`~geco.train.checkpoint.DataPosition`) counts the rows consumed in the
    current epoch; a stream built from a checkpoint's position skips that many rows of that epoch,
    which (same seed, same order of rows) are exactly the rows consumed before."""

    def __init__(self, shard, position, *, seed: int, rank: int, buffer: int):
        self.shard = shard
        self.position = position
        self.seed, self.rank, self.buffer = seed, rank, max(1, buffer)
        self._it = self._epoch(position.epoch)
        for _ in range(position.samples):
            if next(self._it, None) is None:  # the data shrank since the checkpoint: next epoch
                self.position.next_epoch()
                self._it = self._epoch(self.position.epoch)
                break

    def _epoch(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buf: list[dict] = []
        for row in self.shard.iter_rows():
            buf.append(row)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def take(self, n: int) -> list[dict]:
        rows: list[dict] = []
        fresh = 0  # rows seen since the last epoch change (guards against an empty shard)
        while len(rows) < n:
            row = next(self._it, None)
            if row is None:
                if fresh == 0 and self.position.samples == 0:
                    raise RuntimeError(f"worker {self.rank}: its train dataset shard is empty (more workers "
                                       "than objects?)")
                self.position.next_epoch()
                self._it = self._epoch(self.position.epoch)
                fresh = 0
                continue
            rows.append(row)
            fresh += 1
            self.position.advance(1)
        return rows


class Prefetcher:
    """A step's micro-batches, taken from a :class:`RowStream` and decoded by ``prepare`` on a
    background thread, ``depth`` steps ahead of the training loop (``depth=0``: on the caller's
    thread, nothing ahead).

    The stream's own position runs ahead by up to ``depth`` steps; :attr:`position` is the position
    after the last step *handed out*, which is what a checkpoint must record (the prefetched rows
    are taken again after a resume). Errors in the thread (a decode failure, an empty shard) are
    raised by :meth:`next` on the training thread."""

    _DONE = object()

    def __init__(self, stream: RowStream, prepare, *, batch_size: int, accumulation: int, depth: int):
        from geco.train.checkpoint import DataPosition

        self._stream, self._prepare = stream, prepare
        self._batch_size, self._accumulation = batch_size, accumulation
        self.position = DataPosition(stream.position.epoch, stream.position.samples)
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, name="geco-prefetch", daemon=True)
            self._thread.start()

    def _load(self) -> tuple[list, tuple[int, int]]:
        micro = [self._prepare(self._stream.take(self._batch_size)) for _ in range(self._accumulation)]
        return micro, (self._stream.position.epoch, self._stream.position.samples)

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._load()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._queue.put(e)

    def next(self) -> list:
        """The next step's micro-batches (each ``prepare(rows)`` of ``batch_size`` rows)."""
        if self._thread is None:
            micro, (epoch, samples) = self._load()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            micro, (epoch, samples) = item
        self.position.epoch, self.position.samples = epoch, samples
        return micro

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)


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
                            config_hash=task.config_hash(task.cfg, job), extra=task.extra_state(), rank=0)
        else:
            save_rng_state(tmp, rank)
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


def _progress_bar(name: str, step: int, steps: int, rank: int):
    """Rank 0's step counter (tqdm; a line every 10 s when the log is not a terminal)."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=steps, initial=step, desc=f"{name} steps", unit="step", disable=rank != 0,
                mininterval=0.5 if tty else 10.0, dynamic_ncols=tty)


def _log_eval(logger: RunLogger, result, step: int) -> dict[str, float]:
    metrics = {f"eval/{k}": float(v) for k, v in result.metrics.items()}
    logger.metrics(metrics, step)
    for name, image in result.images.items():
        logger.image(image, f"{name}/step_{step:08d}.png")
    return metrics


def _final_metrics(metrics: dict, last_eval: dict, resumed_from: int, exported: dict) -> dict:
    return {**metrics, **last_eval, "resumed_from": resumed_from, **{f"exported/{k}": v for k, v in exported.items()}}


def _timing(what: str, t_start: float, rank: int) -> None:
    if os.environ.get("GECO_TRAIN_TIMING"):
        print(f"[geco-train] rank {rank}: {what} at {time.perf_counter() - t_start:.1f} s", flush=True)


def _log_weights(logger: RunLogger, what: str, uri: str) -> None:
    """Log exported weights (a file or a folder, local or s3://) as artifacts under ``weights/<what>``."""
    if logger.client is None:
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
            logger.artifacts(local, f"weights/{what}")
        else:
            logger.client.log_artifact(logger.run_id, str(local), f"weights/{what}")


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
    task = task_cls(cfg, job, ctx)

    step, position, resumed_from = 0, DataPosition(), -1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d, models=task.modules(), optimizers=task.optimizers(),
                                    schedulers=task.schedulers(), config_hash=task_cls.config_hash(cfg, job),
                                    rank=rank)
        task.load_extra_state(state.extra)
        step, position, resumed_from = state.step, state.data_position, state.step
        if not state.rng_restored:  # another world size: distinct, reproducible streams per rank
            torch.manual_seed(job.seed + rank + 1000003 * step)
        log.info("rank %d: resumed from step %d (epoch %d, %d rows in)", rank, step, position.epoch, position.samples)

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else RunLogger()
    val_batch = None
    if rank == 0:
        val_rows = list(ray.train.get_dataset_shard("val").iter_rows())
        val_batch = task.prepare(val_rows, training=False) if val_rows else None
    last_eval: dict[str, float] = {}
    if val_batch is not None and step == 0 and step < job.steps:
        last_eval = _log_eval(logger, task.evaluate(val_batch, 0), 0)  # the untrained baseline
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
    progress = _progress_bar(task_cls.name, step, job.steps, rank)

    def finish() -> None:  # rank 0, once training is complete: final evaluation and the weights
        nonlocal last_eval, exported
        if rank != 0:
            return
        if val_batch is not None and eval_step != step:
            last_eval = _log_eval(logger, task.evaluate(val_batch, step), step)
        exported = task.export(config["output_uri"])
        if config.get("log_weights"):
            for what, uri in exported.items():
                _log_weights(logger, what, uri)

    _timing("ready", t_start, rank)
    while step < job.steps:
        t_wait = time.perf_counter()
        micro = loader.next()
        data_wait += time.perf_counter() - t_wait
        plan = StepPlan.after(step + 1, steps=job.steps, checkpoint_every=job.checkpoint_every,
                              eval_every=job.eval_every if val_batch is not None else 0)
        metrics = task.train_step(micro, step, plan)
        step += 1
        progress.update(1)
        rows_since += job.batch_size * job.grad_accumulation
        maybe_inject_fault(step, rank)
        if step % job.log_every == 0 or step == job.steps:
            now = time.perf_counter()
            span = max(now - t_log, 1e-9)
            metrics["step_s"] = span * job.batch_size * job.grad_accumulation / max(rows_since, 1)  # wall per step
            metrics["samples_per_s"] = rows_since * world / span
            metrics["data_wait_fraction"] = data_wait / span  # > 0.1: input-bound
            logged = {f"train/{k}": v for k, v in metrics.items()}
            logger.metrics(logged, step)
            progress.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")}, refresh=False)
            t_log, rows_since, data_wait = now, 0, 0.0
        if val_batch is not None and job.eval_every and step % job.eval_every == 0:
            last_eval = _log_eval(logger, task.evaluate(val_batch, step), step)
            eval_step = step
        if step == job.steps:
            _timing("trained", t_start, rank)
            finish()  # before the last checkpoint: Ray Train's result carries that checkpoint's metrics
        if step % job.checkpoint_every == 0 or step == job.steps:
            _report(task, job, step, position, _final_metrics(metrics, last_eval, resumed_from, exported), rank, True)
    loader.close()
    progress.close()
    if step == start_step:  # nothing to train (complete already): export again, report without a checkpoint
        finish()
        _report(task, job, step, position, _final_metrics(metrics, last_eval, resumed_from, exported), rank, False)
    if rank == 0 and config.get("result_uri"):
        storage.write_text(config["result_uri"], json.dumps(
            {"step": step, "resumed_from": resumed_from, "exported": exported, "eval": last_eval,
             "train": metrics, "checkpoint": storage.join(config["storage_uri"], config["run_name"],
                                                          f"checkpoint_{step:08d}")}, indent=1, default=float))
    _timing("done", t_start, rank)
