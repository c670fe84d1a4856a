"""Training throughput: Ray Train's per-step overhead, whether the shard loader starves the model,
and stage 1's quality at the embedded scale.

``python -m benchmarks.training [--quick] [--objects 96] [--resolution 128] [--steps 12] [--pairs 3]
[--min-step-s 0.5] [--no-ray] [--quality-config configs/local.yaml]`` -> ``benchmarks/results/training.json``.

The model is the reconstructor pretraining task (:class:`geco.train.pretrain.ReconstructorPretrainTask`,
the input-heaviest task: every step decodes the 6 Zero123++ views and the supervision views of each
object), with the batch size doubled until a synthetic step takes at least ``--min-step-s``. Every
arm runs the same task with the same torch thread count (1) on the same data:

* **synthetic**: one batch prepared once and kept in memory; every step trains on it (no input cost);
* **shards**: rows streamed from WebDataset shards on local disk (the render stage's layout, written
  by :class:`geco.data.shards.ShardWriter` with a manifest), decoded by the task's ``prepare`` and
  fed by :class:`geco.train.stream.Prefetcher` exactly as in the Ray Train workers
  (``prefetch_batches`` steps ahead on a background thread; the ``prefetch 0`` row decodes on the
  training thread);
* **Ray Train**: :func:`pipelines.training.run_training` with one worker
  (``TorchTrainer``, Ray Data ``read_webdataset`` shards, the same Prefetcher), ``log_every`` =
  ``--steps``, MLflow off; its step time is the worker's own ``train/step_s`` over the second half
  of the run (after warm-up), so Ray's start-up is not counted - only what Ray costs per step. Two
  runs: the train split materialized in the object store first (``dataset.training_input`` "auto"
  picks that for a split this small) and streamed from the shards every epoch (Ray Data's read
  tasks then compete with training for the same cores).

Rows (``ratio`` = baseline step time / case step time, i.e. relative throughput; the issue's
"≤ 1.15× overhead" is ``ratio >= 1/1.15``): Ray Train vs the plain loop on shards, shards (prefetch)
vs synthetic (target ``>= 1/1.1``), shards without prefetch vs synthetic (informational). Plain-loop
arms alternate (A/B, B/A, ...) ``--pairs`` times; each value is the median step time.

**Stage 1 quality** (informational rows, dB / SSIM): on the held-out objects of the dataset that
``--quality-config`` names, after ``geco run --config <it>`` (``make demo``) trained the teacher and
the generator: PSNR/SSIM against the ground-truth renders of the generator (1 step), the teacher
(``models.teacher.num_inference_steps`` steps, CFG ``stage1.teacher_cfg``) and the teacher with 1
step (same sampler and CFG), from the same noise; the paper's ordering (PAPER.md ablation: the
one-step teacher far below both) is checked and reported as ``details.quality.paper_ordering``.
Skipped with a note when those outputs do not exist.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import alternate, arg_parser, median, report, result, row

NAME = "training"
TARGET_RAY = 1 / 1.15  # Ray Train step time at most 1.15x the plain loop's
TARGET_INPUT = 1 / 1.1  # shard input at most 1.1x synthetic in-memory input


# ------------------------------------------------------------------------------- data
def make_dataset(root: Path, objects: int, resolution: int, random_views: int) -> str:
    """Render-like synthetic objects (benchmarks.read) committed as shards + a manifest."""
    from benchmarks.read import make_sample, make_view_pool, write_shards
    from geco.data.shards import write_manifest_version

    uri = str(root / "shards")
    pool = make_view_pool(min(24, objects * 2), resolution)
    write_shards((make_sample(i, 7 + random_views, resolution, pool) for i in range(objects)), uri,
                 samples_per_shard=4)
    write_manifest_version(uri, settings_hash="bench", source_list_hash="bench")
    return uri


class _Rows:
    """A stand-in for a Ray Data shard iterator: ``iter_rows()`` over the dataset's raw rows."""

    def __init__(self, uri: str):
        self.uri = uri

    def iter_rows(self):
        from geco.data.loader import iter_dataset

        yield from iter_dataset(self.uri, "train", decode=False)


