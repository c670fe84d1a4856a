"""What the cluster path costs: `ray job submit` to a running head against a direct run of the same job.

    python -m benchmarks cluster [--quick]   ->  benchmarks/results/cluster.json

A Ray head on 127.0.0.1 (:class:`infra.stack.RayHead`: token auth, its own ports and temp folder) is
started once (its start-up is a row of its own); then, alternately:

* **direct**: ``python -m cli render ...`` in a fresh process on a local Ray it starts itself (what
  ``geco render`` does on a laptop);
* **submitted**: ``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python -m
  jobs.render ...`` (packages and uploads the source, sets up the runtime env, starts the driver on
  the head, follows its logs until it ends).

The job renders 2 procedural objects at 32 px into a fresh folder each time, so both do the same
work. An empty job (``python -c pass``) gives the fixed cost of a submission alone. Ratios are
direct / submitted (< 1: the cluster path is slower); no target: this is a cost to know, not to meet.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, alternate, arg_parser, median, report, result, row

RENDER = ["source.kind=procedural", "render.cond.resolution=32", "render.zero123.resolution=32",
          "render.random.count=1", "render.random.resolution=32", "render.blender.samples=2",
          "render.blender.threads=1", "ray.num_renderers=1", "ray.cpus_per_renderer=0.5", "tracking.enabled=false",
          "models.teacher.tile_size=32"]  # the load-time size check: tiles no larger than the renders


def _overrides(out: Path, objects: int) -> list[str]:
    sets = RENDER + [f"source.num_procedural={objects}", f"dataset.uri={out / 'shards'}", f"cache.dir={out / 'cache'}"]
    return [a for s in sets for a in ("--set", s)]


def _timed(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    from infra.stack import RayHead

    args = arg_parser("cluster", __doc__.split("\n\n")[0]).parse_args(argv)
    pairs, objects = (1, 1) if args.quick else (2, 2)
    ray_bin = str(Path(sys.executable).parent / "ray")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    base_env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                    PYTHONPATH=str(REPO_ROOT))
    work = Path(tempfile.mkdtemp(prefix="geco-bench-cluster-"))
    head = RayHead(Path(tempfile.mkdtemp(prefix="geco-bc-", dir="/tmp")), num_cpus=2)
    t0 = time.perf_counter()
    head.start()
    head_seconds = time.perf_counter() - t0
    try:
        submit_env = {**base_env, **head.env()}
        submit_env.pop("PYTHONPATH")  # the job gets the source from --working-dir alone

        def submit(entry: list[str]) -> list[str]:
            return [ray_bin, "job", "submit", "--address", head.address, "--working-dir", ".",
                    "--runtime-env", "jobs/runtime_env.yaml", "--", *entry]

        def direct_render(i: int) -> float:
            return _timed([sys.executable, "-m", "cli", "render", *_overrides(work / f"direct-{i}", objects)], base_env)

        def submitted_render(i: int) -> float:
            return _timed(submit(["python", "-m", "jobs.render", *_overrides(work / f"job-{i}", objects)]), submit_env)

        def direct_empty(i: int) -> float:
            return _timed([sys.executable, "-c", "pass"], base_env)

        def submitted_empty(i: int) -> float:
            return _timed(submit(["python", "-c", "pass"]), submit_env)

        renders = alternate(pairs, direct_render, submitted_render)
        empties = alternate(pairs, direct_empty, submitted_empty)
    finally:
        head.stop()
    d_render, s_render = median([a for a, _ in renders]), median([b for _, b in renders])
    d_empty, s_empty = median([a for a, _ in empties]), median([b for _, b in empties])
    rows = [
        row(f"render job, {objects} objects: direct (geco render, local Ray)", d_render, "s"),
        row(f"render job, {objects} objects: ray job submit to a running head", s_render, "s", baseline=d_render,
            ratio=d_render / s_render),
        row("empty job: ray job submit (package + upload + runtime env + driver)", s_empty, "s", baseline=d_empty,
            ratio=d_empty / s_empty),
        row("head start-up (ray start --head, token auth, until the job API answers)", head_seconds, "s"),
    ]
    details = {"pairs": pairs, "objects": objects, "render_direct_s": [a for a, _ in renders],
               "render_submitted_s": [b for _, b in renders], "empty_direct_s": [a for a, _ in empties],
               "empty_submitted_s": [b for _, b in empties],
               "note": "direct includes starting a local Ray; submitted joins the running head"}
    report(result("cluster", rows, details), args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
