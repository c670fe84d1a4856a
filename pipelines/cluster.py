"""Joining Ray, and the pyarrow S3 filesystem Ray Data / Ray Train use: one place for each.

:func:`init_ray` is the one place Ray is started or joined. Two decisions live here:

* **Loopback only.** ``address: local`` starts an embedded Ray for this process alone, so every
  socket it opens (GCS, raylet, object manager, the driver, the dashboard and its agents) listens on
  127.0.0.1. On Linux Ray otherwise advertises and binds the machine's outward address: with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read by the processes Ray spawns, and by Ray's constants at
  import in this one) it resolves its node address to loopback. Joining a cluster (``auto``,
  ``ray://``) changes nothing: a cluster's addresses are its operator's choice.
* **A quiet console.** Ray's own log lines (start-up notices, Ray Data's execution plans and
  progress logs, Ray Train's controller) go to ``geco-driver.log`` in Ray's session log folder
  (``/tmp/ray/session_latest/logs`` by default), next to the logs of Ray's processes; the console keeps
  Ray's errors, one progress bar per Ray Data dataset in a terminal, and everything the project logs.
  Python warnings raised inside Ray's own code go to the same file.
  Workers' stdout/stderr stay in that folder (``worker-*.out|err``) instead of being forwarded to the
  driver. :func:`ray_log_dir` names the folder, so summaries and errors can point at it.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import warnings

from geco import storage

LOOPBACK = "127.0.0.1"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray resolves its node address to loopback
DRIVER_LOG = "geco-driver.log"  # Ray's driver-side log lines, in Ray's session log folder

_RAY_LOGGERS = ("ray", "ray.data")  # ray.data does not propagate to "ray" (ray.train does, on the driver)


class RayStartError(RuntimeError):
    """Ray could not be started (``local``) or joined (a cluster address): the message names the address."""


def init_ray(address: str) -> None:
    """Start an embedded Ray (``"local"``, bound to loopback) or join a cluster (``"auto"``,
    ``ray://...``) unless this process is already connected (tests, ``ray job submit`` drivers, a DAG
    running stages); then send Ray's driver-side logs to :data:`DRIVER_LOG` in its log folder.
    Raises :class:`RayStartError` when Ray cannot be started or joined."""
    if address == "local":
        os.environ[CLUSTER_ENV] = "0"  # before Ray is imported here, and for the processes it spawns
    import ray
    import ray.data  # configures Ray Data's loggers on import: quieted below, not after our set-up

    early = None
    if not ray.is_initialized():
        kwargs: dict = {}
        if address == "local":
            # Ray read CLUSTER_ENV at import; if something imported it earlier, say it again
            # (the constant is looked up at call time by the node-address resolution)
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
            kwargs = {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
        _quiet_ray_console()
        early = _hold_ray_logs()  # until the session's log folder exists
        try:
            ray.init(address=address, log_to_driver=False, **kwargs)
        except Exception as e:  # ray.init raises ConnectionError, TimeoutError, even a bare Exception (start-up timeout)
            what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            how = ("is the machine overloaded or out of memory? Ray's logs are under /tmp/ray/session_latest/logs"
                   if address == "local" else "start the cluster (ray start / ray up) or fix ray.address")
            raise RayStartError(f"ray.address={address}: cannot {'start' if address == 'local' else 'join'} "
                                f"Ray ({what}); {how}") from None
        finally:
            _release(early)
    _ray_logs_to_file(early)
    if not getattr(warnings.showwarning, "geco_ray_to_log", False):
        warnings.showwarning = _ray_warnings_to_log(warnings.showwarning)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False  # one bar per dataset, not one per operator
    ctx.print_on_execution_start = False  # execution plans: in the log file


def ray_log_dir() -> str | None:
    """Ray's session log folder on this machine (None before Ray is started or joined)."""
    import ray

    node = ray._private.worker._global_node  # noqa: SLF001 (no public accessor for the logs folder)
    return node.get_logs_dir_path() if node is not None else None


def _quiet_ray_console() -> None:
    """Ray's console handlers show errors only (its start-up notices would come before the file exists)."""
    for name in _RAY_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.ERROR))


def _hold_ray_logs() -> logging.handlers.MemoryHandler:
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    held.setLevel(logging.INFO)
    for name in _RAY_LOGGERS:
        logging.getLogger(name).addHandler(held)
    return held


def _release(held: logging.handlers.MemoryHandler) -> None:
    for name in _RAY_LOGGERS:
        logging.getLogger(name).removeHandler(held)


def _ray_logs_to_file(held: logging.handlers.MemoryHandler | None = None) -> None:
    """A file handler on Ray's loggers (once per folder), which first receives what ``held`` kept."""
    _quiet_ray_console()
    folder = ray_log_dir()
    if folder is None:
        return
    path = os.path.join(folder, DRIVER_LOG)
    handler = next((h for h in logging.getLogger("ray").handlers
                    if isinstance(h, logging.FileHandler) and h.baseFilename == path), None)
    if handler is None:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)s -- "
                                               "%(message)s"))
        for name in _RAY_LOGGERS:
            logging.getLogger(name).addHandler(handler)
    if held is not None:
        held.setTarget(handler)
        held.close()  # flushes what Ray logged while it started


def _ray_warnings_to_log(show):
    """``warnings.showwarning`` that sends warnings raised inside Ray's own code (deprecations of
    options it sets itself) to the ``ray`` logger, i.e. the log file; others are shown as before."""
    ray_dir = f"{os.sep}ray{os.sep}"

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if ray_dir in str(filename):
            logging.getLogger("ray").warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.geco_ray_to_log = True
    return showwarning


def s3_filesystem():
    """A pyarrow S3 filesystem for the endpoint in the standard AWS environment (Ray Data reads,
    Ray Train storage); credentials come from the same environment, never from configs, and
    timeouts/retries from :func:`geco.storage.s3_settings` (``GECO_S3_*``)."""
    import pyarrow.fs

    endpoint = storage.s3_endpoint()
    st = storage.s3_settings()  # GECO_S3_* timeouts and retries, as for boto3 (request_timeout is
    # curl's low-speed limit on Linux: no byte for that long ends the request)
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                    "connect_timeout": st.connect_timeout, "request_timeout": st.read_timeout,
                    "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=st.max_attempts)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    return pyarrow.fs.S3FileSystem(**kwargs)
