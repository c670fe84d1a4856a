"""Shared pieces of the benchmarks (DESIGN.md "Benchmarks convention").

A result file ``benchmarks/results/<name>.json`` is::

    {"benchmark": name, "commit": "<git HEAD>", "worktree_dirty": bool,
     "machine": {"cpus", "gpu", "cpu_model", "loadavg"}, "rows": [row, ...], "details": {...}}

and a row is ``{"case", "value", "unit", "baseline", "ratio", "target", "meets_target"}``:
``baseline`` is the value of the baseline measured *in the same run* (same unit), ``ratio`` how
many times better the case is than its baseline (median of paired A/B trials where the
benchmark says so), ``target`` the ratio the case must reach (``None``: informational row).

These machines are shared and noisy: compare ratios, and measure A and B alternately.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


# ------------------------------------------------------------------------------------ context
def git_commit() -> tuple[str, bool]:
    """(HEAD commit hash or "unknown", whether the work tree has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return head or "unknown", dirty


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no torch / broken driver: no GPU
        return None
    return None


def machine_info() -> dict[str, Any]:
    """``{"cpus", "gpu", "cpu_model", "loadavg"}``; loadavg (1/5/15 min) shows how shared it was."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "gpu": _gpu(), "cpu_model": _cpu_model(), "loadavg": load}


# ------------------------------------------------------------------------------------ rows
def row(case: str, value: float, unit: str, baseline: float | None = None, ratio: float | None = None,
        target: float | None = None) -> dict[str, Any]:
    """One result row; ``meets_target`` is ``ratio >= target`` (``None`` without a target)."""
    meets = None if target is None or ratio is None else bool(ratio >= target)

    def rnd(x: float | None) -> float | None:  # 5 significant digits
        return None if x is None else float(f"{float(x):.5g}")

    return {"case": case, "value": rnd(value), "unit": unit, "baseline": rnd(baseline), "ratio": rnd(ratio),
            "target": target, "meets_target": meets}


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def alternate(pairs: int, run_a: Callable[[int], Any], run_b: Callable[[int], Any]) -> list[tuple[Any, Any]]:
    """Run A and B ``pairs`` times, alternating the order (AB, BA, AB, ...) so drift in a shared
    machine's load hits both alike. Returns ``[(a_result, b_result), ...]``."""
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            a = run_a(i)
            b = run_b(i)
        else:
            b = run_b(i)
            a = run_a(i)
        out.append((a, b))
    return out


# ------------------------------------------------------------------------------------ output
def format_table(rows: Sequence[dict]) -> str:
    cols = ["case", "value", "unit", "baseline", "ratio", "target", "meets_target"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = []
    for j, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result(name: str, rows: list[dict], details: dict | None = None) -> dict[str, Any]:
    commit, dirty = git_commit()
    out = {"benchmark": name, "commit": commit, "worktree_dirty": dirty, "machine": machine_info(), "rows": rows}
    if details:
        out["details"] = details
    return out


def save(res: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<benchmark>.json`` (default ``benchmarks/results``) and return its path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{res['benchmark']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def report(res: dict, out_dir: str | os.PathLike | None = None, quick: bool = False) -> Path:
    """Print the table and save the JSON. A ``--quick`` run never overwrites the real results:
    without an explicit ``out_dir`` it goes to a temporary folder."""
    if quick and out_dir is None:
        out_dir = tempfile.mkdtemp(prefix=f"geco-bench-{res['benchmark']}-quick-")
    path = save(res, out_dir)
    m = res["machine"]
    print(f"\n== {res['benchmark']}  (commit {res['commit'][:10]}{'+dirty' if res.get('worktree_dirty') else ''}, "
          f"{m['cpus']} CPUs, GPU: {m['gpu'] or 'none'}, load {m['loadavg']})")
    print(format_table(res["rows"]))
    print(f"-> {path}")
    return path


def arg_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (results go to a temp folder)")
    p.add_argument("--out", default=None, help="folder for <name>.json (default benchmarks/results)")
    return p
