"""Every GPU check in one run of under 8 minutes -> ``benchmarks/results/gpu.json``.

``python -m benchmarks gpu [--quick] [--out DIR] [--deadline-s 450]`` (``make bench BENCH=gpu``).

Nothing in the project had run on a GPU; a lent GPU machine gives ~15 minutes in all, start-up
included. This script spends them on, in this order (each check in its own ``try``: an error is a
FAILED row with the message, the others go on; each has a time budget enforced with SIGALRM, and a
global deadline, ``--deadline-s``, skips what no longer fits, visibly; the JSON is rewritten after
every check, so a killed run still leaves what it measured):

1. **Inference at the paper's size**, random weights (``benchmarks.inference.paper_size_bundle``:
   SD2-size UNet, SD VAE, CLIP ViT-H/14, 320 px tiles, LGM "big" at 256 px), in float16 and in
   bfloat16: the one-step generator + the reconstructor, warm, median of ``repeats`` objects, against
   the budget 0.15 s/object (``generate()`` does not render: the rasterization of one object in 6
   views is timed after check 4, once gsplat is built, and added in "+ rasterization" rows);
   the 75-step teacher (CFG 4) + the same reconstructor is **extrapolated** from timing ``k1`` and
   ``k2`` steps (``s(75) = s(k1) + (75 - k1) (s(k2) - s(k1)) / (k2 - k1)``; the rows say so); peak
   GPU memory of each arm (``torch.cuda.max_memory_allocated`` from a reset before the object).
   Attention is torch SDPA already (the teacher's processors chain ``AttnProcessor2_0``).
2. **Stage 1, one step at the paper's size** (:class:`geco.distill.vsd.VSDStep` built directly from
   the library: the teacher in paper.yaml's ``models.teacher.dtype`` (float32),
   ``OneStepGenerator.from_teacher`` in fp32, ``make_fake_score``, two ``GradientStep`` s with AdamW; settings = ``configs/paper.yaml``'s
   ``stage1``; gradient checkpointing on both UNets; bf16 autocast, the VSD gradient in fp32 as
   ``vsd_gradient`` computes it), with the full fake-score copy paper.yaml uses and with the LoRA
   option: seconds per step (the second step; the first allocates Adam's state) and peak memory
   against :func:`geco.distill.vsd.estimate_stage1_memory` (which leaves out the VAE, the CLIP
   encoder, the reconstructor and the CUDA context, and counts the teacher at 16 bit: ``details``
   lists those weights and the estimate with the teacher in its dtype).
3. **Stage 2 and pseudo-GT** as ``configs/paper.yaml`` runs them: one stage-2 step
   (:class:`geco.distill.consistency.ConsistencyStep`: generator -> decode -> frozen reconstructor ->
   ``views_per_step`` views at ``render_size`` -> MSE; LPIPS left out, its VGG weights cannot be
   downloaded) in seconds and peak memory; pseudo-GT seconds per object: the teacher's DDIM batched
   vs one object (extrapolated to ``steps`` like the inference rows), the reconstructor, and the
   ``num_views`` renders with depth.
4. **gsplat vs the torch rasterizer** (:func:`geco.render.splat.rasterize`, one entry point: CUDA
   tensors go to gsplat, CPU tensors to the pure-torch path) on random scenes: forward (colours
   with depth, alphas) max abs difference, tolerance ``SPLAT_FWD_ATOL``; gradients of a random
   linear loss w.r.t. means, quats, scales, opacities, colours, relative L2 error, tolerance
   ``SPLAT_GRAD_RTOL``. gsplat compiles its CUDA kernels at first use (minutes): the script starts
   that build in a background process at once (cached in ``TORCH_EXTENSIONS_DIR``), so it overlaps
   checks 1-2 (their timings then share the CPU with the compiler; ``details`` says how long).
5. **channels-last + torch.compile** of the generator UNet (fp16), one-step s/object again, last
   because compiling may not fit; what it reaches is reported.

Without CUDA the same code runs at tiny size (the ``TINY_MODELS`` bundle, float32) so CI tests its
logic; the GPU-only parts are "skipped" rows, and the rasterizer parity compares the torch path in
float32 against itself in float64.

On the lent H200 (Python 3.12, torch with CUDA preinstalled; no network): ``benchmarks/gpu_prepare.sh``
downloads the missing wheels into ``.whl/`` here; then, carrying ``.whl``, one command there::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && PYTHONPATH=/tmp/site:. TORCH_EXTENSIONS_DIR=/tmp/torch_ext \\
      python3 -m benchmarks gpu --out "${OUT:-benchmarks/results}"

(``$OUT`` is the folder the device tool brings back; ``make gpu-wheels`` runs the prepare script.)
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, arg_parser, median, report, result, row, save
from benchmarks.inference import _cond_image, _params_m, paper_size_bundle, run_one_step, run_teacher

NAME = "gpu"
BUDGET_ONE_STEP_S = 0.15  # the goal: one-step generator + reconstructor under 0.15 s/object on the H200
TEACHER_STEPS = 75  # the teacher's sampling steps (GECO/InstantMesh), CFG 4
DEFAULT_DEADLINE_S = 450.0  # the whole run, from the start of main(); the machine's 15 min include start-up
MIN_START_S = 15.0  # a check does not start with less than this left before the deadline
SPLAT_FWD_ATOL = 1e-3  # gsplat (fast-math CUDA) vs torch path, colours/depth/alphas, max abs
SPLAT_GRAD_RTOL = 2e-2  # relative L2 error of each input's gradient
CPU_FWD_ATOL = 1e-4  # torch path float32 vs float64
CPU_GRAD_RTOL = 1e-3
GIB = 2 ** 30


class CheckTimeout(Exception):
    """A check ran past its time budget (raised from SIGALRM)."""


@dataclass
class Run:
    """What the checks share: device, sizes, repeats, the deadline, rows and details so far."""

    device: Any
    paper: bool  # paper size on CUDA, tiny on CPU
    quick: bool
    deadline: float  # time.monotonic() value
    out: str | None
    rows: list[dict] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    gsplat_build: Any = None  # the background build's Popen (CUDA only)
    gsplat_build_t0: float = 0.0
    gsplat_log: str = ""  # the build's output (a file: a pipe would fill up and stall the compiler)
    _bundles: dict[str, Any] = field(default_factory=dict)
    _tmp: Path | None = None

    @property
    def tag(self) -> str:
        return "gpu paper" if self.paper else "cpu tiny"

    @property
    def repeats(self) -> int:
        return (3 if self.quick else 10) if self.paper else 1

    def bundle(self, dtype):
        """The model bundle in ``dtype`` (one kept at a time: paper-size bundles are ~5 GB each)."""
        import torch

        key = str(dtype)
        if key not in self._bundles:
            self.free()
            if self.paper:
                b = paper_size_bundle(self.device, dtype)
            else:
                from geco.models.bundle import init_tiny_bundle, load_bundle

                self._tmp = self._tmp or Path(tempfile.mkdtemp(prefix="geco-bench-gpu-"))
                path = self._tmp / "bundle"
                if not path.exists():
                    init_tiny_bundle(path, seed=0, include_teacher_unet=True)
                b = load_bundle(path).to(self.device)
                if dtype != torch.float32:
                    raise ValueError("the tiny CPU bundle runs in float32 only")
            self._bundles[key] = b.eval()
        return self._bundles[key]

    def free(self) -> None:
        import torch

        self._bundles.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def skip(self, case: str, why: str, unit: str = "s") -> None:
        self.rows.append(row(f"{self.tag}: {case} - skipped: {why}", None, unit))


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak(device):
    """Yields a dict; on exit it holds ``peak_gib`` (max allocated since entry) and ``base_gib``."""
    import torch

    out: dict[str, float] = {}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out["base_gib"] = torch.cuda.memory_allocated(device) / GIB
    try:
        yield out
    finally:
        torch.cuda.synchronize(device)
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise :class:`CheckTimeout` in this (main) thread after ``seconds``."""
    def on_alarm(signum, frame):
        raise CheckTimeout(f"ran past its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, min(max(seconds, 1.0), 1e6))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------
# 1. inference
# ------------------------------------------------------------------------------------------------
def _teacher_steps(run: Run) -> tuple[int, int]:
    return (2, 6) if run.paper else (1, 2)


def check_inference(run: Run, dtype_name: str) -> None:
    """One-step + reconstructor s/object and peak memory vs the teacher (extrapolated to 75 steps)."""
    import torch

    dtype = getattr(torch, dtype_name)
    if not run.paper and dtype_name != "float32":
        run.skip(f"inference {dtype_name}", "no CUDA device (the tiny CPU run is float32)")
        return
    b = run.bundle(dtype)
    cond = _cond_image(b.teacher.cond_size)
    k1, k2 = _teacher_steps(run)
    run_one_step(b, cond, 0)  # warm-up (cuDNN autotuning, lazy inits)
    run_teacher(b, cond, 0, k1)
    a = [run_one_step(b, cond, 1 + i) for i in range(run.repeats)]
    n_b = 2 if run.paper else 1
    s_k1 = [run_teacher(b, cond, i, k1)["seconds"] for i in range(n_b)]
    s_k2 = [run_teacher(b, cond, i, k2)["seconds"] for i in range(n_b)]
    per_step = max(median(s_k2) - median(s_k1), 0.0) / (k2 - k1)  # noise can make the difference negative
    teacher_s = median(s_k1) + (TEACHER_STEPS - k1) * per_step
    pa, pb = {}, {}
    if run.device.type == "cuda":
        with _peak(run.device) as pa:
            run_one_step(b, cond, 0)
        with _peak(run.device) as pb:
            run_teacher(b, cond, 0, k1)  # the peak does not grow with the number of steps
    one_s = median([r["seconds"] for r in a])
    tag = f"{run.tag} {dtype_name}"
    run.rows.append(row(f"{tag}: one-step generator + reconstructor, s/object (warm, median of {run.repeats}; "
                        f"budget {BUDGET_ONE_STEP_S} s)", one_s, "s", baseline=BUDGET_ONE_STEP_S,
                        ratio=BUDGET_ONE_STEP_S / one_s, target=1.0 if run.paper else None))
    run.rows.append(row(f"{tag}: teacher {TEACHER_STEPS} steps CFG 4 + same reconstructor, s/object "
                        f"(EXTRAPOLATED from {k1} and {k2} steps)", teacher_s, "s", baseline=one_s,
                        ratio=teacher_s / one_s))
    if "peak_gib" in pa:
        run.rows.append(row(f"{tag}: peak GPU memory, one-step arm vs teacher arm", pa["peak_gib"], "GiB",
                            baseline=pb["peak_gib"], ratio=pb["peak_gib"] / pa["peak_gib"]))
    else:
        run.skip(f"{dtype_name} peak GPU memory", "no CUDA device", "GiB")
    run.details[f"inference_{dtype_name}"] = {
        "one_step_s": [round(r["seconds"], 4) for r in a],
        "one_step_breakdown_s": {"generator": median([r["generator_s"] for r in a]),
                                 "reconstructor": median([r["reconstructor_s"] for r in a])},
        "unet_calls_one_step": a[0]["unet_calls"],
        "teacher_timed_steps": {str(k1): s_k1, str(k2): s_k2}, "teacher_per_step_s": per_step,
        "teacher_extrapolated_s": teacher_s,
        "peak_memory_gib": {"one_step": pa, "teacher": pb},
        "sizes": {"unet_params_m": _params_m(b.generator.unet), "vae_params_m": _params_m(b.teacher.vae),
                  "vision_params_m": _params_m(b.teacher.vision_encoder),
                  "reconstructor_params_m": _params_m(b.reconstructor), "latent": list(b.teacher.latent_shape(1)),
                  "tile_px": b.teacher.tile_size, "cond_px": b.teacher.cond_size},
    }


def check_compiled(run: Run) -> None:
    """fp16 one-step s/object with the generator UNet (and VAE) in channels-last, then torch.compile."""
    import torch

    if not run.paper:
        run.skip("one-step channels-last / torch.compile", "no CUDA device")
        return
    b = run.bundle(torch.float16)
    cond = _cond_image(b.teacher.cond_size)
    for m in (b.generator.unet, b.teacher.vae):
        m.to(memory_format=torch.channels_last)
    run_one_step(b, cond, 0)
    cl = median([run_one_step(b, cond, 1 + i)["seconds"] for i in range(run.repeats)])
    run.rows.append(row(f"{run.tag} float16 channels-last: one-step + reconstructor, s/object", cl, "s",
                        baseline=BUDGET_ONE_STEP_S, ratio=BUDGET_ONE_STEP_S / cl, target=1.0))
    run.details["channels_last_s"] = cl
    t0 = time.perf_counter()
    b.generator.unet = torch.compile(b.generator.unet)
    run_one_step(b, cond, 0)  # compiles
    run_one_step(b, cond, 0)
    run.details["compile_s"] = time.perf_counter() - t0
    co = median([run_one_step(b, cond, 1 + i)["seconds"] for i in range(run.repeats)])
    run.rows.append(row(f"{run.tag} float16 channels-last + torch.compile(UNet): one-step + reconstructor, s/object",
                        co, "s", baseline=BUDGET_ONE_STEP_S, ratio=BUDGET_ONE_STEP_S / co, target=1.0))
    run.details["compiled_s"] = co


# ------------------------------------------------------------------------------------------------
# 2. stage 1
# ------------------------------------------------------------------------------------------------
def _paper() -> dict:
    """``configs/paper.yaml`` as a dict."""
    import yaml

    return yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())


