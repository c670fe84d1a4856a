"""Pseudo-GT throughput: objects batched through the teacher and reconstructor vs one at a time.

``python -m benchmarks.pseudo_gt [--quick] [--pairs 3] [--objects 8] [--batch 8] [--steps 25]
[--views 10] [--resolution 64]`` -> ``benchmarks/results/pseudo_gt.json``.

* What runs: :meth:`geco.pseudo_gt.PseudoGT.run` as each Ray Data actor of the pseudo_gt stage runs
  it (teacher K-step DDIM with CFG, VAE decode, reconstructor, rasterizing every view, PNG/.npy/.ply
  encoding), in this process, without Ray (Ray's scheduling is the same for both arms).
* Models: ``configs/local.yaml``'s (the embedded demo's tiny teacher, 16 px tiles, and its LGM-style
  reconstructor, 32 px input), randomly initialised; render-shaped input samples from
  ``tests/fake_renders.py`` (96 px conditioning views, as local.yaml renders them).
* **Case (A)**: ``--objects`` objects in batches of ``--batch``; **baseline (B)**: the same
  objects one per call (``pseudo_gt.batch_size: 1``). Same models, same settings, same objects.
* A pair = A once and B once, the order alternating (A B, B A, ...); the headline ratio is the
  median over pairs of (B seconds / A seconds), reported as objects/min. Seconds are this process's
  **CPU time** (``time.process_time``) with one torch thread: on a 2-core machine shared by a dozen
  jobs (load average 20-35 while this was written) wall time measures the neighbours, CPU time
  the work. ``--wall`` measures wall time instead (a quiet machine, or a GPU).
  Target: batching >= 1.5x on CPU at this size (25 steps: the teacher's share grows with steps).
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import REPO_ROOT, alternate, arg_parser, median, report, result, row

NAME = "pseudo_gt"
TARGET = 1.5


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's actors use 1)")
    p.add_argument("--wall", action="store_true", help="wall-clock seconds instead of this process's CPU time")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.objects, args.batch, args.steps = 1, 4, 4, 2

    from geco.config import load_config
    from geco.models.reconstructors import build_reconstructor
    from geco.models.teacher import build_tiny_teacher
    from geco.pseudo_gt import PseudoGT
    from tests.fake_renders import render_sample

    torch.set_num_threads(args.threads)
    cfg = load_config(str(REPO_ROOT / "configs" / "local.yaml"),
                      [f"pseudo_gt.steps={args.steps}", f"pseudo_gt.num_views={args.views}",
                       f"pseudo_gt.resolution={args.resolution}"])
    teacher = build_tiny_teacher(cfg.models.teacher).eval()
    torch.manual_seed(0)
    rec = build_reconstructor(cfg.models.reconstructor).eval()
    pgt = PseudoGT(teacher, rec, cfg.pseudo_gt)
    samples = [render_sample(f"bench-{i:03d}", cfg.render.cond.resolution) for i in range(args.objects)]
    pgt.run(samples[:1])  # warm-up (first-call allocations, lazy imports)

    clock = time.perf_counter if args.wall else time.process_time

    def timed(batch: int):
        def go(_i: int) -> float:
            t0 = clock()
            for s in range(0, len(samples), batch):
                out = pgt.run(samples[s:s + batch])
                assert all(not isinstance(r, Exception) for r in out), out
            return clock() - t0
        return go

    pairs = alternate(args.pairs, timed(args.batch), timed(1))
    ratios = [b / a for a, b in pairs]
    a_s, b_s = median([a for a, _ in pairs]), median([b for _, b in pairs])
    per_min = lambda s: 60.0 * args.objects / s  # noqa: E731
    what = "wall" if args.wall else "CPU"
    rows = [row(f"objects/min ({what}), batch {args.batch}", per_min(a_s), "objects/min", per_min(b_s), median(ratios), TARGET),
            row(f"objects/min ({what}), batch 1", per_min(b_s), "objects/min")]
    details = {"pairs_seconds": [{"batched": a, "batch_1": b} for a, b in pairs], "objects": args.objects,
               "batch": args.batch, "steps": args.steps, "views": args.views, "resolution": args.resolution,
               "torch_threads": args.threads, "clock": "wall" if args.wall else "process CPU time", "guidance_scale": pgt.guidance_scale,
               "teacher_tile": teacher.tile_size, "reconstructor_input": rec.input_size,
               "cond_resolution": cfg.render.cond.resolution, "ratio_per_pair": ratios}
    report(result(NAME, rows, details), args.out, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
