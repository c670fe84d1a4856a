"""Own one Blender render process and survive whatever an object does to it. Pure Python, no Ray.

:class:`BlenderRenderer` starts ``python -m geco.render.blender.server`` lazily (BlenderProc set
up once), sends it one object at a time over a pipe, and turns every outcome into a
:class:`RenderResult`:

* Blender raised (a broken file, no faces, unsupported type): ``ok=False`` with Blender's
  reason; the same process renders the next object.
* no reply within ``timeout_s``: the whole process group is killed, ``ok=False`` ("timed out"),
  and the next call starts a fresh process.
* the process died mid-object: ``ok=False`` with its exit status and the tail of its log; the next
  call starts a fresh process.
* after ``max_objects_per_process`` objects the process is recycled (bounded leaks);
  ``fresh_process=True`` starts a process for every object (the Objaverse-XL way, for benchmarks).

The child's fd 1/2 (Blender's C output included) go to a log file; the protocol runs on two
dedicated pipes. The child's exit status is never used to judge success (such a process
segfaults at interpreter exit); the reply is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

_PROJECT_ROOT = str(Path(__file__).resolve().parents[3])  # the folder holding the geco package
# Members scene.render_object writes (and nothing else: out_dir may hold other files).
_MEMBER_RE = re.compile(r"^(cond|\d{3,})(\.png|\.depth\.npy|\.normal\.png)$|^(meta|cameras)\.json(\.tmp)?$")


@dataclass
class RenderResult:
    ok: bool
    reason: str = ""  # why it failed (empty when ok)
    log_tail: str = ""  # the end of the Blender process's output during this object
    seconds: float = 0.0  # wall time of this object's render request (start-up excluded)
    meta: dict = field(default_factory=dict)  # scene.render_object's meta (when ok)
    startup_seconds: float = 0.0  # start-up of a Blender process paid by this call (0 if reused)
    object_id: str = ""


class RendererStartupError(RuntimeError):
    """The Blender process did not come up (broken install, missing package, ...)."""


class _ChildGone(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class _Timeout(Exception):
    pass


class BlenderRenderer:
    """One Blender server subprocess, started lazily and restarted as needed.

    ``log_dir``: where ``<name>.log`` (the current process's output) lives; default a private
    temporary directory. ``env``: extra environment variables for the child. ``python``: the
    interpreter that has ``bpy`` (default: this one).
    """

    def __init__(self, *, max_objects_per_process: int = 500, fresh_process: bool = False,
                 startup_timeout_s: float = 180.0, log_dir: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, python: str | None = None, name: str = "blender"):
        if max_objects_per_process < 1:
            raise ValueError("max_objects_per_process must be >= 1")
        self.max_objects_per_process = int(max_objects_per_process)
        self.fresh_process = bool(fresh_process)
        self.startup_timeout_s = float(startup_timeout_s)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="geco-blender-log-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}.log"
        self.extra_env = dict(env or {})
        self.python = python or sys.executable
        self.name = name
        self._proc: subprocess.Popen | None = None
        self._fd_req: int | None = None
        self._fd_rep: int | None = None
        self._rbuf = b""
        self._log_file = None
        self._tmp_dir: str | None = None  # the child's scratch folder, removed with the child
        self.objects_in_process = 0
        self.startups = 0  # processes started so far
        self.startup_seconds: list[float] = []  # wall time of each start-up (spawn to ready)
        self.info: dict[str, Any] = {}  # the last ready message (pid, blender version, ...)
        self.last_exit_code: int | None = None  # exit status of the last child that went away

    # ------------------------------------------------------------------ process management

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> float:
        """Start the child if none is running; returns the seconds spent (0 if already up)."""
        if self.alive:
            return 0.0
        self._discard()
        t0 = time.perf_counter()
        if self.log_path.exists():
            os.replace(self.log_path, self.log_path.with_suffix(".prev.log"))
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the child
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self._tmp_dir = tempfile.mkdtemp(prefix="geco-bproc-")
        # Blender makes its own temporary folder (blender_XXXXXX) under $TMPDIR and removes it at a clean
        # exit, which the server never has (it leaves with os._exit): inside ours, it goes with ours
        env["TMPDIR"] = self._tmp_dir
        try:
            self._proc = subprocess.Popen(
                [self.python, "-m", "geco.render.blender.server", "--in", str(req_r), "--out", str(rep_w),
                 "--tmp", self._tmp_dir],
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                pass_fds=(req_r, rep_w), env=env, start_new_session=True, cwd=_PROJECT_ROOT)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._fd_req, self._fd_rep, self._rbuf = req_w, rep_r, b""
        self.objects_in_process = 0
        try:
            ready = self._recv(time.monotonic() + self.startup_timeout_s)
        except _Timeout:
            tail = self._log_tail(0)
            self._kill()
            raise RendererStartupError(
                f"Blender process did not report ready within {self.startup_timeout_s:.0f}s\n{tail}") from None
        except _ChildGone as e:
            tail = self._log_tail(0)
            self._kill()
            raise RendererStartupError(f"Blender process died during start-up ({e.why})\n{tail}") from None
        if not ready.get("ready"):
            tail = self._log_tail(0)
            self._kill()
            raise RendererStartupError(f"Blender process failed to start: {ready.get('error')}\n{tail}")
        seconds = time.perf_counter() - t0
        self.info = ready
        self.startups += 1
        self.startup_seconds.append(seconds)
        return seconds

    def close(self, timeout_s: float = 15.0) -> None:
        """Ask the child to exit (it leaves with os._exit(0)); kill its process group if it won't."""
        if self._proc is None:
            return
        if self.alive:
            try:
                self._send({"op": "shutdown"}, time.monotonic() + timeout_s)
                self._recv(time.monotonic() + timeout_s)
                self._proc.wait(timeout=timeout_s)
            except (_Timeout, _ChildGone, subprocess.TimeoutExpired, OSError):
                pass
        self._kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort at garbage collection
        with contextlib.suppress(Exception):
            self._kill()

    def _kill(self) -> None:
        """Kill the child's whole process group (Blender may have helpers) and forget it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
        if proc is not None:
            self.last_exit_code = proc.poll()
        self._discard()

    def _discard(self) -> None:
        for fd in (self._fd_req, self._fd_rep):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd_req = self._fd_rep = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._proc is not None and self._proc.poll() is None:  # pragma: no cover
            self._proc.kill()
        self._proc = None
        self._rbuf = b""
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    # ------------------------------------------------------------------ protocol

    def _send(self, message: dict, deadline: float) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            _, writable, _ = select.select([], [self._fd_req], [], remaining)
            if not writable:
                continue
            try:
                n = os.write(self._fd_req, data[: 1 << 16])
            except (BrokenPipeError, OSError) as e:
                raise _ChildGone(self._exit_description() or f"request pipe closed ({e})") from None
            data = data[n:]

    def _recv(self, deadline: float) -> dict:
        while b"\n" not in self._rbuf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            readable, _, _ = select.select([self._fd_rep], [], [], min(remaining, 1.0))
            if not readable:
                continue
            chunk = os.read(self._fd_rep, 1 << 16)
            if not chunk:
                raise _ChildGone(self._exit_description(wait_s=5.0) or "reply pipe closed")
            self._rbuf += chunk
        line, self._rbuf = self._rbuf.split(b"\n", 1)
        return json.loads(line)

    def _exit_description(self, wait_s: float = 0.0) -> str:
        if self._proc is None:
            return ""
        try:
            code = self._proc.wait(timeout=wait_s) if wait_s else self._proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return ""
        if code < 0:
            try:
                return f"renderer process killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"renderer process killed by signal {-code}"
        return f"renderer process exited with status {code}"

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, since: int, max_chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(since, size - max_chars)
                f.seek(start)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ rendering

    def render(self, object_id: str, object_path: str | os.PathLike, cameras: list, settings: dict,
               out_dir: str | os.PathLike, timeout_s: float = 300.0) -> RenderResult:
        """Render one object; never raises for a problem with the object or the Blender process.

        ``cameras``: :class:`geco.cameras.Camera` objects or their ``to_dict()`` records (cond first).
        ``settings``: :func:`geco.render.views.blender_settings` output. Members land in ``out_dir``.
        """
        object_id = str(object_id)
        cams = [c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in cameras]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_outputs(out)

        if self.alive and self.objects_in_process >= self.max_objects_per_process:
            self.close()
        try:
            startup_s = self.start()
        except RendererStartupError as e:
            return RenderResult(ok=False, reason=f"renderer start-up failed: {str(e).splitlines()[0]}",
                                log_tail=str(e), object_id=object_id)

        log_from = self._log_size()
        request = {"op": "render", "object_id": object_id, "object_path": str(object_path),
                   "cameras": cams, "settings": dict(settings or {}), "out_dir": str(out)}
        t0 = time.perf_counter()
        deadline = time.monotonic() + float(timeout_s)
        self.objects_in_process += 1
        try:
            self._send(request, deadline)
            reply = self._recv(deadline)
        except _Timeout:
            seconds = time.perf_counter() - t0
            tail = self._log_tail(log_from)
            self._kill()
            _remove_stale_outputs(out)
            return RenderResult(ok=False, reason=f"timed out after {float(timeout_s):g}s (timeout_s); "
                                f"renderer process killed, a fresh one starts on next use",
                                log_tail=tail, seconds=seconds, startup_seconds=startup_s, object_id=object_id)
        except _ChildGone as e:
            seconds = time.perf_counter() - t0
            self._kill()
            tail = self._log_tail(log_from)
            _remove_stale_outputs(out)
            return RenderResult(ok=False, reason=f"renderer process died while rendering: {e.why}",
                                log_tail=tail, seconds=seconds, startup_seconds=startup_s, object_id=object_id)
        seconds = time.perf_counter() - t0
        if self.fresh_process:
            self.close()
        if reply.get("ok"):
            return RenderResult(ok=True, seconds=seconds, meta=reply.get("meta") or {},
                                startup_seconds=startup_s, object_id=object_id)
        _remove_stale_outputs(out)
        return RenderResult(ok=False, reason=str(reply.get("error") or "render failed"),
                            log_tail=self._log_tail(log_from) or str(reply.get("traceback", "")),
                            seconds=seconds, startup_seconds=startup_s, object_id=object_id)


def _remove_stale_outputs(out: Path) -> None:
    """Delete members a previous attempt may have left, so nothing half-written looks complete."""
    for p in out.iterdir():
        if p.is_file() and _MEMBER_RE.match(p.name):
            p.unlink()
