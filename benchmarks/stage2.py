"""Stage 2's ablation at our scale (PAPER.md "Ablations"): does 3D-consistency fine-tuning help?

``python -m benchmarks.stage2 [--config configs/local.yaml] [--dataset URI] [--teacher URI]
[--stage1 URI] [--stage2 URI] [--objects 4] [--teacher-steps 75]`` -> ``benchmarks/results/stage2.json``.

On the held-out objects of the dataset (its val split, or the hash-chosen holdout, as the training
stages evaluate), from the same condition encoding and the same noise for every model:

* **teacher, N steps** (``--teacher-steps``, deterministic DDIM, CFG ``stage1.teacher_cfg``: how the
  pseudo-GT is made), **teacher, 1 step** (same sampler and CFG), the **stage-1 generator** and the
  **stage-2 generator** (one step each) produce the 6 Zero123++ views;
* the **same frozen reconstructor** (the stage-1 bundle's) turns each set of views into Gaussians,
  rendered at every ground-truth view of the object (its 6 Zero123++ views and its random views);
* PSNR / SSIM of those renders against the ground-truth renders (RGB on the reconstructor's
  background) - the paper's table: 1-step teacher 14.79 < stage 1 18.75 < stage 2 19.30 dB.

Defaults come from the config: ``dataset.uri``, the teacher pretrain wrote (``pretrain.output_uri``)
or ``models.teacher.pretrained``, ``<stage1.output_uri>/bundle`` and ``<stage2.output_uri>/bundle``
(``make demo`` writes them all). Rows are informational (no target); ``details.paper_ordering``
says whether teacher 1 step < stage 1 < stage 2 on PSNR held here. Skipped with a note when an
input does not exist.
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import arg_parser, report, result, row

NAME = "stage2"


def _views(teacher, latents):
    from geco.models.teacher import views_from_grid

    return views_from_grid(teacher.decode_latents(latents), teacher.tile_size)


def ablation(cfg, *, dataset: str, teacher_uri: str, stage1: str, stage2: str, objects: int,
             teacher_steps: int) -> dict:
    """The four models' held-out PSNR/SSIM of reconstruction renders vs ground truth (module docstring)."""
    import torch

    from geco.data.loader import iter_dataset
    from geco.data.schema import decode_sample
    from geco.data.shards import read_latest_manifest
    from geco.generate import reconstructor_cameras
    from geco.metrics import psnr, ssim
    from geco.models.bundle import load_bundle
    from geco.models.teacher import _randn, make_teacher
    from geco.train.pretrain import _at_size
    from pipelines.training import split_info

    for what, uri in (("dataset", dataset), ("stage-1 bundle", stage1), ("stage-2 bundle", stage2)):
        if not Path(uri).exists():
            return {"skipped": f"{what} {uri} does not exist: run `geco run --config <config>` (make demo) first"}
    if not teacher_uri:
        return {"skipped": "no teacher with a UNet (pretrain output or models.teacher.pretrained)"}
    t0 = time.perf_counter()
    info, _ = split_info(dataset, read_latest_manifest(dataset), holdout_fraction=cfg.dataset.holdout_fraction,
                         eval_objects=objects)
    keep = set(info.eval_keys)
    rows = sorted((r for r in iter_dataset(dataset, None, decode=False) if r["__key__"] in keep),
                  key=lambda r: r["__key__"])
    teacher = make_teacher(cfg.models.teacher.model_copy(update={"pretrained": teacher_uri}))
    b1, b2 = load_bundle(stage1), load_bundle(stage2)
    recon = b1.reconstructor
    bg = float(recon.cfg.background)
    torch.manual_seed(0)
    metrics: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        s = decode_sample(r, background=None, views="all", with_depth=False, with_normals=False)
        kinds = dict.fromkeys(str(c.get("kind", "random")) for c in s["cameras"][1:])
        groups = [{**s[k], "rgb": s[k]["rgb"] * s[k]["alpha"] + bg * (1 - s[k]["alpha"])} for k in kinds]
        size = min(g["rgb"].shape[-1] for g in groups)
        gt = {k: torch.cat([_at_size(g, size)[k] for g in groups]) for k in ("rgb", "K", "w2c")}
        cond_rgb = (s["cond_rgb"] * s["cond_alpha"] + (1 - s["cond_alpha"]))[None]
        K, c2w = reconstructor_cameras(recon, teacher.tile_size, float(s["cameras"][0].get("azimuth_deg", 0.0)))
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            cond = teacher.encode_condition(cond_rgb, generator=g)
            z = _randn(teacher.latent_shape(1), g, "cpu")
            views = {}
            for name, n in ((f"teacher_{teacher_steps}step", teacher_steps), ("teacher_1step", 1)):
                lat = teacher.sample(cond, num_steps=n, guidance_scale=cfg.stage1.teacher_cfg, sampler="ddim",
                                     generator=torch.Generator().manual_seed(5678), latents=z.clone())
                views[name] = _views(teacher, lat)
            views["stage1_generator"] = _views(b1.teacher, b1.generator(cond, z))
            views["stage2_generator"] = _views(b2.teacher, b2.generator(cond, z))
            for name, v in views.items():
                gauss = recon(v, K[None].float(), c2w[None].float())
                pred, _ = recon.render(gauss, gt["w2c"][None], gt["K"][None], size, size)
                m = metrics.setdefault(name, {"psnr": [], "ssim": []})
                m["psnr"].append(float(psnr(pred[0], gt["rgb"]).mean()))
                m["ssim"].append(float(ssim(pred[0], gt["rgb"]).mean()))
    means = {name: {k: sum(v) / len(v) for k, v in m.items()} for name, m in metrics.items()}
    p = {name: m["psnr"] for name, m in means.items()}
    ordering = p["teacher_1step"] < p["stage1_generator"] < p["stage2_generator"]
    return {"objects": [r["__key__"] for r in rows], "views_per_object": len(gt["rgb"]), "render_size": size,
            "teacher_steps": teacher_steps, "teacher_cfg": cfg.stage1.teacher_cfg, "metrics": means,
            "paper_ordering": ordering, "seconds": round(time.perf_counter() - t0, 1),
            "inputs": {"dataset": dataset, "teacher": teacher_uri, "stage1": stage1, "stage2": stage2}}


