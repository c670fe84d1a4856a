"""Rendering throughput: one long-lived Blender process vs a fresh Blender process per object.

``python -m benchmarks.render [--quick] [--pairs 3] [--objects 4] [--resolution 256] [--views 8]
[--spp 16]`` -> ``benchmarks/results/render.json``.

* **Case (A)**: :class:`geco.render.blender.worker.BlenderRenderer` as the pipeline uses it: ONE
  process for every object of the whole benchmark (started lazily by the first render, so its
  single start-up is inside the timed total).
* **Baseline (B)**: the same class with ``fresh_process=True``: a new Blender process per object
  (spawn + ``bpy``/BlenderProc set-up + render + exit), the Objaverse-XL way
  (``blender --background --python ...`` per object). Start-up is included: that is the point.
* Same objects (procedural ``.glb`` files ``procedural-0000``... from
  :func:`geco.data.procedural.make_procedural_glb`, cycling box/cylinder/sphere/torus/...), same
  cameras and the same Blender settings in both arms.
* **8 views** = the pipeline's shard layout with one random view: ``cond`` + the 6 Zero123++ views
  + 1 random view, every one at ``--resolution`` (256²) - i.e. a
  :class:`geco.config.RenderConfig` with ``cond.resolution = zero123.resolution =
  random.resolution = 256``, ``random.count = 1``, ``blender.samples = 16`` (Cycles, CPU, no
  denoiser, all cores), depth and normals on (the defaults); cameras from
  :func:`geco.render.views.cameras_for`, settings from :func:`geco.render.views.blender_settings`.
  Blender renders them as 3 groups (cond, Zero123++, random) since K differs between groups.
* A pair = every object rendered once by A and once by B, interleaved object by object with the
  order alternating (A B, B A, ...) so the shared machine's load swings hit both arms alike; the
  headline ratio is the median over pairs of (B seconds / A seconds). Seconds are wall time
  around :meth:`BlenderRenderer.render` calls in this process.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import arg_parser, median, report, result, row

NAME = "render"
TARGET = 1.5


def _render_config(resolution: int, views: int, spp: int):
    from geco.config import RenderConfig

    if views < 7:
        raise SystemExit("--views must be >= 7 (cond + the 6 Zero123++ views + random ones)")
    return RenderConfig.model_validate({
        "cond": {"resolution": resolution},
        "zero123": {"resolution": resolution},
        "random": {"resolution": resolution, "count": views - 7},
        "blender": {"samples": spp},
    })


def _render_one(renderer, object_id: str, path, cameras, settings, out: Path, tag: str) -> dict:
    """Render one object; wall seconds around render() (spawn/start-up/exit included when paid)."""
    t0 = time.perf_counter()
    res = renderer.render(object_id, path, cameras, settings, out)
    wall = time.perf_counter() - t0
    if not res.ok:
        raise RuntimeError(f"{tag}: {object_id} failed: {res.reason}\n{res.log_tail[-2000:]}")
    return {"wall_s": wall, "request_s": res.seconds, "startup_s": res.startup_seconds}


def _max_pixel_diff(a: Path, b: Path) -> int:
    from PIL import Image

    diffs = [int(np.abs(np.asarray(Image.open(p), np.int16) - np.asarray(Image.open(b / p.name), np.int16)).max())
             for p in sorted(a.glob("*.png"))]
    return max(diffs) if diffs else -1


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs (alternating order)")
    p.add_argument("--objects", type=int, default=4, help="objects per arm per pair")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--views", type=int, default=8, help="cameras per object incl. cond (>= 7)")
    p.add_argument("--spp", type=int, default=16, help="Cycles samples per pixel")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.objects, args.resolution, args.spp = 1, 1, 32, 1

    from geco.data.procedural import make_procedural_glb, procedural_id
    from geco.render.blender.worker import BlenderRenderer
    from geco.render.views import blender_settings, cameras_for

    rc = _render_config(args.resolution, args.views, args.spp)
    settings = blender_settings(rc)
    work = Path(tempfile.mkdtemp(prefix="geco-bench-render-"))
    objects = [(procedural_id(i), make_procedural_glb(i, args.seed, work / "objects")) for i in range(args.objects)]
    cameras = {oid: cameras_for(oid, rc) for oid, _ in objects}

    long_lived = BlenderRenderer(log_dir=work / "logs", name="long-lived")
    fresh = BlenderRenderer(fresh_process=True, log_dir=work / "logs", name="fresh")
    arms = {"long-lived": long_lived, "fresh": fresh}
    pairs: list[dict[str, list[dict]]] = []
    step = 0
    t_total = time.perf_counter()
    try:
        for i in range(args.pairs):
            pair: dict[str, list[dict]] = {"long-lived": [], "fresh": []}
            for object_id, path in objects:
                order = ("long-lived", "fresh") if step % 2 == 0 else ("fresh", "long-lived")
                step += 1
                for tag in order:
                    out = work / f"pair{i}" / tag / object_id
                    pair[tag].append(_render_one(arms[tag], object_id, path, cameras[object_id], settings, out, tag))
                    if i > 0:
                        shutil.rmtree(out, ignore_errors=True)
            a = sum(r["wall_s"] for r in pair["long-lived"])
            b = sum(r["wall_s"] for r in pair["fresh"])
            per_object = ", ".join(f"{x['wall_s']:.2f}/{y['wall_s']:.2f}"
                                   for x, y in zip(pair["long-lived"], pair["fresh"]))
            print(f"  pair {i}: long-lived {a:6.2f}s  fresh {b:6.2f}s  ratio {b / a:4.2f}  "
                  f"(per object, long-lived/fresh: {per_object})", flush=True)
            pairs.append(pair)
    finally:
        long_lived.close()
        fresh.close()
    wall = time.perf_counter() - t_total
    pixel_diff = _max_pixel_diff(work / "pair0" / "long-lived" / objects[0][0], work / "pair0" / "fresh" / objects[0][0])
    shutil.rmtree(work, ignore_errors=True)

    n = len(objects)
    a_s = [sum(r["wall_s"] for r in p["long-lived"]) for p in pairs]
    b_s = [sum(r["wall_s"] for r in p["fresh"]) for p in pairs]
    ratios = [b / a for a, b in zip(a_s, b_s)]
    a_spo, b_spo = sum(a_s) / (n * len(pairs)), sum(b_s) / (n * len(pairs))
    fresh_startups = [r["startup_s"] for p in pairs for r in p["fresh"]]
    a_req = [r["request_s"] for p in pairs for r in p["long-lived"]]
    b_req = [r["request_s"] for p in pairs for r in p["fresh"]]
    spec = (f"{args.resolution}², {args.views} views, {args.spp} spp")
    rows = [
        row(f"long-lived renderer vs fresh process per object: objects/min ({spec})", 60.0 / a_spo, "objects/min",
            baseline=60.0 / b_spo, ratio=median(ratios), target=TARGET),
        row("long-lived renderer: seconds/object (its one start-up included)", a_spo, "s/object",
            baseline=b_spo, ratio=b_spo / a_spo),
        row("render request only (start-up excluded): long-lived vs fresh", median(a_req), "s/object",
            baseline=median(b_req), ratio=median(b_req) / median(a_req)),
        row("Blender process start-up (spawn to ready), paid per object by fresh", median(fresh_startups), "s"),
    ]
    details = {
        "what": "objects/min and s/object: wall time of BlenderRenderer.render() calls summed over all pairs; "
                "ratio (row 1): median over pairs of fresh seconds / long-lived seconds for the same objects.",
        "views": f"{args.views} = cond + 6 Zero123++ + {args.views - 7} random, all {args.resolution}x{args.resolution} "
                 "(RenderConfig cond/zero123/random.resolution), RGBA + depth + normals",
        "render_config": rc.model_dump(mode="json"),
        "blender_settings": settings,
        "objects": [oid for oid, _ in objects],
        "pairs": args.pairs,
        "order": "objects interleaved: for each object, long-lived then fresh or the reverse, alternating",
        "per_pair": [{"long_lived_s": round(a, 3), "fresh_s": round(b, 3), "ratio": round(b / a, 3),
                      "long_lived_per_object_s": [round(r["wall_s"], 3) for r in p["long-lived"]],
                      "fresh_per_object_s": [round(r["wall_s"], 3) for r in p["fresh"]],
                      "fresh_startup_s": [round(r["startup_s"], 3) for r in p["fresh"]]}
                     for a, b, p in zip(a_s, b_s, pairs)],
        "long_lived_processes_started": long_lived.startups,
        "long_lived_startup_s": [round(x, 3) for x in long_lived.startup_seconds],
        "fresh_processes_started": fresh.startups,
        "max_abs_pixel_diff_long_lived_vs_fresh_pair0": pixel_diff,
        "wall_s": round(wall, 1),
        "quick": bool(args.quick),
    }
    res = result(NAME, rows, details)
    report(res, args.out, quick=args.quick)
    return res


if __name__ == "__main__":
    main()
