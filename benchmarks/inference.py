"""Time to 3D: one-step generator + reconstructor vs the 75-step teacher + the same reconstructor.

``python -m benchmarks.inference [--quick] [--pairs 3] [--threads 1] [--steps 75]`` ->
``benchmarks/results/inference.json``.

* **Case (A)**, GECO: condition encoding + ONE generator UNet evaluation (plus its reference pass)
  + VAE decoding + the reconstructor (:func:`geco.generate.generate`).
* **Baseline (B)**, what GECO replaces (its pseudo-GT and InstantMesh's inference): the teacher,
  75 sampling steps with CFG 4 (Euler-ancestral, "trailing" spacing: one batched UNet call of 2 per
  step, each with its reference pass), VAE decoding, then the **same** reconstructor.
* **Same model sizes** in both arms: one checkpoint bundle with the teacher UNet; the generator is
  the teacher UNet's copy (random weights: the cost of a forward does not depend on them).
  CPU size, "small but not tiny" (stated in ``details.sizes``): 64 px tiles (3 x 2 grid, 192 x 128),
  64 px condition; VAE 32/64/128/128 (x8 down: latent 4 x 24 x 16); UNet 64/128/256/256, 2 layers per
  block, cross-attention 256 (42 M parameters); CLIP vision 128 wide, 4 layers; reconstructor
  LGM-style 32/64/128/256 down, 256/128/64 up, 2 ResNets per block, input 64 px -> 6 x 32^2 = 6,144
  Gaussians (15 M parameters).
* **Timing**: wall seconds per object around the whole arm (condition image already prepared;
  models loaded and warmed up by one run of each arm), ``--pairs`` A/B pairs, order alternating
  (AB, BA, ...); headline ratio = median over pairs of B seconds / A seconds; target >= 30x.
  UNet calls per object are **counted with forward hooks** in both arms.
  ``--threads 1`` by default: on this shared 2-core machine OpenMP's spinning threads make small
  ops tens of times slower under load; one thread is what a per-object worker would get.
* **Peak memory**: each arm runs once in a **fresh subprocess** that loads the bundle, records its
  resident set (VmRSS), resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``),
  generates one object and reads the peak (VmHWM). Reported: peak working memory = VmHWM - VmRSS
  before the object (activations, scheduler state, allocator growth), and the process peak (with
  the weights). RSS sees every allocation torch makes; tracemalloc would see only Python's.
* **GPU, paper size** (only where CUDA is available; otherwise a visible "skipped" row): random
  weights at the paper's sizes - SD2-size UNet (320/640/1280/1280, 2 layers per block, cross-attention
  1024, 5/10/20/20 heads, linear projections; 866 M), SD VAE (128/256/512/512, 2 layers), CLIP
  ViT-H/14 vision tower (1280 wide, 32 layers, 224 px, projection 1024), 320 px tiles (latent
  4 x 120 x 80), 512 px condition, LGM "big" reconstructor at 256 px (6 x 128^2 Gaussians), all float16.
  Rows: seconds per object of A (target < 0.3 s: baseline 0.3 = the budget, ratio = 0.3 / seconds,
  target ratio 1) and of B, their ratio, and peak GPU memory (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, alternate, arg_parser, median, report, result, row

NAME = "inference"
TARGET_RATIO = 30.0
GPU_BUDGET_S = 0.3

CPU_SIZE = [
    "teacher.tile_size=64", "teacher.cond_size=64", "teacher.tiny_block_out_channels=[64,128,256,256]",
    "teacher.tiny_layers_per_block=2", "teacher.tiny_cross_attention_dim=256", "teacher.tiny_attention_head_dim=32",
    "teacher.tiny_vae_channels=[32,64,128,128]", "teacher.tiny_clip_hidden=128", "teacher.tiny_clip_layers=4",
    "teacher.tiny_clip_image_size=64",
    "reconstructor.input_size=64", "reconstructor.lgm.down_channels=[32,64,128,256]",
    "reconstructor.lgm.down_attention=[false,false,true,true]", "reconstructor.lgm.up_channels=[256,128,64]",
    "reconstructor.lgm.up_attention=[true,true,false]", "reconstructor.lgm.num_heads=4", "reconstructor.lgm.norm_groups=8",
    "reconstructor.lgm.layers_per_block=2",
]
QUICK_SIZE: list[str] = []  # the TINY_MODELS preset (32 px tiles)


# ------------------------------------------------------------------------------------------------
# the two arms
# ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cond_image(size: int):
    """A deterministic synthetic condition image: a shaded disc on white, [3, size, size]."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.6).float()
    rgb = torch.stack([0.8 - 0.3 * xx, 0.4 + 0.2 * yy, 0.3 + 0.0 * xx]).clamp(0, 1)
    return rgb * disc + (1 - disc)