def _paper_section(name: str, model):
    """``configs/paper.yaml``'s section ``name`` validated as ``model`` (a geco.config section class)."""
    return model.model_validate(_paper()[name])


def paper_teacher_dtype() -> str:
    """The dtype name paper.yaml keeps the teacher in (``models.teacher.dtype``)."""
    from geco.config import TeacherConfig

    return _paper().get("models", {}).get("teacher", {}).get("dtype", TeacherConfig().dtype)


def paper_stage1_settings(fake_score: str):
    """``configs/paper.yaml``'s ``stage1`` section (a :class:`geco.config.Stage1Config`) with ``fake_score``,
    and its teacher's dtype name (``models.teacher.dtype``)."""
    from geco.config import Stage1Config

    return _paper_section("stage1", Stage1Config).model_copy(update={"fake_score": fake_score}), paper_teacher_dtype()


def check_stage1(run: Run, fake_score: str) -> None:
    """One VSDStep (generator update + fake-score update) at the paper's size: seconds and peak memory."""
    import torch

    from geco.distill.vsd import (
        FakeScoreObjective,
        GeneratorObjective,
        VSDStep,
        estimate_stage1_memory,
        make_fake_score,
        set_gradient_checkpointing,
    )
    from geco.models.generator import OneStepGenerator
    from geco.train.loop import GradientStep, effective_precision, make_adamw

    s, teacher_dtype = paper_stage1_settings(fake_score)
    train = s.train
    dev = run.device
    b = run.bundle(getattr(torch, teacher_dtype) if run.paper else torch.float32)
    teacher = b.teacher
    teacher.requires_grad_(False)
    teacher.eval()
    precision = effective_precision(dev, train.mixed_precision)
    with _peak(dev) as mem:
        generator = OneStepGenerator.from_teacher(teacher, b.generator.cfg)
        generator.unet.to(dev, torch.float32)  # trained weights in fp32, as geco.train.stage1
        generator.train()
        fake = make_fake_score(teacher, s.fake_score, lora_rank=s.lora_rank, lora_alpha=s.lora_alpha or None,
                               trainable_dtype=torch.float32)
        fake.unet.train()
        set_gradient_checkpointing(generator.unet, train.gradient_checkpointing)
        set_gradient_checkpointing(fake.unet, train.gradient_checkpointing)
        gen_obj = GeneratorObjective(generator, teacher, fake, s)
        fake_obj = FakeScoreObjective(fake, teacher, s)
        steppers = []
        for obj, lr, betas in ((gen_obj, s.lr_generator, s.betas_generator), (fake_obj, s.lr_fake, s.betas_fake)):
            params = [p for p in obj.parameters() if p.requires_grad]
            steppers.append(GradientStep(params, make_adamw(params, lr=lr, betas=betas), None, device=dev,
                                         mixed_precision=precision))
        step = VSDStep(teacher, gen_obj, fake_obj, steppers[0], steppers[1], s)
        cond = _cond_image(teacher.cond_size)[None].repeat(train.batch_size, 1, 1, 1).to(dev)
        seconds = []
        for i in range(2 if run.paper else 1):  # the first allocates Adam's state (tiny CPU run: one step)
            _sync(dev)
            t0 = time.perf_counter()
            metrics = step([{"cond": cond, "keys": ["bench"] * train.batch_size}], torch.Generator().manual_seed(i))
            _sync(dev)
            seconds.append(time.perf_counter() - t0)
    c = teacher.cond_size // 8
    est = estimate_stage1_memory(unet_params=sum(p.numel() for p in teacher.unet.parameters()),
                                 latent_shape=teacher.latent_shape(1)[1:], batch=train.batch_size,
                                 lora=fake_score == "lora", dtype=torch.bfloat16, lora_rank=s.lora_rank,
                                 cond_latent_hw=(c, c), gradient_checkpointing=train.gradient_checkpointing)
    what = (f"{run.tag}: stage-1 step, fake score {fake_score} (batch {train.batch_size}, checkpointing "
            f"{train.gradient_checkpointing}, {precision})")
    run.rows.append(row(f"{what}, s/step ({'2nd' if len(seconds) > 1 else '1st'} step)", seconds[-1], "s"))
    if "peak_gib" in mem:
        run.rows.append(row(f"{what}: peak GPU memory vs estimate_stage1_memory total (ratio = estimate/measured)",
                            mem["peak_gib"], "GiB", baseline=est["total"], ratio=est["total"] / mem["peak_gib"]))
    else:
        run.skip(f"stage-1 {fake_score} peak GPU memory vs estimate", "no CUDA device", "GiB")
    others = {"vae_params_m": _params_m(teacher.vae), "vision_params_m": _params_m(teacher.vision_encoder),
              "reconstructor_params_m": _params_m(b.reconstructor)}
    # the estimate counts the teacher's weights at 16 bit; paper.yaml keeps them in teacher_dtype
    teacher_extra = est["teacher_weights"] * (torch.finfo(getattr(torch, teacher_dtype)).bits / 16 - 1)
    run.details[f"stage1_{fake_score}"] = {
        "seconds": seconds, "memory_gib": mem, "estimate_gib": est, "teacher_dtype": teacher_dtype,
        "estimate_total_with_teacher_in_its_dtype_gib": round(est["total"] + teacher_extra, 3),
        "not_in_estimate": others,
        "metrics_step2": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()},
        "settings": {"lr_generator": s.lr_generator, "lr_fake": s.lr_fake, "fake_loss": s.fake_loss,
                     "teacher_cfg": s.teacher_cfg, "fake_steps": s.fake_steps, "lora_rank": s.lora_rank},
    }
    del step, steppers, gen_obj, fake_obj, generator, fake
    if dev.type == "cuda":  # keep the bundle (the next stage-1 check uses it), drop this check's models
        torch.cuda.empty_cache()


