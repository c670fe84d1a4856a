"""The driver side of a training stage: a ``TorchTrainer`` per job, and one stage runner.

A training stage (pretrain, stage 1, stage 2) is a few dozen lines around :func:`run_training_stage`::

    run = run_training_stage(cfg, "stage1", [TrainJob("stage1", VSDTask, "stage1.train")],
                             dataset_uri=inputs.dataset_uri, output_uri=cfg.stage1.output_uri,
                             inputs=inputs.task_inputs(), parent_run_id=parent, tags={...})

which does, in order: the pre-flight (:func:`~pipelines.training.preflight.preflight`, which reads
the manifest - the only read of it in the stage), the "already complete" shortcut, the train/val
Datasets (:mod:`pipelines.training.datasets`), the stage's MLflow run (config as params, lineage
tags (:func:`geco.tracking.lineage_tags`: git commit, config hash, manifest URI and hash, the input
URIs), object counts; one child run per job when a stage has several), :func:`run_training` per job
(side by side with ``concurrent``), and the exported URIs as tags.

:func:`run_training` runs one :class:`geco.train.loop.TrainTask` under Ray Train as configured by
its job section (:class:`geco.config.TrainJobConfig`):

* ``num_workers``, ``use_gpu``, CPUs/GPUs per worker, ``RunConfig(name, storage_path)`` (a local
  folder or ``s3://bucket/prefix`` through a pyarrow S3 filesystem for ``AWS_ENDPOINT_URL``),
  ``FailureConfig(max_failures)``, ``CheckpointConfig(num_to_keep=keep_checkpoints)``;
* the run name defaults to ``<cfg.name>-<stage>-<task config hash>`` (the hash covers the model
  architecture and the input weights): re-running resumes from the run's latest checkpoint (Ray
  Train V2 does that for a known name + storage), a different architecture or teacher gets a new run;
* ``datasets={"train", "val"}``: only "train" is split over the workers, in a deterministic order;
* the stage's input URIs go to the workers as they are (``TrainTask(cfg, job, ctx, inputs)``);
* a run whose result file (written by rank 0, :data:`~pipelines.training.worker.RESULT_FILE`) says
  it reached its steps and whose exported weights exist is complete: no Ray Train job starts. When
  every job of a stage is complete, the stage opens no MLflow run either: it returns the previous
  outputs (and run ids) with ``did_work`` False - a no-op re-run says "nothing to do".
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from geco import faults, storage
from geco.config import GecoConfig
from geco.storage import absolute_uri
from geco.tracking import lineage_tags, start_run
from pipelines.cluster import s3_filesystem
from pipelines.training.datasets import DatasetInfo, split_info, training_datasets
from pipelines.training.preflight import preflight
from pipelines.training.progress import DriverProgress
from pipelines.training.worker import RESULT_FILE, section, task_path, train_loop_per_worker

log = logging.getLogger(__name__)


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
    mlflow_run_ids: dict[str, str] = field(default_factory=dict)  # the stage's runs, by name (see run_training)

    def how(self) -> str:
        """How the job got to its step: " (already complete)", " (resumed from step N)" or ""."""
        if self.already_complete:
            return " (already complete)"
        return f" (resumed from step {self.resumed_from})" if self.resumed_from else ""

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


def storage_uri_for(storage_path: str) -> str:
    """Where Ray Train keeps a job's runs, as a URI: ``s3://...`` as given, a local path made absolute."""
    return storage_path if storage.is_s3(storage_path) else storage_for(storage_path)[0]


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////abs/relative.db`` (workers run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    if uri.startswith("file:") or "://" in uri:
        return uri
    return str(Path(uri).resolve()) if uri else uri


def completed_run(result_uri: str, steps: int, output_uri: str) -> dict | None:
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