def run_one_step(bundle, cond, seed: int) -> dict:
    """Arm A: generator (encode + 1 UNet evaluation + decode) + reconstructor; seconds and counts."""
    from geco.generate import generate

    dev = bundle.device
    _sync(dev)
    t0 = time.perf_counter()
    [r] = generate(bundle, cond, seed=seed)
    _sync(dev)
    return {"seconds": time.perf_counter() - t0, "generator_s": r.timings["generator_s"],
            "reconstructor_s": r.timings["reconstructor_s"], "unet_calls": r.evals["unet"],
            "unet_denoise": r.evals["unet_denoise"]}


def run_teacher(bundle, cond, seed: int, steps: int, guidance: float = 4.0) -> dict:
    """Arm B: teacher sampling (``steps`` steps, CFG ``guidance``) + decode + the same reconstructor."""
    import torch

    from geco.generate import count_calls, reconstructor_cameras
    from geco.models.teacher import views_from_grid

    teacher, rec, dev = bundle.teacher, bundle.reconstructor, bundle.device
    K, c2w = reconstructor_cameras(rec, teacher.tile_size)
    K, c2w = K[None].to(dev), c2w[None].to(dev)
    x = cond[None].to(dev)
    with torch.no_grad(), count_calls({"unet": teacher.unet}) as n:
        _sync(dev)
        t0 = time.perf_counter()
        latents = teacher.sample(x, num_steps=steps, guidance_scale=guidance,
                                 generator=torch.Generator("cpu").manual_seed(seed))
        views = views_from_grid(teacher.decode_latents(latents), teacher.tile_size)
        _sync(dev)
        t1 = time.perf_counter()
        rec(views, K, c2w)
        _sync(dev)
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "teacher_s": t1 - t0, "reconstructor_s": t2 - t1, "unet_calls": n["unet"],
            "unet_denoise": n["unet_denoise"]}


# ------------------------------------------------------------------------------------------------
# peak memory in a fresh process
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_child(case: str, bundle_dir: str, steps: int, threads: int) -> dict:
    """Runs in a fresh interpreter: load, note RSS, reset the peak mark, one object, read the peak."""
    import torch

    torch.set_num_threads(threads)
    from geco.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    cond = _cond_image(bundle.teacher.cond_size)
    rss_before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs=5"
    except OSError:
        method = "VmHWM without reset (includes loading)"
    out = run_one_step(bundle, cond, 0) if case == "one_step" else run_teacher(bundle, cond, 0, steps)
    peak = _status_kib("VmHWM")
    return {"case": case, "rss_before_mib": rss_before / 1024, "peak_rss_mib": peak / 1024,
            "peak_working_mib": (peak - rss_before) / 1024, "method": method, "seconds": out["seconds"]}