def _orbit_views(n: int, size: int, radius: float = 1.5, fov_deg: float = 49.1):
    """``n`` :class:`geco.cameras.Camera` s around the origin (azimuths evenly spread, elevations
    -30..60 deg) as world-to-camera OpenCV [n, 4, 4] and K [n, 3, 3] for ``size``-px views."""
    import numpy as np
    import torch

    from geco.cameras import Camera

    cams = [Camera("random", size, size, fov_deg, radius, 360.0 * i / n, -30.0 + 90.0 * (i % 4) / 3) for i in range(n)]
    return (torch.tensor(np.stack([c.w2c_opencv for c in cams]), dtype=torch.float32),
            torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32))


def check_stage2(run: Run) -> None:
    """One stage-2 step (:class:`geco.distill.consistency.ConsistencyStep`) as paper.yaml runs it: the
    generator (fp32 weights, bf16 autocast, gradient checkpointing) -> VAE decode -> the frozen
    reconstructor -> ``views_per_step`` views rendered at ``render_size`` -> MSE(RGB) + MSE(alpha)
    (LPIPS needs VGG weights that cannot be downloaded here: left out, and the row says so); seconds
    per step (the second: the first allocates Adam's state) and peak memory."""
    import torch

    await_gsplat(run)

    from geco.config import Stage2Config
    from geco.distill.consistency import ConsistencyObjective, ConsistencyStep
    from geco.distill.vsd import set_gradient_checkpointing
    from geco.models.generator import OneStepGenerator
    from geco.models.reconstructors import input_cameras
    from geco.train.loop import GradientStep, effective_precision, make_adamw

    s = _paper_section("stage2", Stage2Config)
    train, dev = s.train, run.device
    teacher_dtype = paper_teacher_dtype()
    b = run.bundle(getattr(torch, teacher_dtype) if run.paper else torch.float32)
    teacher, rec = b.teacher, b.reconstructor
    teacher.requires_grad_(False)
    rec.requires_grad_(False)
    size = s.render_size if run.paper else 16
    views = max(s.views_per_step, 8)
    precision = effective_precision(dev, train.mixed_precision)
    with _peak(dev) as mem:
        generator = OneStepGenerator.from_teacher(teacher, b.generator.cfg)
        generator.unet.to(dev, torch.float32)
        generator.train()
        set_gradient_checkpointing(generator.unet, train.gradient_checkpointing)
        objective = ConsistencyObjective(generator, rec, lpips=None, lambda_lpips=0.0)
        params = [p for p in generator.parameters() if p.requires_grad]
        stepper = GradientStep(params, make_adamw(params, lr=train.lr, betas=train.adam_betas,
                                                  weight_decay=train.weight_decay), None, device=dev,
                               mixed_precision=precision, max_grad_norm=train.max_grad_norm)
        step = ConsistencyStep(teacher, objective, stepper, views_per_step=s.views_per_step, use_saved_noise=False)
        in_K, in_c2w = input_cameras(rec.cfg, 0.0, teacher.tile_size)
        w2c, K = _orbit_views(views, size)
        g = torch.Generator().manual_seed(0)
        target = {"rgb": torch.rand(views, 3, size, size, generator=g), "alpha": torch.rand(views, 1, size, size, generator=g),
                  "K": K, "w2c": w2c}
        mb = {"cond": _cond_image(teacher.cond_size)[None].repeat(train.batch_size, 1, 1, 1).to(dev),
              "noise": None, "in_K": in_K[None].repeat(train.batch_size, 1, 1, 1).to(dev),
              "in_c2w": in_c2w[None].repeat(train.batch_size, 1, 1, 1).to(dev), "views": [target] * train.batch_size}
        seconds = []
        for i in range(2 if run.paper else 1):
            _sync(dev)
            t0 = time.perf_counter()
            metrics = step([mb], torch.Generator().manual_seed(i))
            _sync(dev)
            seconds.append(time.perf_counter() - t0)
    what = (f"{run.tag}: stage-2 step (batch {train.batch_size}, {s.views_per_step} views at {size} px, checkpointing "
            f"{train.gradient_checkpointing}, {precision}, LPIPS left out: no VGG weights offline)")
    run.rows.append(row(f"{what}, s/step ({'2nd' if len(seconds) > 1 else '1st'} step)", seconds[-1], "s"))
    if "peak_gib" in mem:
        run.rows.append(row(f"{what}: peak GPU memory", mem["peak_gib"], "GiB"))
    else:
        run.skip("stage-2 peak GPU memory", "no CUDA device", "GiB")
    run.details["stage2"] = {"seconds": seconds, "memory_gib": mem, "render_size": size,
                             "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
    del step, stepper, objective, generator
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def check_pseudo_gt(run: Run) -> None:
    """Pseudo-GT seconds per object as paper.yaml makes it: the teacher's deterministic DDIM (CFG)
    for ``batch_size`` objects at once vs one, timed at k1 and k2 steps and extrapolated to
    ``steps`` (as the inference rows), decode, the reconstructor, and ``num_views`` views rendered at
    ``resolution`` (RGB + depth, in chunks of geco.pseudo_gt.RENDER_CHUNK, as the stage does)."""
    import torch

    await_gsplat(run)

    from geco.config import PseudoGTConfig
    from geco.models.reconstructors import input_cameras
    from geco.models.teacher import _randn, views_from_grid
    from geco.pseudo_gt import RENDER_CHUNK
    from geco.render.splat import render_gaussians

    s = _paper_section("pseudo_gt", PseudoGTConfig)
    dev = run.device
    teacher_dtype = paper_teacher_dtype()
    b = run.bundle(getattr(torch, teacher_dtype) if run.paper else torch.float32)
    teacher, rec = b.teacher, b.reconstructor
    k1, k2 = _teacher_steps(run)
    batch = s.batch_size if run.paper else 2
    size = s.resolution if run.paper else 16
    cfg = s.guidance_scale if s.guidance_scale is not None else teacher.cfg.guidance_scale
    per_object: dict[int, float] = {}
    with torch.no_grad(), _peak(dev) as mem:
        for n in (1, batch):
            g = torch.Generator().manual_seed(0)
            cond = teacher.encode_condition(_cond_image(teacher.cond_size)[None].repeat(n, 1, 1, 1).to(dev), generator=g)
            z = _randn(teacher.latent_shape(n), g, dev)
            # warm-up at this batch size: on the H200 the first call's set-up went into k1's time, the
            # fitted slope fell and one object at a time was extrapolated 2x too cheap (4.3 s in fp32,
            # below the warm fp16 teacher's 7.5 s of check 1)
            teacher.sample(cond, num_steps=1, guidance_scale=cfg, sampler="ddim",
                           generator=torch.Generator().manual_seed(1), latents=z.clone(), eta=0.0)
            timed = {}
            for k in (k1, k2):
                _sync(dev)
                t0 = time.perf_counter()
                lat = teacher.sample(cond, num_steps=k, guidance_scale=cfg, sampler="ddim",
                                     generator=torch.Generator().manual_seed(1), latents=z.clone(), eta=0.0)
                _sync(dev)
                timed[k] = time.perf_counter() - t0
            per_object[n] = (timed[k1] + (s.steps - k1) * (timed[k2] - timed[k1]) / (k2 - k1)) / n
        _sync(dev)
        t0 = time.perf_counter()
        views = views_from_grid(teacher.decode_latents(lat), teacher.tile_size)
        in_K, in_c2w = input_cameras(rec.cfg, 0.0, teacher.tile_size)
        gaussians = rec(views, in_K[None].repeat(batch, 1, 1, 1).to(dev),
                        in_c2w[None].repeat(batch, 1, 1, 1).to(dev)).to(dtype=torch.float32)
        _sync(dev)
        t1 = time.perf_counter()
        w2c, K = _orbit_views(s.num_views, size)
        for i in range(batch):
            for start in range(0, s.num_views, RENDER_CHUNK):
                sl = slice(start, start + RENDER_CHUNK)
                render_gaussians(gaussians[i], w2c[sl].to(dev), K[sl].to(dev), size, size, background=0.0,
                                 render_mode="RGB+ED")
        _sync(dev)
        t2 = time.perf_counter()
    teacher_what = f"{run.tag}: pseudo-GT teacher {s.steps} DDIM steps (CFG {cfg:g}) s/object, EXTRAPOLATED from {k1}/{k2}"
    run.rows.append(row(f"{teacher_what}, {batch} objects a batch (ratio = one at a time / batched)",
                        per_object[batch], "s", baseline=per_object[1], ratio=per_object[1] / per_object[batch]))
    run.rows.append(row(f"{teacher_what}, one object at a time", per_object[1], "s"))
    run.rows.append(row(f"{run.tag}: pseudo-GT decode + reconstructor s/object (batch {batch})", (t1 - t0) / batch, "s"))
    run.rows.append(row(f"{run.tag}: pseudo-GT {s.num_views} views at {size} px rendered (RGB + depth) s/object",
                        (t2 - t1) / batch, "s"))
    if "peak_gib" in mem:
        run.rows.append(row(f"{run.tag}: pseudo-GT peak GPU memory (batch {batch})", mem["peak_gib"], "GiB"))
    run.details["pseudo_gt"] = {"teacher_s_per_object": per_object, "k": [k1, k2], "memory_gib": mem,
                                "reconstructor_s": t1 - t0, "render_s": t2 - t1, "batch": batch}


# ------------------------------------------------------------------------------------------------
# 4. rasterizer parity
# ------------------------------------------------------------------------------------------------
def random_splat_scene(n: int, seed: int, width: int, height: int, views: int = 2):
    """Random Gaussians in the unit cube seen by ``views`` orbit cameras (rasterize's argument order)."""
    import numpy as np
    import torch

    from geco.cameras import intrinsics_from_fov, opengl_to_opencv, orbit_c2w_opengl

    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) - 0.5
    quats = torch.randn(n, 4, generator=g)
    scales = 0.01 + 0.06 * torch.rand(n, 3, generator=g)
    opacities = 0.05 + 0.9 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    w2c = [np.linalg.inv(opengl_to_opencv(orbit_c2w_opengl(360.0 * v / views + 10.0 * seed, 20.0, 2.0)))
           for v in range(views)]
    viewmats = torch.tensor(np.stack(w2c), dtype=torch.float32)
    Ks = torch.tensor(np.stack([intrinsics_from_fov(40.0, width, height)] * views), dtype=torch.float32)
    return means, quats, scales, opacities, colors, viewmats, Ks, width, height


