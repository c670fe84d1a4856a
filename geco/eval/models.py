"""The models under test: one input view in, 3D Gaussians out, generation and reconstruction timed apart.

Four kinds, by the name the evaluation gives them (``evaluate.models``; PAPER.md's Table 1 rows and
ablations):

    teacher        the teacher's K-step sample (``evaluate.teacher_steps``, GECO: 75; the teacher's own
                   sampler and CFG) -> its 6 views -> the reconstructor
    teacher_1step  the same teacher with one sampling step (the paper's "1-step teacher" ablation)
    stage1         a GECO bundle's one-step generator -> reconstructor (after stage 1)
    stage2         the same after stage 2

Every model gets the same input: the ground truth's input view (elevation 0, azimuth 0) composited on
white, ``[3, S, S]`` in [0, 1]; the teacher's own preprocessing resizes it to its condition size.
The 6 generated views go to the reconstructor with the cameras it is told (the Zero123++ poses
relative to the input), and the Gaussians come out in our world, in the input camera's frame - the
ground truth's frame. ``seconds_generate``: condition encoding + sampling + VAE decoding;
``seconds_reconstruct``: the reconstructor's pass (CUDA synchronised around each).

Loading (bundle URIs, MLflow URIs, teacher folders) is the stage's business (pipelines/evaluate.py);
these classes take loaded components.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from geco.generate import generate, reconstructor_cameras
from geco.models.generator import torch_generator
from geco.models.teacher import views_from_grid

__all__ = ["Generated", "GeneratorModel", "TeacherModel"]


@dataclass
class Generated:
    """One model's output for one object: unbatched Gaussians (CPU, float32), the 6 views
    [6, 3, t, t], and the seconds spent generating the views and reconstructing the Gaussians."""

    gaussians: object
    views: torch.Tensor
    seconds_generate: float
    seconds_reconstruct: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GeneratorModel:
    """A GECO bundle (:class:`geco.models.bundle.Bundle`): one generator step + the reconstructor
    (:func:`geco.generate.generate`)."""

    def __init__(self, bundle):
        self.bundle = bundle

    def __call__(self, input_rgb: torch.Tensor, seed: int) -> Generated:
        r = generate(self.bundle, input_rgb, seed=seed)[0]
        return Generated(r.gaussians, r.views, r.timings["generator_s"], r.timings["reconstructor_s"])


class TeacherModel:
    """The teacher sampled with ``steps`` steps (its configured sampler and guidance), then the
    reconstructor on its 6 views."""

    def __init__(self, teacher, reconstructor, steps: int):
        self.teacher, self.reconstructor, self.steps = teacher, reconstructor, int(steps)

    @torch.no_grad()
    def __call__(self, input_rgb: torch.Tensor, seed: int) -> Generated:
        t, rec = self.teacher, self.reconstructor
        dev = t.device
        gen = torch_generator(seed)
        x = input_rgb[None].to(dev, torch.float32)
        K, c2w = reconstructor_cameras(rec, t.tile_size)
        _sync(dev)
        t0 = time.perf_counter()
        latents = t.sample(x, num_steps=self.steps, generator=gen)
        views = views_from_grid(t.decode_latents(latents), t.tile_size)
        _sync(dev)
        t1 = time.perf_counter()
        gaussians = rec(views, K[None].to(dev), c2w[None].to(dev))
        _sync(dev)
        t2 = time.perf_counter()
        return Generated(gaussians[0].detach().to("cpu", torch.float32), views[0].float().cpu(), t1 - t0, t2 - t1)
