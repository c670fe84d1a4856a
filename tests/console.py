"""What a command printed, as a person reads it: Ray forwards its own processes' lines to the
driver's stderr (``(PlacementGroupCleaner pid=1) ...``, left over from an earlier test's Ray Train
run on the shared local Ray, whose ``log_to_driver`` the tests keep on to see worker errors). Those
lines are not the command's, so a test counting the command's lines leaves them out."""
from __future__ import annotations

import re

RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")


def own_lines(text: str) -> list[str]:
    """The lines of ``text`` that are not Ray's forwarded log lines."""
    return [ln for ln in text.splitlines() if not RAY_LOG_LINE.match(ln)]