# ------------------------------------------------------------------------------- the task
def make_config(dataset_uri: str, workdir: Path, batch_size: int, steps: int, prefetch: int):
    from geco.config import load_config

    return load_config(None, [
        f"dataset.uri={dataset_uri}", "tracking.enabled=false", "name=bench-training",
        "models.reconstructor.input_size=32", "models.reconstructor.lgm.down_channels=[16,32,64]",
        "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[64,32]",
        "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
        "models.reconstructor.lgm.norm_groups=8", "models.reconstructor.lgm.layers_per_block=1",
        "models.reconstructor.lambda_lpips=0",
        f"pretrain.reconstructor.batch_size={batch_size}", f"pretrain.reconstructor.steps={steps}",
        "pretrain.reconstructor.render_size=32", "pretrain.reconstructor.torch_threads=1",
        f"pretrain.reconstructor.prefetch_batches={prefetch}", f"pretrain.reconstructor.log_every={steps}",
        "pretrain.reconstructor.eval_every=0", f"pretrain.reconstructor.checkpoint_every={steps}",
        "pretrain.reconstructor.cpus_per_worker=1", "pretrain.reconstructor.lr_schedule=constant",
        f"pretrain.reconstructor.storage_path={workdir / 'train'}", f"pretrain.output_uri={workdir / 'out'}",
    ])


def make_task(cfg):
    from geco.train.loop import WorkerContext
    from geco.train.pretrain import ReconstructorPretrainTask

    return ReconstructorPretrainTask(cfg, cfg.pretrain.reconstructor, WorkerContext())


def plain_step_times(task, job, steps: int, *, source: str, dataset_uri: str, synthetic_batch=None) -> list[float]:
    """Wall seconds of each of ``steps`` plain-loop steps (no Ray): ``source`` "synthetic" or "shards"."""
    from geco.train.checkpoint import DataPosition
    from geco.train.stream import Prefetcher, RowStream

    loader = None
    if source == "shards":
        stream = RowStream(_Rows(dataset_uri), DataPosition(), seed=job.seed, rank=0, buffer=job.shuffle_buffer)
        loader = Prefetcher(stream, task.prepare, batch_size=job.batch_size, accumulation=job.grad_accumulation,
                            depth=job.prefetch_batches)
    times = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            micro = [synthetic_batch] if loader is None else loader.next()
            task.train_step(micro, step)
            times.append(time.perf_counter() - t0)
    finally:
        if loader is not None:
            loader.close()
    return times


def ray_train_step_s(cfg, workdir: Path, training_input: str) -> float:
    """The worker's ``train/step_s`` over the second half of a one-worker Ray Train run, its input
    streamed from the shards or materialized in the object store first (``dataset.training_input``)."""
    from geco.data.shards import read_latest_manifest
    from geco.train.pretrain import ReconstructorPretrainTask
    from pipelines.cluster import init_ray
    from pipelines.training import run_training, training_datasets

    init_ray("local")
    train_ds, val_ds, _ = training_datasets(cfg.dataset.uri, read_latest_manifest(cfg.dataset.uri),
                                            holdout_fraction=0.1, eval_objects=1, training_input=training_input)
    res = run_training(ReconstructorPretrainTask, cfg, "pretrain.reconstructor", stage="bench",
                       datasets={"train": train_ds, "val": val_ds}, output_uri=str(workdir / "out"),
                       run_name=f"bench-{time.time_ns()}")
    step_s = res.metrics.get("train/step_s")
    if step_s is None:
        raise RuntimeError(f"the Ray Train run reported no train/step_s: {sorted(res.metrics)}")
    return float(step_s)


