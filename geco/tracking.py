"""MLflow helpers: one parent run per DAG, one child run per stage, one wrapper (:class:`Tracker`).

The embedded default tracks to a local sqlite file (``sqlite:///mlruns.db``); a cluster points
``tracking.uri`` at an MLflow server. Nothing here imports Ray: the pipelines call these from the
driver (or from rank 0 of a Ray Train job).

A driver that is killed leaves its runs RUNNING forever. :func:`start_run` tags each run with its
owner (``geco.owner``: host, pid and the process's start time, so a reused pid is not mistaken for
the owner) and, before opening a run, marks earlier RUNNING runs of the same name in the experiment
KILLED when their owner is gone: on this host, when that process no longer exists; on another host
(which this process cannot inspect), or without an owner tag, only when the run started more than
``tracking.stale_run_hours`` ago (0, the default: never).

**Lineage.** Every run carries the tags of :func:`lineage_tags` (given to :func:`start_run` by the stage
that opens it), so any metric traces back to the exact code, config, data and weights:
``geco.git.commit`` / ``geco.git.dirty`` (``none`` outside a git checkout), ``geco.config_hash`` (of
the whole validated config), ``geco.dataset.uri`` / ``geco.dataset.manifest_uri`` /
``geco.dataset.manifest_hash`` (the latest shard manifest version and its sha256; ``none`` before
the first render) and ``geco.input.<name>`` (each input checkpoint URI). URIs are logged without
any ``user:password@`` part: nothing secret goes into tags.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from geco import storage
from geco.images import grid, resize_nearest, upscale_factor, upscale_nearest


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists become JSON strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class Tracker:
    """The one MLflow wrapper: logs into one run, by id, through an ``MlflowClient``.

    :func:`start_run` opens a run on the driver and yields its tracker; :meth:`attach` logs into a
    run opened elsewhere (rank 0 of a Ray Train job gets the run id from the driver). A disabled
    tracker (no run id) accepts every call and does nothing, so stage code never branches on it.
    Every call names its run, so trackers of several runs are safe side by side (threads included).
    """

    def __init__(self, run_id: str | None = None, client=None):
        self._run_id = run_id
        self.client = client

    @classmethod
    def attach(cls, tracking_uri: str = "", run_id: str | None = None) -> "Tracker":
        """A tracker for the existing run ``run_id`` (None or "": disabled)."""
        if not run_id:
            return cls()
        from mlflow import MlflowClient  # lazy: MLflow takes seconds to import and is optional per run

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return cls(run_id, MlflowClient(tracking_uri=tracking_uri or None))

    @property
    def enabled(self) -> bool:
        return self.client is not None and bool(self._run_id)

    @property
    def run_id(self) -> str | None:
        return self._run_id if self.enabled else None

    def log_params(self, params: dict) -> None:
        if self.enabled:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.client.log_batch(self._run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """``model_id``: also attach them to that MLflow LoggedModel (its page and its registered versions)."""
        if self.enabled and metrics:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            items = [Metric(k, float(v), ts, step or 0, model_id=model_id) for k, v in metrics.items()]
            for i in range(0, len(items), 200):
                self.client.log_batch(self._run_id, metrics=items[i:i + 200])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and tags:
            from mlflow.entities import RunTag

            items = [RunTag(k, str(v)) for k, v in tags.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self._run_id, tags=items[i:i + 100])

    def log_image(self, image: np.ndarray, name: str) -> None:
        """``image`` HxWx{3,4} uint8, saved as ``name`` (a .png path inside the run's artifacts)."""
        if self.enabled:
            self.client.log_image(self._run_id, image, artifact_file=name)

    def log_dict(self, data: Any, name: str) -> None:
        if self.enabled:
            self.client.log_dict(self._run_id, data, name)

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table artifact (``name`` ends with .json), viewable in the UI."""
        if self.enabled and rows:
            columns = sorted({k for r in rows for k in r})
            self.client.log_table(self._run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self._run_id, text, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self._run_id, str(path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Every file under ``local_dir``, under ``artifact_path``."""
        if self.enabled:
            self.client.log_artifacts(self._run_id, str(local_dir), artifact_path)


def artifact_location(tracking_cfg) -> str | None:
    """Where a new experiment stores artifacts: ``tracking.artifact_location``, else for a sqlite
    store ``<folder of the .db>/mlartifacts``, else None (the tracking server decides)."""
    if tracking_cfg.artifact_location:
        loc = tracking_cfg.artifact_location
        return loc if "://" in loc else Path(loc).expanduser().resolve().as_uri()
    prefix = "sqlite:///"
    if tracking_cfg.uri.startswith(prefix):
        return (Path(tracking_cfg.uri[len(prefix):]).expanduser().resolve().parent / "mlartifacts").as_uri()
    return None


# ---------------------------------------------------------------------------------------------
# lineage
# ---------------------------------------------------------------------------------------------
_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout geco is imported from
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://host/...`` (other URIs unchanged)."""
    return _USERINFO.sub(r"\1", str(uri))


def git_state(root: str | Path = _SOURCE_ROOT) -> tuple[str, str]:
    """(commit, dirty) of the git checkout at ``root``: ("<sha>", "true"/"false"), or ("none", "none")
    when it is not a git checkout (an installed wheel, a Ray worker's unpacked working_dir) or git is
    missing. Dirty means tracked files differ from the commit (untracked files do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "none", "none"
    return commit, "true" if dirty else "false"


def config_hash(cfg) -> str:
    """A short sha256 of the whole validated config (a pydantic model or a plain dict)."""
    data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_lineage(dataset_uri: str) -> tuple[str, str]:
    """(URI, sha256) of the latest shard manifest version under ``dataset_uri``; ("none", "none")
    before the first render; ("unreadable", reason) when the store cannot be read."""
    from geco.data import shards  # lazy: only runs with a dataset need it

    try:
        versions = shards.list_manifest_versions(dataset_uri)
        if not versions:
            return "none", "none"
        uri = shards.manifest_uri(dataset_uri, versions[-1])
        return uri, hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except Exception as e:  # never fail a run for its tags; the tag says why
        return "unreadable", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:250]


def lineage_tags(cfg, *, dataset_uri: str | None = None, inputs: Mapping[str, str] | None = None) -> dict[str, str]:
    """The lineage tags of a run (module docstring): code, config, data, input checkpoints.

    ``cfg``: the run's :class:`~geco.config.GecoConfig`; ``dataset_uri``: the shards the run reads or
    writes (None: no dataset tags); ``inputs``: input checkpoint URIs by name ("" = none: tiny random)."""
    commit, dirty = git_state()
    tags = {"geco.git.commit": commit, "geco.git.dirty": dirty, "geco.config_hash": config_hash(cfg)}
    if dataset_uri:
        manifest, digest = manifest_lineage(dataset_uri)
        tags.update({"geco.dataset.uri": redact_uri(dataset_uri), "geco.dataset.manifest_uri": redact_uri(manifest),
                     "geco.dataset.manifest_hash": digest})
    for name, uri in (inputs or {}).items():
        tags[f"geco.input.{name}"] = redact_uri(uri) if uri else "none"
    return tags


OWNER_TAG = "geco.owner"  # "host:pid:start" of the process that opened the run


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return ""


def owner(pid: int | None = None) -> str:
    """``host:pid:start`` of this process (or of ``pid`` on this host)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _owner_gone(tag: str) -> bool | None:
    """True: the owner was a process of this host that no longer exists (or whose pid another process
    now has); False: it is alive; None: not decidable here (another host, or no tag)."""
    host, _, rest = (tag or "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        pass
    return bool(start) and _process_start(int(pid)) not in ("", start)


def end_stale_runs(client, experiment_id: str, run_name: str, *, other_hosts_after_s: float = 0.0,
                   now_s: float | None = None) -> list[str]:
    """Mark RUNNING runs named ``run_name`` in the experiment KILLED when their owner is gone (see
    the module docstring); returns their ids. ``other_hosts_after_s`` 0: leave undecidable ones."""
    from mlflow.entities import ViewType

    now_s = time.time() if now_s is None else now_s
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        if run.info.run_name != run_name:
            continue
        gone = _owner_gone(run.data.tags.get(OWNER_TAG, ""))
        if gone is None:
            gone = other_hosts_after_s > 0 and now_s - run.info.start_time / 1000 > other_hosts_after_s
        if gone:
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def start_run(tracking_cfg, run_name: str, *, parent_run_id: str | None = None,
              tags: dict | None = None) -> Iterator[Tracker]:
    """Open an MLflow run (nested under ``parent_run_id`` when given); yields a :class:`Tracker`.

    ``tracking_cfg`` is a :class:`geco.config.TrackingConfig`. When tracking is disabled the
    tracker is a no-op, so stage code never branches on it.
    """
    if not tracking_cfg.enabled:
        yield Tracker()
        return
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_cfg.uri)
    if mlflow.get_experiment_by_name(tracking_cfg.experiment) is None:
        location = artifact_location(tracking_cfg)
        try:
            mlflow.create_experiment(tracking_cfg.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            pass
    experiment = mlflow.set_experiment(tracking_cfg.experiment)
    end_stale_runs(mlflow.MlflowClient(), experiment.experiment_id, run_name,
                   other_hosts_after_s=tracking_cfg.stale_run_hours * 3600)
    run_tags = {**(tags or {}), OWNER_TAG: owner()}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, tags=run_tags, nested=mlflow.active_run() is not None) as run:
        yield Tracker(run.info.run_id, mlflow.MlflowClient())


def image_grid(images: list[np.ndarray], cols: int, pad: int = 2, bg: int = 255, min_tile: int = 128) -> np.ndarray:
    """Tile HxWx3 uint8 images (resized by nearest neighbour to the first's size) into a grid of
    ``cols`` columns, scaled up by nearest neighbour to tiles of at least ``min_tile`` px (geco.images)."""
    if not images:
        return np.full((8, 8, 3), bg, np.uint8)
    h, w = images[0].shape[:2]
    k = upscale_factor(images[:1], min_tile)
    tiles = [upscale_nearest(resize_nearest(im, (h, w)), k) for im in images]
    return grid([tiles[i:i + cols] for i in range(0, len(tiles), cols)], pad, bg, cols=cols)