def measure_memory(case: str, bundle_dir: Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "benchmarks.inference", "--memory-child", case, "--bundle", str(bundle_dir),
           "--steps", str(steps), "--threads", str(threads)]
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {case} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# GPU at the paper's size
# ------------------------------------------------------------------------------------------------
def paper_size_bundle(device, dtype):
    """Random-weight models at the paper's sizes (module docstring), as a :class:`Bundle` in ``dtype``
    (the reconstructor too, for float16/bfloat16). The generator shares the teacher's UNet module (same
    cost; one copy of the weights in memory). Also used by ``benchmarks/gpu.py``."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from geco.config import GeneratorConfig, ModelsConfig, ReconstructorConfig, TeacherConfig
    from geco.models.bundle import Bundle
    from geco.models.generator import OneStepGenerator
    from geco.models.reconstructors import build_reconstructor
    from geco.models.teacher import (
        CLIP_MEAN,
        CLIP_RESAMPLE,
        CLIP_STD,
        IMAGE_MEAN,
        IMAGE_STD,
        TEXT_LENGTH,
        VAE_RESAMPLE,
        ZERO123PP_SCHEDULER,
        ImagePreprocess,
        Zero123PlusTeacher,
    )

    tcfg = TeacherConfig(tile_size=320, cond_size=512)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=512)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"))
        text_states = torch.randn(1, TEXT_LENGTH, 1024) * 0.5
        rcfg = ReconstructorConfig(dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32"))
        rec = build_reconstructor(rcfg).eval()
    for m in (unet, vae, vision):
        m.to(dtype)
    teacher = Zero123PlusTeacher(
        cfg=tcfg, unet=unet, vae=vae, scheduler=EulerAncestralDiscreteScheduler(**ZERO123PP_SCHEDULER),
        vision_encoder=vision, text_states=text_states.cpu(), ramping_coefficients=torch.linspace(0, 1, TEXT_LENGTH),
        clip_preprocess=ImagePreprocess(224, (224, 224), CLIP_MEAN, CLIP_STD, resample=CLIP_RESAMPLE),
        vae_preprocess=ImagePreprocess(512, (512, 512), (IMAGE_MEAN,) * 3, (IMAGE_STD,) * 3, resample=VAE_RESAMPLE)).to(device)
    gen = OneStepGenerator(teacher, teacher.unet, GeneratorConfig())
    cfg = ModelsConfig(teacher=tcfg, generator=GeneratorConfig(), reconstructor=rcfg)
    return Bundle(teacher, gen, rec, cfg).eval()


def _params_m(m) -> float:
    return round(sum(p.numel() for p in m.parameters()) / 1e6, 1)


def gpu_paper_size(pairs: int, steps: int, device: str = "cuda", a_repeats: int = 10,
                   warmup: bool = True) -> tuple[list[dict], dict]:
    import torch

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    bundle = paper_size_bundle(dev, dtype)
    build_s = time.perf_counter() - t0
    cond = _cond_image(512)
    if warmup:
        run_one_step(bundle, cond, 0)  # warm-up (cuDNN autotuning, lazy inits)
        run_teacher(bundle, cond, 0, min(steps, 2))
    a_runs, b_runs, peaks = [], [], {}

    def arm_a(i):
        rs = [run_one_step(bundle, cond, 100 * i + k) for k in range(a_repeats)]
        a_runs.extend(rs)
        return median([r["seconds"] for r in rs])

    def arm_b(i):
        r = run_teacher(bundle, cond, i, steps)
        b_runs.append(r)
        return r["seconds"]

    results = alternate(pairs, arm_a, arm_b)
    for name, fn in (("one_step", lambda: run_one_step(bundle, cond, 0)),
                     ("teacher", lambda: run_teacher(bundle, cond, 0, steps))):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            fn()
            torch.cuda.synchronize()
            peaks[name] = {"peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20,
                           "working_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
    a_s, b_s = median([a for a, _ in results]), median([b for _, b in results])
    ratio = median([b / a for a, b in results])
    where = "gpu" if dev.type == "cuda" else "cpu (smoke: the GPU path's code, timings not meaningful)"
    rows = [
        row(f"{where} paper size: one-step generator + reconstructor, s/object (budget {GPU_BUDGET_S} s)", a_s, "s",
            baseline=GPU_BUDGET_S, ratio=GPU_BUDGET_S / a_s, target=1.0),
        row(f"{where} paper size: teacher {steps} steps CFG 4 + reconstructor, s/object", b_s, "s",
            baseline=a_s, ratio=ratio),
    ]
    if peaks:
        rows.append(row(f"{where} paper size: peak GPU memory one-step vs teacher (MiB)", peaks["one_step"]["peak_mib"],
                        "MiB", baseline=peaks["teacher"]["peak_mib"],
                        ratio=peaks["teacher"]["peak_mib"] / peaks["one_step"]["peak_mib"]))
    details = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype),
        "build_s": round(build_s, 1), "pairs": pairs, "one_step_repeats_per_pair": a_repeats, "steps": steps,
        "sizes": {"unet_params_m": _params_m(bundle.generator.unet), "vae_params_m": _params_m(bundle.teacher.vae),
                  "vision_params_m": _params_m(bundle.teacher.vision_encoder),
                  "reconstructor_params_m": _params_m(bundle.reconstructor),
                  "latent": list(bundle.teacher.latent_shape(1)), "tile_px": 320, "cond_px": 512,
                  "reconstructor_input_px": 256},
        "one_step_breakdown_s": {"generator": median([r["generator_s"] for r in a_runs]),
                                 "reconstructor": median([r["reconstructor_s"] for r in a_runs])},
        "teacher_breakdown_s": {"teacher": median([r["teacher_s"] for r in b_runs]),
                                "reconstructor": median([r["reconstructor_s"] for r in b_runs])},
        "unet_calls": {"one_step": a_runs[0]["unet_calls"], "teacher": b_runs[0]["unet_calls"]},
        "peak_memory": peaks,
    }
    return rows, details


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict | None:
    p = arg_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs (alternating order)")
    p.add_argument("--steps", type=int, default=75, help="teacher sampling steps (GECO/InstantMesh: 75)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-gpu", action="store_true", help="skip the paper-size GPU case")
    p.add_argument("--gpu-path-on-cpu", action="store_true",
                   help="developer check: run the paper-size path's code on CPU (1 pair, 1 teacher step; minutes, ~10 GB)")
    p.add_argument("--memory-child", choices=["one_step", "teacher"], help=argparse_hidden())
    p.add_argument("--bundle", help=argparse_hidden())
    args = p.parse_args(argv)

    import torch

    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child, args.bundle, args.steps, args.threads)), flush=True)
        return None
    torch.set_num_threads(args.threads)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.gpu_path_on_cpu:
        rows, details = gpu_paper_size(1, 1, device="cpu", a_repeats=1, warmup=False)
        res = result(NAME + "-gpu-path-smoke", rows, details)
        report(res, args.out, quick=True)
        return res
    if args.quick:  # a smoke run: tiny models, few steps (the ratio is then not the real one)
        args.pairs, args.steps, size = 1, min(args.steps, 8), QUICK_SIZE
    else:
        size = CPU_SIZE

    from geco.models.bundle import init_tiny_bundle, load_bundle, tiny_models_config

    cfg = tiny_models_config(size)
    work = Path(tempfile.mkdtemp(prefix="geco-bench-inference-"))
    try:
        bundle_dir = Path(init_tiny_bundle(work / "bundle", cfg, seed=0, include_teacher_unet=True))
        bundle = load_bundle(bundle_dir)
        cond = _cond_image(bundle.teacher.cond_size)
        t_total = time.perf_counter()
        run_one_step(bundle, cond, 0)  # warm-up both arms (lazy inits, allocator growth)
        run_teacher(bundle, cond, 0, 2)
        a_runs, b_runs = [], []

        def arm_a(i):
            r = run_one_step(bundle, cond, i)
            a_runs.append(r)
            return r["seconds"]

        def arm_b(i):
            r = run_teacher(bundle, cond, i, args.steps)
            b_runs.append(r)
            return r["seconds"]

        pairs = alternate(args.pairs, arm_a, arm_b)
        for i, (a, b) in enumerate(pairs):
            print(f"  pair {i}: one-step {a:.3f} s  teacher {args.steps} steps {b:.2f} s  ratio {b / a:.1f}x", flush=True)
        mem = {c: measure_memory(c, bundle_dir, args.steps, args.threads) for c in ("one_step", "teacher")}
        wall = time.perf_counter() - t_total
        ratios = [b / a for a, b in pairs]
        a_s, b_s = median([a for a, _ in pairs]), median([b for _, b in pairs])
        tag = "cpu quick (tiny)" if args.quick else "cpu small (64 px tiles)"
        rows = [
            row(f"{tag}: one-step generator + reconstructor vs teacher {args.steps} steps CFG 4 + same reconstructor, "
                "s/object", a_s, "s", baseline=b_s, ratio=median(ratios), target=TARGET_RATIO),
            row(f"{tag}: UNet calls per object (forward hooks; each step = reference + sample pass)",
                a_runs[0]["unet_calls"], "calls", baseline=b_runs[0]["unet_calls"],
                ratio=b_runs[0]["unet_calls"] / a_runs[0]["unet_calls"]),
            row(f"{tag}: peak working memory per object (RSS, fresh process)", mem["one_step"]["peak_working_mib"],
                "MiB", baseline=mem["teacher"]["peak_working_mib"],
                ratio=mem["teacher"]["peak_working_mib"] / max(mem["one_step"]["peak_working_mib"], 1e-3)),
            row(f"{tag}: process peak RSS incl. weights", mem["one_step"]["peak_rss_mib"], "MiB",
                baseline=mem["teacher"]["peak_rss_mib"],
                ratio=mem["teacher"]["peak_rss_mib"] / mem["one_step"]["peak_rss_mib"]),
        ]
        b = bundle
        sizes = {"overrides": size, "unet_params_m": _params_m(b.generator.unet),
                 "vae_params_m": _params_m(b.teacher.vae), "vision_params_m": _params_m(b.teacher.vision_encoder),
                 "reconstructor_params_m": _params_m(b.reconstructor), "latent": list(b.teacher.latent_shape(1)),
                 "tile_px": b.teacher.tile_size, "cond_px": b.teacher.cond_size,
                 "reconstructor_input_px": b.reconstructor.input_size, "gaussians": b.reconstructor.num_gaussians(6)}
        del b
        if args.no_gpu or args.quick:
            rows.append(row("gpu paper size: skipped (--no-gpu/--quick)", None, "s"))
            gpu_details = {"skipped": "--no-gpu or --quick"}
        elif not torch.cuda.is_available():
            print("  gpu paper-size case: SKIPPED (no CUDA device on this machine)", flush=True)
            rows.append(row("gpu paper size: one-step + reconstructor s/object - SKIPPED: no CUDA device", None, "s",
                            target=None))
            gpu_details = {"skipped": "no CUDA device"}
        else:
            del bundle
            gpu_rows, gpu_details = gpu_paper_size(args.pairs, args.steps)
            rows.extend(gpu_rows)
        details = {
            "what": "s/object: wall seconds of one object per arm, condition image prepared, models loaded and warmed "
                    "up; ratio = median over pairs of teacher-arm seconds / one-step-arm seconds (pairs alternate AB/BA).",
            "sizes": sizes,
            "threads": args.threads, "steps": args.steps, "guidance": 4.0, "sampler": cfg.teacher.sampler,
            "pairs": [{"one_step_s": round(a, 4), "teacher_s": round(b, 3), "ratio": round(b / a, 2)} for a, b in pairs],
            "one_step_breakdown_s": {"generator": median([x["generator_s"] for x in a_runs]),
                                     "reconstructor": median([x["reconstructor_s"] for x in a_runs])},
            "teacher_breakdown_s": {"teacher": median([x["teacher_s"] for x in b_runs]),
                                    "reconstructor": median([x["reconstructor_s"] for x in b_runs])},
            "memory": {"method": "fresh subprocess per arm: VmRSS after loading, clear_refs=5 resets the peak, one "
                                 "object, VmHWM", **mem},
            "gpu": gpu_details,
            "wall_s": round(wall, 1),
            "quick": bool(args.quick),
        }
        res = result(NAME, rows, details)
        report(res, args.out, quick=args.quick)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