# ------------------------------------------------------------------------------- stage 1 quality
def stage1_quality(config_path: str) -> dict:
    """PSNR/SSIM on held-out objects: generator (1 step) vs teacher (N steps) vs teacher (1 step)."""
    import torch

    from geco.config import load_config
    from geco.data.loader import iter_dataset
    from geco.metrics import psnr, ssim
    from geco.models.generator import load_generator
    from geco.models.teacher import _randn, load_teacher
    from geco.train.stage1 import condition_batch, stage1_models
    from pipelines.stage1 import default_inputs

    if not Path(config_path).is_file():
        return {"skipped": f"{config_path}: no such config"}
    cfg = load_config(config_path)
    gen_uri = Path(cfg.stage1.output_uri) / "generator"
    if not (gen_uri / "generator.json").is_file():
        return {"skipped": f"{gen_uri} does not exist: run `geco run --config {config_path}` (make demo) first"}
    cfg = cfg.model_copy(update={"models": stage1_models(cfg, default_inputs(cfg).task_inputs())})
    torch.manual_seed(0)
    teacher = load_teacher(cfg.models.teacher)
    generator = load_generator(cfg.models.generator.model_copy(update={"pretrained": str(gen_uri)}), teacher)
    rows = list(iter_dataset(cfg.dataset.uri, None, decode=False))
    keep = _val_keys(cfg)
    val = sorted((r for r in rows if r["__key__"] in keep), key=lambda r: r["__key__"])
    if not val:
        return {"skipped": f"{cfg.dataset.uri}: no held-out objects"}
    batch = condition_batch(val, teacher.tile_size)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        cond = teacher.encode_condition(batch["cond"], generator=g)
        z = _randn(teacher.latent_shape(cond.batch_size), g, "cpu")
        steps = cfg.models.teacher.num_inference_steps
        out = {"generator_1step": teacher.decode_latents(generator(cond, z))}
        for name, n in (("teacher_%dstep" % steps, steps), ("teacher_1step", 1)):
            lat = teacher.sample(cond, num_steps=n, guidance_scale=cfg.stage1.teacher_cfg,
                                 generator=torch.Generator().manual_seed(5678), latents=z.clone())
            out[name] = teacher.decode_latents(lat)
    gt = batch["grid"]
    metrics = {name: {"psnr": float(psnr(im, gt).mean()), "ssim": float(ssim(im, gt).mean())}
               for name, im in out.items()}
    t_multi = metrics[f"teacher_{steps}step"]["psnr"]
    ordering = (metrics["teacher_1step"]["psnr"] < metrics["generator_1step"]["psnr"]
                and metrics["teacher_1step"]["psnr"] < t_multi)
    return {"objects": [r["__key__"] for r in val], "teacher_steps": steps, "sampler": cfg.models.teacher.sampler,
            "teacher_cfg": cfg.stage1.teacher_cfg, "metrics": metrics, "paper_ordering": ordering,
            "psnr_generator_vs_teacher": float(psnr(out["generator_1step"], out[f"teacher_{steps}step"]).mean())}