def main(argv: list[str] | None = None) -> dict:
    from geco import storage
    from geco.config import load_config
    from pipelines.stage1 import default_inputs

    p = arg_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--dataset", default=None, help="held-out ground truth (default: dataset.uri)")
    p.add_argument("--teacher", default=None, help="teacher folder or pretrain output (default: as stage 1 picks it)")
    p.add_argument("--stage1", default=None, help="stage-1 bundle (default: <stage1.output_uri>/bundle)")
    p.add_argument("--stage2", default=None, help="stage-2 bundle (default: <stage2.output_uri>/bundle)")
    p.add_argument("--objects", type=int, default=4, help="held-out objects evaluated")
    p.add_argument("--teacher-steps", type=int, default=75)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    teacher = args.teacher
    if teacher is None:
        teacher = default_inputs(cfg).teacher_uri
    else:
        from pipelines.stage1 import teacher_folder

        teacher = teacher_folder(teacher)
    res = ablation(cfg, dataset=storage.absolute_uri(args.dataset or cfg.dataset.uri), teacher_uri=teacher,
                   stage1=storage.absolute_uri(args.stage1 or storage.join(cfg.stage1.output_uri, "bundle")),
                   stage2=storage.absolute_uri(args.stage2 or storage.join(cfg.stage2.output_uri, "bundle")),
                   objects=1 if args.quick else args.objects, teacher_steps=2 if args.quick else args.teacher_steps)
    rows_out = []
    if "metrics" in res:
        for name, m in res["metrics"].items():
            rows_out.append(row(f"held-out reconstruction PSNR vs GT: {name}", m["psnr"], "dB"))
            rows_out.append(row(f"held-out reconstruction SSIM vs GT: {name}", m["ssim"], "SSIM"))
        print(f"stage 2 ablation ({len(res['objects'])} held-out objects x {res['views_per_object']} views, "
              f"{res['seconds']} s): paper ordering (1-step teacher < stage 1 < stage 2): {res['paper_ordering']}")
    else:
        print(f"stage 2 ablation: skipped ({res['skipped']})")
    out = result(NAME, rows_out, {"ablation": res})
    report(out, args.out, quick=args.quick)
    return out


if __name__ == "__main__":
    main()
