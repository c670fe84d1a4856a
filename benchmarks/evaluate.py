"""Evaluation throughput: objects/min of the GSO evaluation and seconds per object of each model under test.

Runs the evaluate stage (``pipelines.evaluate.run``) on procedural objects in the GSO layout with a tiny
random GECO bundle (teacher UNet included) as three models under test - ``stage1`` (one generator step),
``teacher`` (``--teacher-steps`` steps) and ``teacher_1step`` - on a local Ray: ground truth rendered by
Blender at the protocol's views (scaled down: ``--resolution``, ``--orbit``/``--geometry`` views), every
metric computed. Then it evaluates again with a different teacher step count, so the models run again
while the ground truth comes from the cache: that ratio is what the content-hash cache saves.

Rows: objects/min cold (ground truth rendered) and warm (cached), the ground truth's share, seconds per
object of each model (generation and reconstruction apart, as ``summary.json`` records them). The
paper-size timing needs a GPU and real weights (benchmarks/gpu.py times the models themselves).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import arg_parser, report, result, row

NAME = "evaluate"


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--resolution", type=int, default=64, help="view sets' and geometry views' size")
    p.add_argument("--orbit", type=int, default=15, help="orbit views (paper: 15)")
    p.add_argument("--geometry", type=int, default=16, help="geometry cameras (paper: 16)")
    p.add_argument("--teacher-steps", type=int, default=10)
    p.add_argument("--spp", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.objects, args.resolution, args.orbit, args.geometry, args.teacher_steps, args.spp = 1, 32, 4, 4, 2, 2

    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from geco.config import load_config
    from geco.data.procedural import make_gso_object
    from geco.models.bundle import init_tiny_bundle
    from pipelines import evaluate
    from pipelines.stage import EvaluateInputs

    work = Path(tempfile.mkdtemp(prefix="geco-bench-evaluate-"))
    for i in range(args.objects):
        make_gso_object(1000 + i, 0, work / "gso", f"object_{i:02d}", texture_beside=i % 2 == 1)
    bundle = init_tiny_bundle(work / "bundle", include_teacher_unet=True)
    base = [f"evaluate.gso_uri={work / 'gso'}", f"evaluate.output_uri={work / 'out'}", f"cache.dir={work / 'cache'}",
            f"evaluate.resolution={args.resolution}", f"evaluate.input_resolution={args.resolution}",
            f"evaluate.geometry_resolution={args.resolution}", f"evaluate.orbit_views={args.orbit}",
            f"evaluate.geometry_views={args.geometry}", "evaluate.turntable_frames=12", "evaluate.turntable_size=64",
            "evaluate.num_cpus=1", f"render.blender.samples={args.spp}", "render.blender.threads=1",
            "ray.num_renderers=2", "ray.cpus_per_renderer=0.5", "tracking.enabled=false"]
    inputs = EvaluateInputs({"stage1": bundle, "teacher": bundle, "teacher_1step": bundle}, "")
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        cold = evaluate.run(load_config(None, base + [f"evaluate.teacher_steps={args.teacher_steps}"]), inputs)
        cold_s = time.perf_counter() - t0
        s_cold = json.loads((work / "out" / "results" / "summary.json").read_text())
        t0 = time.perf_counter()
        evaluate.run(load_config(None, base + [f"evaluate.teacher_steps={args.teacher_steps + 1}"]), inputs)
        warm_s = time.perf_counter() - t0
        s_warm = json.loads((work / "out" / "results" / "summary.json").read_text())
    finally:
        ray.shutdown()
    n = len(cold.objects)
    spec = (f"{n} objects, {args.resolution} px, 1 + 6 + {args.orbit} + {args.geometry} views, {args.spp} spp, "
            "3 models")
    rows = [
        row(f"evaluation, ground truth cached vs rendered: objects/min ({spec})", 60 * n / warm_s, "objects/min",
            baseline=60 * n / cold_s, ratio=cold_s / warm_s),
        row("models under test + metrics + outputs only: objects/min", s_cold["objects_per_min"], "objects/min"),
        row("ground truth rendering + actor start-up and model loading: share of the cold evaluation",
            (cold_s - s_cold["seconds_models"]) / cold_s, "fraction"),
    ]
    for model in s_cold["models"]:
        m = s_cold["metrics"][model]
        gen, rec = m["gso/orbit/seconds_generate"], m["gso/orbit/seconds_reconstruct"]
        steps = {"teacher": f"{args.teacher_steps} steps", "teacher_1step": "1 step", "stage1": "1 generator step"}
        rows.append(row(f"{model} ({steps[model]}) + reconstructor: seconds per object (generate {gen:.3f} + "
                        f"reconstruct {rec:.3f})", gen + rec, "s/object"))
    details = {
        "what": "wall time of pipelines.evaluate.run on a local Ray (tracking off); the warm run changes "
                "evaluate.teacher_steps so the models run again while the ground truth is read from the cache",
        "cold_s": round(cold_s, 2), "warm_s": round(warm_s, 2),
        "models_s_cold": round(s_cold["seconds_models"], 2), "models_s_warm": round(s_warm["seconds_models"], 2),
        "tiny_models": "geco.models.bundle.TINY_MODELS (random weights): timings, not quality",
        "metrics_cold": s_cold["metrics"],
    }
    shutil.rmtree(work, ignore_errors=True)
    res = result(NAME, rows, details)
    report(res, args.out, quick=args.quick)
    return res


if __name__ == "__main__":
    main()