def _val_keys(cfg) -> set[str]:
    """Stage 1's evaluation objects (the val split, or the hash-chosen holdout)."""
    from geco.data.shards import read_latest_manifest
    from pipelines.training import split_info

    info, _ = split_info(cfg.dataset.uri, read_latest_manifest(cfg.dataset.uri),
                         holdout_fraction=cfg.dataset.holdout_fraction, eval_objects=cfg.stage1.train.eval_objects)
    return set(info.eval_keys)


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    import torch

    p = arg_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=96, help="enough that an epoch (a new Ray Data execution) spans the timed steps")
    p.add_argument("--resolution", type=int, default=128, help="render resolution of every view")
    p.add_argument("--random-views", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps per plain-loop arm (half of them warm-up "
                                                         "in the Ray Train arm)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--min-step-s", type=float, default=0.5)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train arm")
    p.add_argument("--quality-config", default="configs/local.yaml")
    args = p.parse_args(argv)
    if args.quick:
        args.objects, args.resolution, args.random_views, args.steps, args.pairs = 6, 64, 2, 4, 1
        args.min_step_s = 0.05
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(tempfile.mkdtemp(prefix="geco-bench-training-"))
    t0 = time.perf_counter()
    uri = make_dataset(work, args.objects, args.resolution, args.random_views)
    print(f"dataset: {args.objects} objects at {args.resolution}px in {time.perf_counter() - t0:.1f} s -> {uri}",
          flush=True)

    # batch size: doubled until a synthetic step takes --min-step-s
    batch = 1
    while True:
        cfg = make_config(uri, work, batch, args.steps, args.prefetch)
        task = make_task(cfg)
        job = cfg.pretrain.reconstructor
        rows = list(_Rows(uri).iter_rows())[:batch]
        synthetic = task.prepare(rows)
        times = plain_step_times(task, job, 3, source="synthetic", dataset_uri=uri, synthetic_batch=synthetic)
        if median(times[1:]) >= args.min_step_s or batch >= args.objects:
            break
        batch *= 2
    print(f"batch size {batch}: synthetic step {median(times[1:]):.3f} s", flush=True)

    def arm(source: str, prefetch: int):
        def run(_i: int) -> float:
            c = make_config(uri, work, batch, args.steps, prefetch)
            return median(plain_step_times(task, c.pretrain.reconstructor, args.steps, source=source,
                                           dataset_uri=uri, synthetic_batch=synthetic)[1:])
        return run

    pairs = alternate(args.pairs, arm("shards", args.prefetch), arm("synthetic", 0))
    no_prefetch = alternate(args.pairs, arm("shards", 0), arm("synthetic", 0))
    shards_s, synth_s = median([a for a, _ in pairs]), median([b for _, b in pairs])
    shards0_s, synth0_s = median([a for a, _ in no_prefetch]), median([b for _, b in no_prefetch])
    rows_out = [
        row(f"shards (prefetch {args.prefetch}) vs synthetic in-memory: step s", shards_s, "s/step", synth_s,
            median([b / a for a, b in pairs]), round(TARGET_INPUT, 3)),
        row("shards (prefetch 0: decode on the training thread) vs synthetic: step s", shards0_s, "s/step", synth0_s,
            median([b / a for a, b in no_prefetch])),
    ]
    details: dict = {"batch_size": batch, "objects": args.objects, "resolution": args.resolution,
                     "views_per_object": 7 + args.random_views, "torch_threads": 1, "prefetch_batches": args.prefetch,
                     "plain": {"shards_prefetch_s": [a for a, _ in pairs], "synthetic_s": [b for _, b in pairs],
                               "shards_no_prefetch_s": [a for a, _ in no_prefetch]}}

    if not args.no_ray:
        ray_steps = max(4, 2 * args.steps)
        ray_cfg = make_config(uri, work, batch, ray_steps, args.prefetch)
        ray_cfg = ray_cfg.model_copy(update={"pretrain": ray_cfg.pretrain.model_copy(update={
            "reconstructor": ray_cfg.pretrain.reconstructor.model_copy(update={"log_every": ray_steps // 2})})})
        times: dict[str, list[float]] = {"materialize": [], "stream": [], "plain": []}
        for i in range(max(1, args.pairs - 1)):
            for mode in ("materialize", "stream"):
                times[mode].append(ray_train_step_s(ray_cfg, work, mode))
            times["plain"].append(arm("shards", args.prefetch)(i))
            print(f"ray train {times['materialize'][-1]:.3f} s/step (materialized input), "
                  f"{times['stream'][-1]:.3f} (streamed); plain {times['plain'][-1]:.3f}", flush=True)
        plain = median(times["plain"])
        for mode, label, target in (("materialize", "materialized input (auto at this size)", round(TARGET_RAY, 3)),
                                    ("stream", "input streamed every epoch", None)):
            rows_out.insert(0 if mode == "materialize" else 1, row(
                f"Ray Train (1 worker, {label}) vs plain loop on shards: step s", median(times[mode]), "s/step",
                plain, median([p / r for r, p in zip(times[mode], times["plain"])]), target))
        details["ray_train"] = {"step_s": times, "steps": ray_steps,
                                "measured": "train/step_s of steps %d..%d" % (ray_steps // 2 + 1, ray_steps)}

    quality = stage1_quality(args.quality_config)
    details["quality"] = quality
    if "metrics" in quality:
        for name, m in quality["metrics"].items():
            rows_out.append(row(f"stage 1 quality, held-out PSNR vs GT: {name}", m["psnr"], "dB"))
            rows_out.append(row(f"stage 1 quality, held-out SSIM vs GT: {name}", m["ssim"], "SSIM"))
        print(f"stage 1 quality ({len(quality['objects'])} held-out objects): "
              + json.dumps(quality["metrics"]) + f"; paper ordering: {quality['paper_ordering']}")
    else:
        print(f"stage 1 quality: skipped ({quality['skipped']})")
    res = result(NAME, rows_out, details)
    report(res, args.out, quick=args.quick)
    return res


if __name__ == "__main__":
    main()
