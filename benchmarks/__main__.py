"""``python -m benchmarks [NAME ...] [--quick] [--out DIR]``: run every benchmark, or those named.

A benchmark is ``benchmarks/<name>.py`` with a ``main(argv)``; options after the names are passed
to each. One failing benchmark does not stop the others; the exit status is 1 if any failed.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback

from benchmarks.common import BENCH_DIR

_NOT_BENCHMARKS = {"__init__", "__main__", "common"}


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in _NOT_BENCHMARKS and not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = available()
    # an option's value (--out DIR, --deadline-s 300) is the word after it that is no benchmark name
    names, opts = [], []
    for i, a in enumerate(argv):
        if a.startswith("-"):
            opts.append(a)
        elif i and argv[i - 1].startswith("-") and "=" not in argv[i - 1] and a not in known:
            opts.append(a)
        else:
            names.append(a)
    if any(n in ("-h", "--help") for n in opts) and not names:
        print(__doc__)
        print("benchmarks:", ", ".join(known))
        return 0
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(known)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or known:
        t0 = time.perf_counter()
        print(f"### benchmark {name} {' '.join(opts)}".rstrip(), flush=True)
        try:
            importlib.import_module(f"benchmarks.{name}").main(opts)
        except Exception:  # noqa: BLE001 - report and go on with the others
            traceback.print_exc()
            failed.append(name)
        print(f"### {name}: {time.perf_counter() - t0:.0f}s wall{' (FAILED)' if name in failed else ''}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
