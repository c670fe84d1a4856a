"""Whether processes a test killed (or expects gone) have exited: a zombie counts as gone, since it
only waits for its parent to reap it (test_render_pipeline's orphaned Blender, test_stage2's
killed driver and its Ray)."""
from __future__ import annotations

import time


def alive(pid: int) -> bool:
    """Running: the process exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every one of ``pids`` to exit; the ones still running."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
