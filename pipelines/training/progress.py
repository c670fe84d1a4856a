"""A training job's step count on the driver's console.

Workers' output is not forwarded to the driver (``pipelines.cluster.init_ray``: Ray's internals go
to the log folder), so rank 0 cannot draw its own progress bar where a person looks. Instead:

    driver                                        rank 0 (every step, at most every 0.5 s)
    with DriverProgress(name, steps) as p:        reporter = StepReporter(p.actor_name)
        trainer.fit()   # a thread polls p's      reporter.update(step, {"loss": ...})
                        # actor, draws a tqdm bar

The board is a named zero-CPU Ray actor owned by the driver, so it outlives worker restarts (a
restarted rank 0 finds it again by name) and works the same on a cluster. Progress is best effort:
a board that cannot be reached never fails training.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import uuid

import ray

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class _Board:
    def __init__(self) -> None:
        self.step, self.postfix = 0, {}

    def update(self, step: int, postfix: dict) -> None:
        self.step, self.postfix = step, postfix

    def read(self) -> tuple[int, dict]:
        return self.step, self.postfix


class DriverProgress:
    """Context manager: a board actor named :attr:`actor_name` and a tqdm bar fed from it."""

    def __init__(self, desc: str, steps: int, initial: int = 0, poll_s: float = 0.5):
        self.desc, self.steps, self.initial, self.poll_s = desc, steps, initial, poll_s
        self.actor_name = f"geco-progress-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._actor = None

    def __enter__(self) -> DriverProgress:
        from tqdm.auto import tqdm

        try:
            self._actor = _Board.options(name=self.actor_name).remote()
        except Exception as e:  # noqa: BLE001 - progress is best effort
            log.debug("no progress board: %s", e)
            return self
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=self.steps, initial=self.initial, desc=self.desc, unit="step",
                         mininterval=0.5 if tty else 10.0, dynamic_ncols=tty)
        self._thread = threading.Thread(target=self._poll, name="geco-progress", daemon=True)
        self._thread.start()
        return self

    def _show(self) -> None:
        step, postfix = ray.get(self._actor.read.remote(), timeout=10)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._show()
            except Exception as e:  # noqa: BLE001 - e.g. the cluster going down with the job
                log.debug("progress board: %s", e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                self._show()  # the last step
            except Exception:  # noqa: BLE001
                pass
            self._bar.close()
        if self._actor is not None:
            ray.kill(self._actor)


class StepReporter:
    """Rank 0's side: sends the step and a few numbers to the driver's board, at most every
    ``min_interval_s`` (fire and forget). Ranks other than 0, or no board name: does nothing."""

    def __init__(self, actor_name: str | None, rank: int, min_interval_s: float = 0.5):
        self._actor, self._last, self.min_interval_s = None, 0.0, min_interval_s
        if actor_name and rank == 0:
            try:
                self._actor = ray.get_actor(actor_name)
            except Exception as e:  # noqa: BLE001 - progress is best effort
                log.debug("no progress board %s: %s", actor_name, e)

    def update(self, step: int, postfix: dict | None = None, force: bool = False) -> None:
        if self._actor is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self.min_interval_s:
            self._last = now
            try:
                self._actor.update.remote(step, dict(postfix or {}))
            except Exception as e:  # noqa: BLE001
                log.debug("progress board: %s", e)
