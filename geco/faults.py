"""Test-only fault injection: one switch, one place, inert unless a test turns it on.

The recovery paths of the pipeline (a training worker killed between steps or inside a checkpoint
report, a render actor killed with or without clean-up, a Blender child that hangs or crashes
mid-render) are tested by making the real processes die at chosen points. Those points call
:func:`matching`; everything they need is read from ONE environment variable,
``GECO_TEST_FAULTS``. Unset — always, outside the test suite — every hook is one dictionary
lookup that finds nothing, and nothing else changes.

The value is a comma-separated list of faults, each ``<kind>:<arg>:<arg>...``:

====================================================  ==================================================
``kill-at-step:<step>:<marker>[:<rank>]``             a training worker ``os._exit(1)`` right after
                                                      optimiser step ``<step>`` (rank 0 by default)
``kill-in-checkpoint:<step>:<marker>[:<rank>]``       a training worker ``os._exit(1)`` inside the
                                                      checkpoint report of ``<step>``: its files are
                                                      written, Ray Train never receives the report
``hold-at-step:<step>:<folder>``                     every training rank records itself (pid, Ray node
                                                      id) in ``<folder>/rank-<r>`` after that step, once,
                                                      and waits for its node to be removed
``kill-actor:<object id>:<marker>``                   a render actor closes its Blender, then exits
``sigkill-actor:<object id>:<marker>``                a render actor is SIGKILLed while its Blender
                                                      renders that object (no clean-up at all; the
                                                      child holds the object until the actor is gone)
``hang:<object id>``                                  the Blender child sleeps forever on that object
``crash:<object id>``                                 the Blender child exits after its first frame
====================================================  ==================================================

Faults with a ``<marker>`` file fire once: :func:`once` creates the marker (recording the pid and
what happened) and the fault is skipped while it exists, so a restarted process carries on.
Processes that the pipeline starts (Ray Train workers, Ray Data render actors, the Blender child)
inherit the variable through :func:`forward` or their parent's environment.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

ENV = "GECO_TEST_FAULTS"

__all__ = ["ENV", "forward", "matching", "once"]


def matching(kind: str) -> list[list[str]]:
    """The arguments of each configured fault of ``kind`` (``[]`` when test faults are off)."""
    value = os.environ.get(ENV)
    if not value:
        return []
    found = []
    for spec in value.split(","):
        parts = spec.strip().split(":")
        if parts[0] == kind:
            found.append(parts[1:])
    return found


def once(marker: str | Path, note: str) -> bool:
    """True the first time a fault with this marker file fires (the file is then created, holding
    ``note`` and this pid); False once it exists."""
    # written aside, then linked into place: the link fails if the marker exists (fire once), and a
    # reader polling for the marker never sees it empty
    marker = Path(marker)
    aside = marker.with_name(f".{marker.name}.{os.getpid()}.{threading.get_ident()}")
    aside.write_text(f"pid {os.getpid()} {note}\n")
    try:
        os.link(aside, marker)
    except FileExistsError:
        return False
    finally:
        aside.unlink()
    return True


def forward() -> dict[str, str]:
    """The switch, for the environment of a process the pipeline starts (empty when it is off)."""
    value = os.environ.get(ENV)
    return {ENV: value} if value else {}