def _render_and_grads(scene, device, dtype, weight):
    import torch

    from geco.render.splat import rasterize

    leaves = [t.detach().to(device, dtype).clone().requires_grad_(True) for t in scene[:5]]
    viewmats, Ks = (t.to(device, dtype) for t in scene[5:7])
    colors, alphas, _ = rasterize(*leaves, viewmats, Ks, scene[7], scene[8], render_mode="RGB+ED",
                                  backgrounds=torch.ones(viewmats.shape[0], 3, device=device, dtype=dtype))
    out = torch.cat([colors, alphas], dim=-1)
    (out * weight.to(device, dtype)).sum().backward()
    return out.detach().double().cpu(), [t.grad.detach().double().cpu() for t in leaves]


def check_splat_parity(run: Run) -> None:
    """gsplat (CUDA) vs the torch path (CPU), or the torch path float32 vs float64 without CUDA."""
    import torch

    if run.paper:
        await_gsplat(run)
        ref_dev, ref_dtype, dev, dtype = torch.device("cpu"), torch.float32, run.device, torch.float32
        fwd_tol, grad_tol, what = SPLAT_FWD_ATOL, SPLAT_GRAD_RTOL, "gsplat CUDA vs torch path (CPU)"
    else:
        run.skip("gsplat CUDA vs torch path", "no CUDA device", "abs")
        ref_dev, ref_dtype, dev, dtype = torch.device("cpu"), torch.float64, torch.device("cpu"), torch.float32
        fwd_tol, grad_tol, what = CPU_FWD_ATOL, CPU_GRAD_RTOL, "torch path float32 vs float64"
    sizes = [(2000, 128, 96), (8000, 160, 128)] if run.paper and not run.quick else [(300, 48, 32)]
    fwd, grads = [], {k: [] for k in ("means", "quats", "scales", "opacities", "colors")}
    for seed, (n, w, h) in enumerate(sizes):
        scene = random_splat_scene(n, seed, w, h)
        weight = torch.rand(2, h, w, 5, generator=torch.Generator().manual_seed(100 + seed))
        out_a, g_a = _render_and_grads(scene, dev, dtype, weight)
        out_b, g_b = _render_and_grads(scene, ref_dev, ref_dtype, weight)
        fwd.append(float((out_a - out_b).abs().max()))
        for k, ga, gb in zip(grads, g_a, g_b):
            grads[k].append(float((ga - gb).norm() / gb.norm().clamp_min(1e-12)))
    worst = max(fwd)
    run.rows.append(row(f"{run.tag}: rasterizer {what}: forward max abs diff (colour, ED depth, alpha; tol {fwd_tol:g})",
                        worst, "abs", baseline=fwd_tol, ratio=fwd_tol / max(worst, 1e-12), target=1.0))
    for k, errs in grads.items():
        e = max(errs)
        run.rows.append(row(f"{run.tag}: rasterizer {what}: d/d{k} relative L2 error (tol {grad_tol:g})", e, "rel",
                            baseline=grad_tol, ratio=grad_tol / max(e, 1e-12), target=1.0))
    run.details["splat_parity"] = {"scenes": [{"n": n, "width": w, "height": h, "views": 2} for n, w, h in sizes],
                                   "forward_max_abs": fwd, "grad_rel_l2": grads, "fwd_tol": fwd_tol,
                                   "grad_rtol": grad_tol, "compared": what}
    time_rasterization(run)


