"""A long-lived Blender render process: ``python -m geco.render.blender.server --in FD --out FD``.

Started and driven by :class:`geco.render.blender.worker.BlenderRenderer`; not meant for people.

Protocol
--------
Arguments: ``--in FD --out FD`` (the two pipes) and ``--tmp DIR`` (BlenderProc's scratch folder).

Blender and BlenderProc write to file descriptors 1 and 2 from C (and BlenderProc redirects fd 1
while it renders), so neither carries the protocol: the parent passes two pipes, and their fd
numbers come as ``--in``/``--out``. Messages are one JSON object per line.

* On start the server sets BlenderProc up once and sends
  ``{"ready": true, "pid", "startup_s", "blender", "blenderproc"}`` (or ``{"ready": false,
  "error"}`` and exits).
* Request ``{"op": "render", "object_id", "object_path", "cameras", "settings", "out_dir"}`` ->
  ``{"ok": true, "object_id", "meta", "seconds"}`` or ``{"ok": false, "object_id", "error",
  "traceback", "seconds"}``. Outputs in ``out_dir`` are complete only when the reply says ok.
* ``{"op": "ping"}`` -> ``{"ok": true, "pong": true}``.
* ``{"op": "shutdown"}`` (or end of file on the request pipe: the parent is gone) -> reply, flush,
  ``os._exit(0)``. The process never exits through the interpreter: a Python process that set
  BlenderProc up on ``bpy`` segfaults at exit (Blender's C++ SpaceType registry frees
  Python-registered UI classes after Python has finalised). Nothing may read success from this
  process's exit status anyway; replies carry it.

Test-only fault points (:mod:`geco.faults`, inert unless ``GECO_TEST_FAULTS`` is set)
-----------------------------------------------------------------------------------------
``hang:<object_id>`` makes the server sleep forever when asked to render that object;
``crash:<object_id>`` makes it ``os._exit(1)`` after the first rendered frame of that object
(mid-render). Used by tests/integration/test_blender_render.py to exercise the worker's timeout
and crash handling. ``sigkill-actor:<object_id>:<marker>`` (its actor SIGKILLs itself, see
pipelines/render.py): the server appends ``holding <pid>`` to the marker when asked to render that
object, then holds it (at most 60 s) until the actor has written ``blender <pid>`` just before
dying, so the kill always lands mid-render however fast the render would be; a retry (that line
already there) renders at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

from geco import faults


def _send(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_lines(fd: int):
    buf = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _inject_fault(object_id: str) -> None:
    """Test-only: see the module docstring."""
    if any(args[:1] == [object_id] for args in faults.matching("hang")):
        print(f"[geco-render] {faults.ENV}: hanging on {object_id}", flush=True)
        while True:
            time.sleep(3600)
    if any(args[:1] == [object_id] for args in faults.matching("crash")):
        import bpy

        def _crash(*_args):
            # fd 2: BlenderProc redirects fd 1 into its progress-bar pipe while rendering
            os.write(2, f"[geco-render] {faults.ENV}: crashing mid-render on {object_id}\n".encode())
            os._exit(1)

        bpy.app.handlers.render_post.append(_crash)
    for oid, marker in faults.matching("sigkill-actor"):
        if oid == object_id:
            if "blender " in _read(marker):
                continue
            with open(marker, "a") as f:
                f.write(f"holding {os.getpid()}\n")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "blender " not in _read(marker):
                time.sleep(0.1)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Leave when the parent dies (e.g. a Ray actor killed with SIGKILL) instead of rendering on
    as an orphan: a daemon thread polls the parent pid (the request pipe's EOF covers the idle case)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.write(2, b"[geco-render] parent process died; exiting\n")
        os._exit(1)

    threading.Thread(target=watch, name="geco-parent-watchdog", daemon=True).start()


def serve(fd_in: int, fd_out: int, tmp_dir: str | None = None) -> None:
    t0 = time.perf_counter()
    _exit_with_parent()
    try:
        from geco.render.blender.adapter import load_blenderproc

        bproc = load_blenderproc(temp_dir=tmp_dir)
        import bpy

        from geco.render.blender.scene import render_object
    except BaseException as e:  # noqa: BLE001 - report anything, then leave
        traceback.print_exc()
        _send(fd_out, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        _exit(1)
    _send(fd_out, {"ready": True, "pid": os.getpid(), "startup_s": time.perf_counter() - t0,
                   "blender": bpy.app.version_string, "blenderproc": bproc.__version__})

    for request in _read_lines(fd_in):
        op = request.get("op")
        if op == "shutdown":
            _send(fd_out, {"ok": True, "bye": True})
            _exit(0)
        if op == "ping":
            _send(fd_out, {"ok": True, "pong": True})
            continue
        if op != "render":
            _send(fd_out, {"ok": False, "error": f"unknown op {op!r}"})
            continue
        object_id = str(request.get("object_id", ""))
        print(f"[geco-render] object {object_id}: {request.get('object_path')}", flush=True)
        t = time.perf_counter()
        try:
            _inject_fault(object_id)
            meta = render_object(request["object_path"], request["cameras"], request.get("settings") or {},
                                 request["out_dir"])
            reply = {"ok": True, "object_id": object_id, "meta": meta, "seconds": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - a broken object must not end the process
            traceback.print_exc()
            sys.stderr.flush()
            reply = {"ok": False, "object_id": object_id, "error": f"{type(e).__name__}: {e}".strip(),
                     "traceback": traceback.format_exc(limit=8), "seconds": time.perf_counter() - t}
        sys.stdout.flush()
        _send(fd_out, reply)
    # End of file: the parent went away.
    _exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="fd_in", type=int, required=True, help="request pipe fd")
    parser.add_argument("--out", dest="fd_out", type=int, required=True, help="reply pipe fd")
    parser.add_argument("--tmp", dest="tmp_dir", default=None,
                        help="scratch folder for BlenderProc's passes (the parent removes it)")
    args = parser.parse_args(argv)
    try:
        serve(args.fd_in, args.fd_out, args.tmp_dir)
    except BaseException:  # noqa: BLE001 - e.g. a malformed request: log it, leave without Python's exit
        traceback.print_exc()
        _exit(1)
    _exit(0)


if __name__ == "__main__":
    main()
