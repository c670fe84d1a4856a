"""geco.faults: the one switch for test-only fault points is inert unless set, and fires once."""
from __future__ import annotations

import re
import threading
from pathlib import Path

from geco import faults


def test_faults_are_inert_unless_the_switch_is_set(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.matching("kill-at-step") == [] and faults.forward() == {}
    monkeypatch.setenv(faults.ENV, "")
    assert faults.matching("kill-at-step") == [] and faults.forward() == {}


def test_faults_parse_by_kind_and_forward(monkeypatch, tmp_path):
    value = f"kill-at-step:3:{tmp_path}/m:1,hang:obj-a, crash:obj-b,kill-at-step:5:{tmp_path}/n"
    monkeypatch.setenv(faults.ENV, value)
    assert faults.matching("kill-at-step") == [["3", f"{tmp_path}/m", "1"], ["5", f"{tmp_path}/n"]]
    assert faults.matching("hang") == [["obj-a"]] and faults.matching("crash") == [["obj-b"]]
    assert faults.matching("kill-actor") == []
    assert faults.forward() == {faults.ENV: value}


def test_a_marked_fault_fires_once(tmp_path):
    marker = tmp_path / "fired"
    assert faults.once(marker, "rank 1 step 3")
    assert not faults.once(marker, "rank 1 step 3")
    assert "rank 1 step 3" in Path(marker).read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["fired"]  # nothing left aside


def test_racing_processes_fire_a_marker_once(tmp_path):
    """Every rank of a training job reaches the same fault point at once: exactly one fires."""
    marker, fired = tmp_path / "rank-0", []
    threads = [threading.Thread(target=lambda: fired.append(faults.once(marker, "hold"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fired) == [False] * 15 + [True]
    assert [p.name for p in tmp_path.iterdir()] == ["rank-0"]


def test_no_other_module_names_a_fault_variable():
    """The one place: no other module of the project spells out a fault variable of its own."""
    root = Path(__file__).resolve().parents[2]
    literal = re.compile(r"[\"']GECO_\w*FAULT")
    readers = [p.relative_to(root).as_posix() for d in ("geco", "pipelines", "cli", "jobs")
               for p in (root / d).rglob("*.py") if literal.search(p.read_text())]
    assert readers == ["geco/faults.py"], readers