def time_rasterization(run: Run) -> None:
    """Seconds to rasterize one object's Gaussians (LGM "big": 6 x 128^2) in 6 views at 256 px, forward;
    added to the one-step s/object of each dtype measured before (generate() itself does not render)."""
    import torch

    from geco.render.splat import rasterize

    n, size, repeats = (6 * 128 * 128, 256, 5) if run.paper else (2000, 64, 1)
    scene = [t.to(run.device) if isinstance(t, torch.Tensor) else t for t in random_splat_scene(n, 7, size, size, 6)]
    with torch.no_grad():
        rasterize(*scene)  # warm-up
        seconds = []
        for _ in range(repeats):
            _sync(run.device)
            t0 = time.perf_counter()
            rasterize(*scene)
            _sync(run.device)
            seconds.append(time.perf_counter() - t0)
    r_s = median(seconds)
    where = "gsplat" if run.device.type == "cuda" else "torch path"
    run.rows.append(row(f"{run.tag}: rasterization ({where}) of {n} Gaussians, 6 views at {size} px, s", r_s, "s"))
    for dtype_name in ("float16", "bfloat16", "float32"):
        d = run.details.get(f"inference_{dtype_name}")
        if d:
            total = median(d["one_step_s"]) + r_s
            run.rows.append(row(f"{run.tag} {dtype_name}: one-step + reconstructor + rasterization (6 views), s/object "
                                f"(budget {BUDGET_ONE_STEP_S} s)", total, "s", baseline=BUDGET_ONE_STEP_S,
                                ratio=BUDGET_ONE_STEP_S / total, target=1.0 if run.paper else None))
    run.details["rasterization"] = {"gaussians": n, "views": 6, "px": size, "seconds": seconds}