def completed_result(task_cls, run_name: str, storage_uri: str, done: dict, *, mlflow_run_id: str | None = None,
                     run_ids: Mapping[str, str] | None = None, seconds: float = 0.0) -> TrainResult:
    """The :class:`TrainResult` of a complete run, from its result file (:func:`completed_run`);
    ``mlflow_run_id`` / ``run_ids``: the runs of this invocation, if any (else the recorded ones)."""
    metrics = {**{f"train/{k}": v for k, v in done.get("train", {}).items()}, **done.get("eval", {})}
    return TrainResult(task=task_cls.name, run_name=run_name, storage_path=storage_uri, step=int(done["step"]),
                       resumed_from=None, checkpoint=done.get("checkpoint"), metrics=metrics,
                       exported=done["exported"], mlflow_run_id=mlflow_run_id or done.get("mlflow_run_id"),
                       seconds=seconds, already_complete=True,
                       mlflow_run_ids={**(done.get("mlflow_run_ids") or {}), **(run_ids or {})})


def run_name_for(task_cls, cfg: GecoConfig, job_path: str, stage: str, inputs: Mapping[str, str] | None = None) -> str:
    """The Ray Train run name: ``<job>.run_name``, else ``<cfg.name>-<stage>-<task config hash>``."""
    job = section(cfg, job_path)
    return job.run_name or f"{cfg.name}-{stage}-{task_cls.config_hash(cfg, job, inputs)}"


def torch_trainer_class():
    """Ray Train's ``TorchTrainer`` without its placement-group cleaner.

    Ray 2.60 starts a detached ``PlacementGroupCleaner`` per run that polls the State API for the
    controller and removes the run's placement group when the answer is "not found": on a loaded head
    that answer comes for a live controller, the group goes, its workers die ("Destroying worker since
    its placement group was removed") and the run burns a restart or fails (seen here twice; Ray's
    fix, ray-project/ray#65447, treats "not found" as transient). The cleaner only matters when a
    controller dies without its driver: here the driver is the stage's process (``geco``, or a
    ``ray job submit`` job), whose exit releases its placement groups anyway. So it is left out;
    where Ray's internals differ (another version), the stock trainer is used."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # pragma: no cover - another Ray version
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):  # pragma: no cover - another Ray version
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def run_training(task_cls, cfg: GecoConfig, job_path: str, *, stage: str, datasets: dict, output_uri: str,
                 inputs: Mapping[str, str] | None = None, tracker=None, log_weights: bool | Sequence[str] = True,
                 run_ids: Mapping[str, str] | None = None, run_name: str | None = None,
                 parallel_strategy: str = "ddp", parallel_strategy_kwargs: dict | None = None) -> TrainResult:
    """Run ``task_cls`` under Ray Train as configured by ``section(cfg, job_path)``.

    ``datasets``: ``{"train": Dataset, "val": Dataset}``; ``output_uri``: where the final weights go
    (local or s3://); ``inputs``: the stage's input URIs by name, handed to the task as they are;
    ``tracker``: an open :class:`geco.tracking.Tracker` whose MLflow run the workers log into
    (``None`` or disabled: no MLflow); ``log_weights``: log the exported weights as artifacts (all,
    or only those named); ``run_ids``: the MLflow runs of this stage by name, kept in the result
    file so a no-op re-run can name them. Raises ``ray.train.TrainingFailedError`` when the job
    fails beyond ``max_failures`` restarts.

    ``parallel_strategy`` ("ddp" or "fsdp", with ``parallel_strategy_kwargs`` for the wrapper) is
    what ``ctx.wrap(module)`` asks ``ray.train.torch.prepare_model`` for in a multi-worker run; a task
    may ask for another one per module: ``ctx.wrap(module, parallel_strategy="ddp")``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    t0 = time.perf_counter()
    job = section(cfg, job_path)
    inputs = dict(inputs or {})
    run_name = run_name or run_name_for(task_cls, cfg, job_path, stage, inputs)
    storage_path, fs = storage_for(job.storage_path)
    storage_uri = storage_uri_for(job.storage_path)
    output_uri = absolute_uri(output_uri)
    run_id = tracker.run_id if tracker is not None and tracker.enabled else None
    tracking_uri = absolute_tracking_uri(cfg.tracking.uri) if run_id else ""
    if tracker is not None and tracker.enabled:
        tracker.log_params({"train.task": task_path(task_cls), "train.run_name": run_name,
                            "train.storage": storage.join(storage_uri, run_name),
                            "train.config_hash": task_cls.config_hash(cfg, job, inputs), "train.output_uri": output_uri})
        tracker.set_tags({"geco.train.run_name": run_name})

    resources = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = job.gpus_per_worker
    env = faults.forward()  # test-only fault points (geco.faults); empty unless a test turns them on
    if job.torch_threads:
        env["OMP_NUM_THREADS"] = str(job.torch_threads)
    result_uri = storage.join(storage_uri, run_name, RESULT_FILE)
    done = completed_run(result_uri, job.steps, output_uri)
    if done is not None:  # nothing to train: do not start a cluster job for it
        log.info("%s: run %s is complete (step %d); its weights are in place", stage, run_name, done["step"])
        return completed_result(task_cls, run_name, storage_uri, done, mlflow_run_id=run_id, run_ids=run_ids,
                                seconds=time.perf_counter() - t0)
    if storage.exists(result_uri):
        storage.delete(result_uri)  # rewritten by rank 0 when this run ends
    progress = DriverProgress(f"{stage} steps", job.steps)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # the same rows in the same order every epoch: exact data positions
    trainer = torch_trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg_json": cfg.model_dump_json(), "job_path": job_path, "task": task_path(task_cls),
                           "tracking_uri": tracking_uri, "run_id": run_id, "output_uri": output_uri,
                           "log_weights": (log_weights if isinstance(log_weights, bool) else list(log_weights))
                           if run_id else False, "result_uri": result_uri, "inputs": inputs,
                           "run_ids": dict(run_ids or {}),
                           "storage_uri": storage_uri, "run_name": run_name, "progress_actor": progress.actor_name,
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
    with progress:
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
                       seconds=time.perf_counter() - t0, mlflow_run_ids=dict(run_ids or {}))




