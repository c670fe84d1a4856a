"""Pre-flight: everything a user can get wrong, checked before a training stage writes anything.

:func:`preflight` runs before any MLflow run, Ray Train run or output folder exists, and fails with
a :class:`TrainSetupError` (or :class:`geco.storage.StorageError`) whose one line names the input
and the fix:

* the dataset (:func:`check_dataset`): no such folder, no manifest, a shard file its current
  samples live in is gone, **or is not the file the manifest recorded** (its size differs: a
  truncated upload or copy; with ``dataset.verify_hashes`` its sha256 too), no train objects, or
  too few objects to hold one out for evaluation. Without this a truncated shard surfaces deep in
  Ray Data as a ``tarfile.ReadError`` naming no shard (and a streamed run restarts its workers
  ``max_failures`` times on the same error first), or as objects silently missing;
* the Ray cluster (:func:`check_resources`): its workers do not fit on the nodes (``use_gpu`` with
  too few GPUs, more CPUs than there are), or leave no CPU for Ray Data: Ray Train would wait
  forever (``wait_for_resources`` skips this for autoscaling clusters);
* the output and every job's Ray Train storage can be written.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from geco import storage
from geco.config import GecoConfig
from geco.data.shards import current_samples, read_latest_manifest
from pipelines.cluster import init_ray
from pipelines.training.worker import section


class TrainSetupError(ValueError):
    """A training job cannot start for a reason the user can fix (data, targets, config)."""


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _sha256(uri: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(uri) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _damaged(root: str, shards: list[dict], verify_hashes: bool) -> list[tuple[str, str]]:
    """``[(shard name, what is wrong)]`` for shards whose size (and, with ``verify_hashes``, sha256)
    differ from what the manifest recorded when they were committed."""
    def check(shard: dict) -> tuple[str, str] | None:
        uri = storage.join(root, shard["name"])
        want = shard.get("bytes")
        size = storage.stat(uri)["size"]
        if want is not None and size != int(want):
            return shard["name"], f"{size} bytes, the manifest recorded {int(want)}"
        if verify_hashes and shard.get("sha256") and _sha256(uri) != shard["sha256"]:
            return shard["name"], "its sha256 differs from the manifest's"
        return None

    with ThreadPoolExecutor(min(16, max(1, len(shards)))) as pool:  # S3: one HEAD (or read) per shard
        return [bad for bad in pool.map(check, shards) if bad is not None]


def check_dataset(dataset_uri: str, *, verify_hashes: bool = False) -> dict:
    """The latest manifest of ``dataset_uri`` once it is fit to train on, else :class:`TrainSetupError`:
    no manifest; a shard file that its current samples live in is gone, or differs in size from the
    manifest's record (``verify_hashes``: or in sha256, which reads every shard); no train objects;
    or too few objects to hold one out for evaluation. Lists the dataset folder once (local or s3://)."""
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
    damaged = _damaged(root, [s for s in manifest["shards"] if s["name"] in live], verify_hashes)
    if damaged:
        names = sorted(name for name, _ in damaged)
        objects = sum(len(live[name]) for name in names)
        raise TrainSetupError(
            f"dataset.uri={dataset_uri}: {len(names)} shard file(s) are not the files its {version} recorded "
            f"({'; '.join(f'{n}: {why}' for n, why in sorted(damaged)[:3])}"
            f"{f' ... ({len(names)} in all)' if len(names) > 3 else ''}; {objects} object(s)): truncated or damaged "
            f"in a copy or upload. Copy them again from where they were rendered, or delete them with their "
            f"index files ({_few([n[:-len('.tar')] + '.json' for n in names], 3)}) and re-run `geco render --config "
            "<config>`: it renders again the objects that no committed shard holds")
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
    import ray  # lazy: the CLI imports the stages before it knows it will train

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
    then). Returns the manifest: the stage reads it once, here, and passes it down."""
    manifest = check_dataset(dataset_uri, verify_hashes=cfg.dataset.verify_hashes)
    check_cluster(cfg, job_paths, concurrent=concurrent)
    storage.check_writable(output_uri)
    for path in job_paths:
        storage.check_writable(section(cfg, path).storage_path)
    return manifest