def await_gsplat(run: Run) -> None:
    """Wait for the background gsplat build before any check rasterizes on CUDA. A check that called
    gsplat while the build ran would start a second JIT build of its own; cut short by the check's
    alarm, gsplat deletes the build folder under the first one (seen on the H200: both failed)."""
    if run.gsplat_build is None:
        return
    try:
        rc = run.gsplat_build.wait(timeout=max(run.deadline - time.monotonic() - 30.0, 1.0))
    except subprocess.TimeoutExpired:
        raise CheckTimeout("gsplat's CUDA build did not finish in time") from None
    run.details.setdefault("gsplat_build_s", round(time.monotonic() - run.gsplat_build_t0, 1))
    if rc != 0:
        err = Path(run.gsplat_log).read_text(errors="replace")[-1500:]
        raise RuntimeError(f"gsplat's CUDA build failed (exit {rc}): {err}")


def start_gsplat_build(log_path: str) -> subprocess.Popen:
    """Compile gsplat's CUDA kernels in a background process (cached in TORCH_EXTENSIONS_DIR); its
    output goes to ``log_path``."""
    code = "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat: no CUDA extension'"
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ))


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
# (name, function, budget seconds on the GPU at paper size)
CHECKS: list[tuple[str, Callable[[Run], None], float]] = [
    ("inference float16", lambda r: check_inference(r, "float16"), 75.0),
    ("inference bfloat16", lambda r: check_inference(r, "bfloat16"), 75.0),
    ("inference float32 (tiny)", lambda r: None if r.paper else check_inference(r, "float32"), 60.0),
    ("stage1 full", lambda r: check_stage1(r, "full"), 90.0),
    ("stage1 lora", lambda r: check_stage1(r, "lora"), 75.0),
    ("stage2", check_stage2, 150.0),  # 75 s was too short on the H200 (first backward at paper size)
    ("pseudo-GT", check_pseudo_gt, 60.0),
    ("splat parity", check_splat_parity, 240.0),
    ("channels-last + compile", check_compiled, 150.0),
]