# ---------------------------------------------------------------------------------------------
# a training stage
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainJob:
    """One Ray Train job of a stage: ``name`` (its key in the results and its MLflow child run),
    the task class, its config section, which exported weights to log as MLflow artifacts, and
    the parallel strategy ``ctx.wrap`` asks for."""

    name: str
    task: type
    job_path: str
    log_weights: bool | tuple[str, ...] = True
    parallel_strategy: str = "ddp"
    parallel_strategy_kwargs: Mapping[str, Any] | None = None


@dataclass
class StageRun:
    """What :func:`run_training_stage` did."""

    results: dict[str, TrainResult]  # per job name
    info: DatasetInfo  # train/val objects
    mlflow_run_ids: dict[str, str] = field(default_factory=dict)  # {stage: id, "<stage>/<job>": id}
    did_work: bool = True  # False: every job was complete already (nothing trained, no MLflow run)
    seconds: float = 0.0


def run_training_stage(cfg: GecoConfig, stage: str, jobs: Sequence[TrainJob], *, dataset_uri: str, output_uri: str,
                       inputs: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                       concurrent: bool = False, child_runs: bool | None = None,
                       tags: Mapping[str, str] | None = None) -> StageRun:
    """Pre-flight, the "already complete" shortcut, datasets, the stage's MLflow run
    ``<cfg.name>/<stage>`` (a child of ``parent_run_id``; with ``child_runs`` - default: when there
    are several jobs - one child run ``<cfg.name>/<stage>/<job>`` per job), :func:`run_training` per job (side by side with
    ``concurrent``), the exported URIs as tags ``geco.<what>_uri``. ``inputs``: the stage's input
    URIs, handed to every task; ``tags``: lineage tags for the stage's run (e.g. its inputs).
    Raises :class:`~pipelines.training.preflight.TrainSetupError` before anything is written."""
    t0 = time.perf_counter()
    inputs = dict(inputs or {})
    output_uri = absolute_uri(output_uri)
    job_paths = [j.job_path for j in jobs]
    manifest = preflight(cfg, job_paths, dataset_uri=dataset_uri, output_uri=output_uri, concurrent=concurrent)
    first = section(cfg, jobs[0].job_path)
    info, _ = split_info(dataset_uri, manifest, holdout_fraction=cfg.dataset.holdout_fraction,
                         eval_objects=first.eval_objects)

    # every job reached its steps and its weights are in place: nothing to do, no MLflow run
    job_stage = {j.name: stage if j.name == stage else f"{stage}-{j.name}" for j in jobs}  # in the run name
    names = {j.name: run_name_for(j.task, cfg, j.job_path, job_stage[j.name], inputs) for j in jobs}
    stores = {j.name: storage_uri_for(section(cfg, j.job_path).storage_path) for j in jobs}
    done = {j.name: completed_run(storage.join(stores[j.name], names[j.name], RESULT_FILE),
                                  section(cfg, j.job_path).steps, output_uri) for j in jobs}
    if all(d is not None for d in done.values()):
        results = {}
        run_ids: dict[str, str] = {}
        for j in jobs:
            results[j.name] = completed_result(j.task, names[j.name], stores[j.name], done[j.name])
            run_ids.update(results[j.name].mlflow_run_ids)
        log.info("%s: every job is complete (%s): nothing to do", stage, ", ".join(names.values()))
        return StageRun(results, info, run_ids, did_work=False, seconds=time.perf_counter() - t0)

    # one Dataset per job: concurrent jobs never share an execution
    data = {}
    for j in jobs:
        train_ds, val_ds, info = training_datasets(dataset_uri, manifest, holdout_fraction=cfg.dataset.holdout_fraction,
                                                   eval_objects=section(cfg, j.job_path).eval_objects,
                                                   training_input=cfg.dataset.training_input)
        data[j.name] = {"train": train_ds, "val": val_ds}

    lineage = lineage_tags(cfg, dataset_uri=dataset_uri, inputs=inputs)  # code, config, data, input weights
    with start_run(cfg.tracking, run_name=f"{cfg.name}/{stage}", parent_run_id=parent_run_id,
                   tags={"geco.stage": stage, **lineage}) as tracker:
        run_ids = {stage: tracker.run_id} if tracker.run_id else {}
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.set_tags({"geco.dataset_uri": dataset_uri, f"geco.{stage}.val_source": info.val_source,
                          f"geco.{stage}.eval_keys": ",".join(info.eval_keys),
                          "geco.training_input": "materialized" if info.materialized else "streamed", **(tags or {})})
        tracker.log_metrics({"train_objects": info.train_objects, "val_objects": info.val_objects})

        def train(j: TrainJob, job_tracker, ids: dict[str, str]) -> TrainResult:
            return run_training(j.task, cfg, j.job_path, stage=job_stage[j.name],
                                datasets=data[j.name], output_uri=output_uri, inputs=inputs, tracker=job_tracker,
                                log_weights=j.log_weights, run_ids=ids, run_name=names[j.name],
                                parallel_strategy=j.parallel_strategy,
                                parallel_strategy_kwargs=dict(j.parallel_strategy_kwargs or {}))

        def train_in_child_run(j: TrainJob) -> TrainResult:
            # MLflow's active-run stack is per thread, and the tracker names its run: safe concurrently
            with start_run(cfg.tracking, run_name=f"{cfg.name}/{stage}/{j.name}", parent_run_id=tracker.run_id,
                           tags={"geco.stage": f"{stage}/{j.name}", **lineage}) as child:
                child.log_params(cfg.model_dump(mode="json"))
                ids = {**run_ids, f"{stage}/{j.name}": child.run_id} if child.run_id else dict(run_ids)
                result = train(j, child, ids)
                child.set_tags({f"geco.{what}_uri": uri for what, uri in result.exported.items()})
            return result

        if not (len(jobs) > 1 if child_runs is None else child_runs):
            results = {j.name: train(j, tracker, run_ids) for j in jobs}
        elif concurrent:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix=f"geco-{stage}") as pool:
                futures = {j.name: pool.submit(train_in_child_run, j) for j in jobs}
                results = {name: f.result() for name, f in futures.items()}
        else:
            results = {j.name: train_in_child_run(j) for j in jobs}
        for result in results.values():
            run_ids.update(result.mlflow_run_ids)
            tracker.set_tags({f"geco.{what}_uri": uri for what, uri in result.exported.items()})
        seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": seconds})
    return StageRun(results, info, run_ids, did_work=any(not r.already_complete for r in results.values()),
                    seconds=seconds)