def run_checks(run: Run, checks=CHECKS, only: list[str] | None = None) -> None:
    """Run ``checks`` in order (those whose name contains one of ``only``, when given)."""
    for name, fn, budget in checks:
        if only and not any(o in name for o in only):
            continue
        left = run.deadline - time.monotonic()
        if left < MIN_START_S:
            run.rows.append(row(f"{run.tag}: {name} - skipped: global deadline ({left:.0f} s left)", None, "s"))
            continue
        t0 = time.monotonic()
        print(f"  [{NAME}] {name} (budget {min(budget, left):.0f} s) ...", flush=True)
        try:
            with _alarm(min(budget, left) if run.paper else left):
                fn(run)
        except Exception as e:  # noqa: BLE001 - a FAILED row, the other checks go on
            traceback.print_exc()
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            run.rows.append(row(f"{run.tag}: {name} - FAILED: {msg}", None, "s"))
            with contextlib.suppress(Exception):
                run.free()
        run.details.setdefault("check_seconds", {})[name] = round(time.monotonic() - t0, 1)
        save(result(NAME, run.rows, run.details), run.out or None)  # partial results survive a kill


def main(argv: list[str] | None = None) -> dict:
    t_start = time.monotonic()
    p = arg_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                   help="end every check by this many seconds after the start")
    p.add_argument("--cpu", action="store_true", help="the tiny CPU run even where CUDA is available")
    p.add_argument("--checks", default="", help="comma-separated parts of check names to run (default: all), "
                   "e.g. 'splat,stage2,pseudo' to re-run what an earlier lease missed")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.checks.split(",") if c.strip()]
    if unknown := [o for o in only if not any(o in name for name, _, _ in CHECKS)]:
        p.error(f"--checks: {', '.join(unknown)} names no check; the checks: {', '.join(n for n, _, _ in CHECKS)}")

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    out = args.out
    if args.quick and out is None:
        out = tempfile.mkdtemp(prefix="geco-bench-gpu-quick-")
    run = Run(device=torch.device("cuda" if cuda else "cpu"), paper=cuda, quick=args.quick,
              deadline=t_start + args.deadline_s, out=out)
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # build gsplat for this GPU only
        run.gsplat_log = os.path.join(tempfile.gettempdir(), "geco-gsplat-build.log")
        run.gsplat_build, run.gsplat_build_t0 = start_gsplat_build(run.gsplat_log), time.monotonic()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    run.details.update({
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "size": "paper (random weights)" if cuda else "tiny (TINY_MODELS bundle; the GPU path's logic only)",
        "quick": args.quick, "deadline_s": args.deadline_s,
        "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()} if cuda else None,
        "teacher_extrapolation": "s(75) = s(k1) + (75 - k1) * (s(k2) - s(k1)) / (k2 - k1), k1/k2 timed steps",
    })
    threads = torch.get_num_threads()
    if not cuda:  # one CPU thread: on a shared machine OpenMP's spinning threads make small ops far slower
        torch.set_num_threads(1)
    try:
        run_checks(run, only=only)
    finally:
        torch.set_num_threads(threads)
        if run.gsplat_build is not None and run.gsplat_build.poll() is None:
            run.gsplat_build.kill()
        if run._tmp is not None:
            import shutil

            shutil.rmtree(run._tmp, ignore_errors=True)
    run.details["wall_s"] = round(time.monotonic() - t_start, 1)
    res = result(NAME, run.rows, run.details)
    report(res, out, quick=args.quick)
    return res


if __name__ == "__main__":
    main()
