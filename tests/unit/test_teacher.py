"""The Zero123++ teacher: grid layout, latent constants, reference attention, CFG, samplers, the
diffusion loss, and loading the published folder layout (local, S3, UNet override).

Everything runs on a tiny random teacher (16 px tiles, 16 px condition) on CPU.

Tokenizer: the tiny teacher carries a real ``CLIPTokenizer`` built from a minimal vocabulary (the
256-symbol byte alphabet, each as a word end, and the two special tokens; no merges), so the folder
written here has real ``tokenizer/vocab.json`` + ``merges.txt`` files and the empty prompt is encoded
at load time exactly as for the real weights ([BOS, EOS, "!" padding to 77]).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from geco.config import TeacherConfig
from geco.models.teacher import (
    CLIP_MEAN,
    CLIP_STD,
    LATENT_SCALE,
    LATENT_SHIFT,
    Condition,
    ReferenceAttnProcessor,
    TeacherFolderError,
    build_tiny_teacher,
    grid_from_views,
    images_to_vae_input,
    load_teacher,
    reference_attention_disabled,
    save_teacher,
    scale_latents,
    tiny_tokenizer_files,
    unscale_latents,
    vae_output_to_images,
    views_from_grid,
)

TILE = 16
CFG = TeacherConfig(tile_size=TILE, cond_size=TILE, num_inference_steps=4)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def teacher():
    t = build_tiny_teacher(CFG, seed=0)
    # Round the encoders to float16 values: the published folder stores them float16, so a model
    # saved that way reloads bit for bit.
    with torch.no_grad():
        for m in (t.vae, t.text_encoder, t.vision_encoder):
            for p in m.parameters():
                p.copy_(p.half().float())
    t.refresh_text_states()
    return t


@pytest.fixture(scope="module")
def cond_images():
    g = _gen(1)
    return torch.rand(2, 3, TILE, TILE, generator=g)


@pytest.fixture(scope="module")
def cond(teacher, cond_images):
    return teacher.encode_condition(cond_images, generator=_gen(2))


def _noisy(teacher, b=2, seed=3):
    return torch.randn(teacher.latent_shape(b), generator=_gen(seed))


# ------------------------------------------------------------------------------------------------
# grid and constants
# ------------------------------------------------------------------------------------------------
def test_grid_layout_and_round_trip():
    h, w = 4, 5
    views = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1, 1).expand(2, 6, 3, h, w).clone()
    views[1] += 10
    grid = grid_from_views(views)
    assert grid.shape == (2, 3, 3 * h, 2 * w)
    for k in range(6):
        r, c = k // 2, k % 2  # row-major: left column = views 0, 2, 4
        tile = grid[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w]
        assert torch.equal(tile, views[:, k])
    assert torch.equal(views_from_grid(grid), views)
    rnd = torch.randn(3, 6, 4, 7, 5)  # any channel count, non-square tiles
    assert torch.equal(views_from_grid(grid_from_views(rnd)), rnd)
    assert views_from_grid(torch.zeros(1, 3, 3 * TILE, 2 * TILE), tile_size=TILE).shape == (1, 6, 3, TILE, TILE)
    with pytest.raises(ValueError):
        views_from_grid(torch.zeros(1, 3, 3 * TILE, 2 * TILE), tile_size=TILE * 2)
    with pytest.raises(ValueError):
        grid_from_views(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError):
        views_from_grid(torch.zeros(1, 3, 10, 8))


def test_latent_and_image_scaling_constants():
    assert (LATENT_SHIFT, LATENT_SCALE) == (0.22, 0.75)
    z = torch.randn(2, 4, 6, 4)
    torch.testing.assert_close(unscale_latents(scale_latents(z)), z)
    assert scale_latents(torch.tensor(0.22)).item() == 0.0
    torch.testing.assert_close(scale_latents(torch.tensor(1.22)), torch.tensor(0.75))
    torch.testing.assert_close(unscale_latents(torch.tensor(0.75)), torch.tensor(1.22))
    # [0, 1] -> (x - 0.5) / 0.8, and back via x 1.6 to [-1, 1] then (y + 1) / 2
    torch.testing.assert_close(images_to_vae_input(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-0.625, 0.0, 0.625]))
    torch.testing.assert_close(vae_output_to_images(torch.tensor([-0.625, 0.0, 0.625])), torch.tensor([0.0, 0.5, 1.0]))


def test_encode_decode_and_condition_latent_scaling(teacher, cond_images):
    vae, sf = teacher.vae, teacher.vae.config.scaling_factor
    grid = torch.rand(1, 3, 3 * TILE, 2 * TILE, generator=_gen(5))
    with torch.no_grad():
        lat = teacher.encode_images(grid, sample=False)
        manual = (vae.encode((grid - 0.5) / 0.8).latent_dist.mode() * sf - 0.22) * 0.75
        torch.testing.assert_close(lat, manual)
        assert lat.shape == teacher.latent_shape(1) == (1, 4, 3 * TILE // 2, 2 * TILE // 2)
        img = teacher.decode_latents(lat, clamp=False)
        dec = vae.decode((lat / 0.75 + 0.22) / sf).sample * 1.6
        torch.testing.assert_close(img, (dec + 1) / 2)
        # cond_lat: the posterior of (x - 0.5) / 0.8, NOT multiplied by scaling_factor
        t_mode = copy.copy(teacher)
        t_mode.cfg = CFG.model_copy(update={"cond_latent": "mode"})
        c = t_mode.encode_condition(cond_images)
        torch.testing.assert_close(c.cond_lat, vae.encode((cond_images - 0.5) / 0.8).latent_dist.mode())
        # unconditional latent: the mid-grey image, zeros after normalisation
        torch.testing.assert_close(c.uncond_lat[0], vae.encode(torch.zeros(1, 3, TILE, TILE)).latent_dist.mode()[0])
        # global condition: text states + image_embeds ramped per token; unconditional: text alone
        emb = teacher.vision_encoder(pixel_values=teacher.clip_preprocess(cond_images)).image_embeds
        torch.testing.assert_close(c.encoder_hidden_states, teacher.text_states + emb[:, None, :] * teacher.ramp[:, None])
        torch.testing.assert_close(c.uncond_hidden_states, teacher.text_states.expand(2, -1, -1))
        assert c.uncond().cond_lat is c.uncond_lat and c.uncond().uncond().encoder_hidden_states is c.uncond_hidden_states


def test_v_helpers_match_the_schedule(teacher):
    x0, eps = torch.randn(3, 4, 6, 4), torch.randn(3, 4, 6, 4)
    t = torch.tensor([0, 500, 999])
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    torch.testing.assert_close(teacher.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    x_t = teacher.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    v = teacher.get_v(x0, eps, t)
    torch.testing.assert_close(teacher.v_to_x0(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.v_to_eps(x_t, t, v), eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["clip", "vae"])
def test_image_preprocess_matches_transformers_pil_processor(which):
    """The published feature extractors' configs (bicubic for CLIP, bilinear for the VAE input), run
    by transformers' PIL CLIPImageProcessor on uint8 images, and by ImagePreprocess on the same
    images as floats: condition images smaller, larger and non-square."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from geco.models.teacher import ImagePreprocess

    side = 224 if which == "clip" else 64
    config = {"crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(CLIP_MEAN) if which == "clip" else 0.5,
              "image_std": list(CLIP_STD) if which == "clip" else 0.8,
              "resample": 3 if which == "clip" else 2, "rescale_factor": 0.00392156862745098,
              "size": {"shortest_edge": side}}
    pre = ImagePreprocess.from_config(config, "preprocessor_config.json")
    assert pre.resample == config["resample"] and pre.to_config()["resample"] == config["resample"]
    upstream = CLIPImageProcessorPil(**config)
    g = torch.Generator().manual_seed(0)
    for h, w in ((320, 320), (50, 37), (300, 401), (side, side)):
        u8 = torch.randint(0, 256, (2, h, w, 3), generator=g, dtype=torch.uint8)
        expected = upstream([Image.fromarray(a.numpy()) for a in u8], return_tensors="pt").pixel_values
        ours = pre(u8.permute(0, 3, 1, 2).float() / 255)
        assert ours.shape == expected.shape == (2, 3, side, side)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_loaded_teacher_keeps_the_folders_filters(upstream_folder):
    t = load_teacher(TeacherConfig(pretrained=str(upstream_folder), tile_size=TILE, cond_size=2 * TILE))
    assert (t.clip_preprocess.resample, t.vae_preprocess.resample) == (3, 2)  # bicubic, bilinear
    assert t.vae_preprocess.crop == (2 * TILE, 2 * TILE)  # cond_size overrides the size, not the filter


# ------------------------------------------------------------------------------------------------
# reference attention
# ------------------------------------------------------------------------------------------------
def test_processors_installed_on_attn1_only(teacher):
    procs = teacher.unet.attn_processors
    assert procs and all(isinstance(p, ReferenceAttnProcessor) for p in procs.values())
    enabled = {n for n, p in procs.items() if p.enabled}
    assert enabled == {n for n in procs if n.endswith("attn1.processor")} and enabled


def test_reference_attention_uses_the_condition_latent(teacher, cond):
    x, t = _noisy(teacher), torch.tensor([300, 700])
    noise = torch.randn(cond.cond_lat.shape, generator=_gen(4))
    swapped = Condition(cond.encoder_hidden_states, cond.cond_lat.flip(0))  # same text/CLIP, other latents
    with torch.no_grad():
        v = teacher.predict_v(x, t, cond, cond_noise=noise)
        v_swapped = teacher.predict_v(x, t, swapped, cond_noise=noise)
        assert v.shape == x.shape
        assert (v - v_swapped).abs().max() > 1e-4  # the reference changes the output
        with reference_attention_disabled(teacher.unet):  # processors off: the latent has no effect
            off = teacher.predict_v(x, t, cond, cond_noise=noise)
            off_swapped = teacher.predict_v(x, t, swapped, cond_noise=noise)
        torch.testing.assert_close(off, off_swapped, rtol=0, atol=0)
        torch.testing.assert_close(teacher.predict_v(x, t, swapped, use_reference=False), off)
        assert (off - v).abs().max() > 1e-4
        # back on after the context manager
        torch.testing.assert_close(teacher.predict_v(x, t, cond, cond_noise=noise), v)
        # a different condition image changes the prediction too
        other = teacher.encode_condition(torch.rand(2, 3, TILE, TILE, generator=_gen(9)), generator=_gen(2))
        assert (teacher.predict_v(x, t, other, cond_noise=noise) - v).abs().max() > 1e-4


def test_queries_from_sample_keys_from_sample_and_reference(teacher):
    """A condition latent of another size: the output keeps the sample's shape; in the sample pass
    attn1's queries see the sample's tokens only, its keys/values sample + reference tokens."""
    c = teacher.encode_condition(torch.rand(1, 3, 24, 24, generator=_gen(6)))
    big = Condition(c.encoder_hidden_states, torch.nn.functional.interpolate(c.cond_lat, size=(12, 20)))
    x = _noisy(teacher, b=1)
    attn = teacher.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = {"q": [], "k": []}
    hooks = [attn.to_q.register_forward_hook(lambda m, i, o: seen["q"].append(i[0].shape[1])),
             attn.to_k.register_forward_hook(lambda m, i, o: seen["k"].append(i[0].shape[1]))]
    try:
        with torch.no_grad():
            v = teacher.predict_v(x, 500, big)
    finally:
        for h in hooks:
            h.remove()
    assert v.shape == x.shape
    n_sample, n_ref = x.shape[2] * x.shape[3], 12 * 20
    assert seen["q"] == [n_ref, n_sample]  # reference pass ("write"), then sample pass ("read")
    assert seen["k"] == [n_ref, n_sample + n_ref]


def _diffusers_reference(lat, noise, t, num_steps, spacing="linspace"):
    """The reference latent as Zero123++'s RefOnlyNoisedUNet builds it at inference: the pipeline's
    Euler-ancestral scheduler's add_noise at t, then scale_model_input (diffusers' own math)."""
    from diffusers import EulerAncestralDiscreteScheduler

    from geco.models.teacher import ZERO123PP_SCHEDULER

    sched = EulerAncestralDiscreteScheduler(**{**ZERO123PP_SCHEDULER, "timestep_spacing": spacing})
    sched.set_timesteps(num_steps)
    t = torch.as_tensor(t, dtype=sched.timesteps.dtype)
    assert t in sched.timesteps, (t, sched.timesteps)
    return sched.scale_model_input(sched.add_noise(lat, noise, t.reshape(1)), t), sched


def test_reference_noise_level_and_clean_condition_timestep(teacher, cond):
    lat, n = cond.cond_lat, torch.randn(cond.cond_lat.shape, generator=_gen(7))
    t = torch.tensor([0.0, 600.0])
    ref = teacher.noise_condition(lat, t, n)
    torch.testing.assert_close(ref, teacher.add_noise(lat, n, t))  # every timestep is noised, 0 included
    x = _noisy(teacher)
    with torch.no_grad():
        # generator convention: reference at t=0 -> the condition noise does not matter
        a = teacher.predict_v(x, 950, cond, cond_timestep=0, cond_noise=n)
        b = teacher.predict_v(x, 950, cond, cond_timestep=0, cond_noise=torch.randn_like(n))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # teacher convention: reference noised to the sample's timestep
        c = teacher.predict_v(x, 950, cond, cond_noise=n)
        d = teacher.predict_v(x, 950, cond, cond_noise=torch.randn_like(n))
    assert (c - d).abs().max() > 1e-5 and (a - c).abs().max() > 1e-5


def test_sampler_timestep_zero_noises_the_reference_like_upstream(teacher, cond):
    """Euler with "linspace" spacing ends at t = 0: upstream noises the reference there too
    (sigma_0 = sqrt((1 - abar_0) / abar_0) ~ 0.029); only an explicit cond_timestep=0 means clean."""
    from geco.models.teacher import CLEAN_REFERENCE, unet_forward_with_reference

    lat, n = cond.cond_lat, torch.randn(cond.cond_lat.shape, generator=_gen(7))
    expected, sched = _diffusers_reference(lat, n, 0.0, num_steps=5)
    assert abs(float(sched.sigmas[-2]) - 0.0292) < 1e-3  # sigma at t = 0 (the last step)
    torch.testing.assert_close(teacher.noise_condition(lat, torch.zeros(2), n), expected, atol=1e-6, rtol=1e-5)
    x, zero = _noisy(teacher), torch.zeros(2)
    with torch.no_grad():
        v = teacher.predict_v(x, zero, cond, cond_noise=n)
        torch.testing.assert_close(v, unet_forward_with_reference(teacher.unet, x, zero, cond.encoder_hidden_states,
                                                                  expected, zero), atol=1e-5, rtol=1e-4)
        clean = teacher.predict_v(x, zero, cond, cond_timestep=CLEAN_REFERENCE, cond_noise=n)
        torch.testing.assert_close(clean, unet_forward_with_reference(teacher.unet, x, zero, cond.encoder_hidden_states,
                                                                      lat, zero), atol=1e-5, rtol=1e-4)
    assert (v - clean).abs().max() > 1e-5


def test_fractional_timesteps_take_eulers_interpolated_sigma(teacher, cond):
    """Euler with "linspace" spacing visits t = 749.25, 499.5, 249.75: the noise level there is its
    sigma interpolated between integer timesteps, not the nearest integer's."""
    lat, n = cond.cond_lat, torch.randn(cond.cond_lat.shape, generator=_gen(7))
    for t in (749.25, 499.5, 249.75):
        expected, sched = _diffusers_reference(lat, n, t, num_steps=5)
        sigma = float(sched.sigmas[list(sched.timesteps).index(t)])
        a, s = teacher.alpha_sigma(t, lat)
        alpha = (1 + sigma ** 2) ** -0.5  # Euler's x_t = x0 + sigma * eps, scaled by 1 / sqrt(1 + sigma^2)
        torch.testing.assert_close(a.flatten(), torch.full((2,), alpha), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(s.flatten(), torch.full((2,), sigma * alpha), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(teacher.noise_condition(lat, t, n), expected, atol=1e-6, rtol=1e-5)
    # integer timesteps: sqrt(abar_t), sqrt(1 - abar_t) as before
    abar = teacher.alphas_cumprod[torch.tensor([0, 749, 999])].double()
    a, s = teacher.alpha_sigma(torch.tensor([0, 749, 999]), lat[:1].expand(3, -1, -1, -1))
    torch.testing.assert_close(a.flatten(), abar.sqrt().float(), atol=0, rtol=1e-6)
    torch.testing.assert_close(s.flatten(), (1 - abar).sqrt().float(), atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# CFG, sampling, loss
# ------------------------------------------------------------------------------------------------
def test_cfg_matches_separate_branches(teacher, cond):
    x, t = _noisy(teacher), torch.tensor([100, 800])
    n = torch.randn(cond.cond_lat.shape, generator=_gen(8))
    with torch.no_grad():
        v_c = teacher.predict_v(x, t, cond, cond_noise=n)
        v_u = teacher.predict_v(x, t, cond.uncond(), cond_noise=n)
        torch.testing.assert_close(teacher.predict_v(x, t, cond, guidance_scale=1.0, cond_noise=n), v_c)
        for s in (4.0, 2.5):
            v = teacher.predict_v(x, t, cond, guidance_scale=s, cond_noise=n)
            torch.testing.assert_close(v, v_u + s * (v_c - v_u), atol=1e-5, rtol=1e-4)
        assert (v_c - v_u).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unconditional"):
        teacher.predict_v(x, t, Condition(cond.encoder_hidden_states, cond.cond_lat), guidance_scale=4.0)


def test_ddim_is_deterministic(teacher, cond_images):
    z = torch.randn(teacher.latent_shape(2), generator=_gen(11))
    a = teacher.sample(cond_images, num_steps=3, guidance_scale=4.0, sampler="ddim", generator=_gen(0), latents=z)
    b = teacher.sample(cond_images, num_steps=3, guidance_scale=4.0, sampler="ddim", generator=_gen(0), latents=z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = teacher.sample(cond_images, num_steps=3, guidance_scale=4.0, sampler="ddim", generator=_gen(0))
    d = teacher.sample(cond_images, num_steps=3, guidance_scale=4.0, sampler="ddim", generator=_gen(0))
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert a.shape == teacher.latent_shape(2) and torch.isfinite(a).all()
    assert (a - c).abs().max() > 1e-4  # other initial noise, other sample


def _hand_written_ddim(teacher, cond, latents, num_steps, guidance_scale, generator):
    """Deterministic DDIM (eta = 0, Song et al. 2021, eq. 12) for a v-prediction model, written from the
    formulas: the teacher is only the model call (``predict_v``). The noise schedule and the timestep
    list come from the scheduler config's numbers, not from a diffusers scheduler:
    betas linear in [beta_start, beta_end]; "trailing" spacing t_i = round(T - i * T / n) - 1; the step
    goes to t - T // n, and past 0 to abar[0] (``set_alpha_to_one=False``, as Zero123++ ships)."""
    c = teacher.scheduler.config
    assert c.beta_schedule == "linear" and c.prediction_type == "v_prediction"
    assert teacher.cfg.timestep_spacing == "trailing"
    big_t = c.num_train_timesteps
    abar = torch.cumprod(1 - torch.linspace(c.beta_start, c.beta_end, big_t, dtype=torch.float64), 0)
    ts = [round(big_t - i * big_t / num_steps) - 1 for i in range(num_steps)]
    x = latents.double()
    for t in ts:
        v = teacher.predict_v(x.float(), t, cond, guidance_scale=guidance_scale, generator=generator).double()
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        x0, eps = a * x - s * v, s * x + a * v  # v = a * eps - s * x0, x = a * x0 + s * eps
        prev = t - big_t // num_steps
        abar_prev = abar[prev] if prev >= 0 else abar[0]
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    return x.float(), ts


@pytest.mark.parametrize("steps,expected_ts", [(3, [999, 666, 332]), (4, [999, 749, 499, 249])])
def test_ddim_matches_a_hand_written_ddim_loop(teacher, cond, steps, expected_ts):
    z = torch.randn(teacher.latent_shape(2), generator=_gen(12))
    got = teacher.sample(cond, num_steps=steps, guidance_scale=4.0, sampler="ddim", generator=_gen(5), latents=z)
    # the same generator seed: the reference pass draws its condition noise in the same order
    want, ts = _hand_written_ddim(teacher, cond, z, steps, 4.0, _gen(5))
    assert ts == expected_ts
    sched = teacher.make_scheduler("ddim")
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == expected_ts
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - z).abs().max() > 1e-2  # the loop moved the sample


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_euler_ancestral_any_number_of_steps(teacher, cond, steps):
    out = teacher.sample(cond, num_steps=steps, guidance_scale=4.0, sampler="euler_ancestral", generator=_gen(steps))
    assert out.shape == teacher.latent_shape(2) and torch.isfinite(out).all()
    again = teacher.sample(cond, num_steps=steps, guidance_scale=4.0, generator=_gen(steps))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    img = teacher.decode_latents(out)
    assert img.shape == (2, 3, 3 * TILE, 2 * TILE) and img.min() >= 0 and img.max() <= 1


def test_diffusion_loss_backprops_into_unet(teacher, cond_images):
    grid = torch.rand(2, 3, 3 * TILE, 2 * TILE, generator=_gen(12))
    teacher.unet.zero_grad(set_to_none=True)
    loss = teacher.diffusion_loss(cond_images, grid, generator=_gen(13), drop_cond_prob=0.5)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    attn1 = teacher.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn1.to_k.weight.grad is not None and attn1.to_k.weight.grad.abs().sum() > 0
    assert teacher.unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.vae.parameters())
    assert all(p.grad is None for p in teacher.vision_encoder.parameters())
    teacher.unet.zero_grad(set_to_none=True)
    # drop probability 1: the loss is the one on the unconditional condition
    c = teacher.encode_condition(cond_images, generator=_gen(2))
    with torch.no_grad():
        dropped = teacher.diffusion_loss(c, grid, generator=_gen(14), drop_cond_prob=1.0)
        # same draws in the same order: t, noise, the drop mask (unused values), the condition noise
        g = _gen(14)
        x0 = teacher.encode_images(grid, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        torch.rand(2, generator=g)
        v = teacher.predict_v(teacher.add_noise(x0, noise, t), t, c.uncond(), generator=g)
    torch.testing.assert_close(dropped, torch.nn.functional.mse_loss(v, teacher.get_v(x0, noise, t)))


def test_gradient_checkpointing_gives_the_same_gradients(teacher, cond):
    """The reference mode travels in cross_attention_kwargs, so recomputed blocks replay it."""
    unet = copy.deepcopy(teacher.unet).train()
    x, t = _noisy(teacher), torch.tensor([200, 900])
    n = torch.randn(cond.cond_lat.shape, generator=_gen(15))
    grads = []
    for ckpt in (False, True):
        if ckpt:
            unet.enable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)
        teacher.predict_v(x, t, cond, cond_noise=n, unet=unet).square().mean().backward()
        grads.append(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the published folder layout
# ------------------------------------------------------------------------------------------------
def _save(sd: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_upstream_folder(t, root: Path) -> Path:
    """A folder laid out exactly like sudo-ai/zero123plus-v1.2 (tiny sizes), written file by file
    without our saver: model_index.json with the custom pipeline's class entries, a stale
    _name_or_path and safety_checker [null, null]; encoders float16 with transformers-4.x key names
    (and the old position_ids buffers), UNet float32; the scheduler config's extra keys; the VAE
    feature extractor's 0.5 / 0.8 as scalars and its bilinear filter (resample 2; CLIP's is bicubic, 3)."""
    _write_json(root / "model_index.json", {
        "_class_name": "Zero123PlusPipeline", "_diffusers_version": "0.20.2",
        "_name_or_path": "/home/user/zero123plus-v1.2-export",
        "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
        "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
        "ramping_coefficients": [float(x) for x in t.ramp.tolist()],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    })
    for name, model, dtype in (("vae", t.vae, torch.float16), ("unet", t.unet, torch.float32)):
        (root / name).mkdir(parents=True)
        model.save_config(str(root / name))
        _save({k: v.to(dtype) for k, v in model.state_dict().items()}, root / name / "diffusion_pytorch_model.safetensors")
    tc = t.text_encoder.config
    _write_json(root / "text_encoder" / "config.json", {
        "_name_or_path": "stabilityai/stable-diffusion-2", "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_size": tc.hidden_size, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": tc.intermediate_size, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers, "pad_token_id": 1, "projection_dim": 512,
        "torch_dtype": "float16", "transformers_version": "4.25.0.dev0", "vocab_size": tc.vocab_size})
    text_sd = {"text_model." + k: v.half() for k, v in t.text_encoder.state_dict().items()}
    text_sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    _save(text_sd, root / "text_encoder" / "model.safetensors")
    vc = t.vision_encoder.config
    _write_json(root / "vision_encoder" / "config.json", {
        "_name_or_path": "lambdalabs/sd-image-variations-diffusers", "architectures": ["CLIPVisionModelWithProjection"],
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": vc.hidden_size,
        "image_size": vc.image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": vc.intermediate_size, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
        "num_attention_heads": vc.num_attention_heads, "num_channels": 3, "num_hidden_layers": vc.num_hidden_layers,
        "patch_size": vc.patch_size, "projection_dim": vc.projection_dim, "torch_dtype": "float16",
        "transformers_version": "4.25.0.dev0"})
    vis_sd = {k: v.half() for k, v in t.vision_encoder.state_dict().items()}
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in vis_sd)  # the 4.x names
    vis_sd["vision_model.embeddings.position_ids"] = torch.arange((vc.image_size // vc.patch_size) ** 2 + 1)[None]
    _save(vis_sd, root / "vision_encoder" / "model.safetensors")
    for name, content in tiny_tokenizer_files().items():
        p = root / "tokenizer" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    _write_json(root / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.20.2",
        "beta_end": 0.012, "beta_schedule": "linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None})
    common = {"do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
              "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
              "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098}
    s = vc.image_size
    _write_json(root / "feature_extractor_clip" / "preprocessor_config.json", {
        **common, "crop_size": {"height": s, "width": s}, "size": {"shortest_edge": s},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)})
    _write_json(root / "feature_extractor_vae" / "preprocessor_config.json", {
        **common, "crop_size": {"height": TILE, "width": TILE}, "size": {"shortest_edge": TILE},
        "image_mean": 0.5, "image_std": 0.8, "resample": 2})  # the published VAE extractor: bilinear
    return root


@pytest.fixture(scope="module")
def upstream_folder(teacher, tmp_path_factory):
    return write_upstream_folder(teacher, tmp_path_factory.mktemp("z123") / "zero123plus-v1.2")


def _assert_same_teacher(a, b, cond_images):
    assert torch.equal(a.text_states, b.text_states)
    assert torch.equal(a.ramp, b.ramp)
    assert a.clip_preprocess == b.clip_preprocess and a.vae_preprocess == b.vae_preprocess
    ca, cb = a.encode_condition(cond_images, generator=_gen(2)), b.encode_condition(cond_images, generator=_gen(2))
    for f in ("encoder_hidden_states", "cond_lat", "uncond_hidden_states", "uncond_lat"):
        torch.testing.assert_close(getattr(ca, f), getattr(cb, f), rtol=0, atol=0)
    x = _noisy(a)
    n = torch.randn(ca.cond_lat.shape, generator=_gen(4))
    with torch.no_grad():
        torch.testing.assert_close(a.predict_v(x, torch.tensor([10, 990]), ca, guidance_scale=4.0, cond_noise=n),
                                   b.predict_v(x, torch.tensor([10, 990]), cb, guidance_scale=4.0, cond_noise=n),
                                   rtol=0, atol=0)
        torch.testing.assert_close(a.decode_latents(x), b.decode_latents(x), rtol=0, atol=0)


def test_load_the_upstream_layout(teacher, upstream_folder, cond_images):
    loaded = load_teacher(TeacherConfig(pretrained=str(upstream_folder), tile_size=TILE, cond_size=TILE))
    assert loaded.text_encoder is None and loaded.source_dir == str(upstream_folder)  # not kept by default
    assert loaded.vae.dtype == loaded.unet.dtype == loaded.vision_encoder.dtype == torch.float32  # fp16 upcast
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert type(loaded.make_scheduler("euler_ancestral")).__name__ == "EulerAncestralDiscreteScheduler"
    assert loaded.make_scheduler("ddim").config.timestep_spacing == "trailing"
    _assert_same_teacher(teacher, loaded, cond_images)
    kept = load_teacher(TeacherConfig(pretrained=str(upstream_folder), tile_size=TILE, cond_size=TILE,
                                      keep_text_encoder=True))
    before = kept.text_states.clone()
    kept.refresh_text_states()
    assert kept.text_encoder is not None and torch.equal(kept.text_states, before)
    ids = kept.tokenizer("", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [kept.tokenizer.bos_token_id, kept.tokenizer.eos_token_id, kept.tokenizer.pad_token_id]


def test_save_teacher_writes_the_upstream_layout(teacher, upstream_folder, tmp_path, cond_images):
    out = Path(save_teacher(teacher, tmp_path / "saved", dtypes="upstream"))
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    ours, theirs = set(files(out)), set(files(upstream_folder))
    assert theirs <= ours and ours - theirs == {"tokenizer/tokenizer.json"}  # + transformers 5's fast file
    index = json.loads((out / "model_index.json").read_text())
    ref = json.loads((upstream_folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["_class_name"] == "Zero123PlusPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {k: v for k, v in ref.items() if not k.startswith("_")}
    for sub, fname, dtype, prefixes in (
            ("vae", "diffusion_pytorch_model.safetensors", "F16", ("encoder.", "decoder.", "quant_conv", "post_quant_conv")),
            ("unet", "diffusion_pytorch_model.safetensors", "F32", ("",)),
            ("text_encoder", "model.safetensors", "F16", ("text_model.",)),
            ("vision_encoder", "model.safetensors", "F16", ("vision_model.", "visual_projection."))):
        with safe_open(str(out / sub / fname), "pt") as f:
            keys = list(f.keys())
            assert all(k.startswith(prefixes) for k in keys), sub
            assert {str(f.get_slice(k).get_dtype()) for k in keys} == {dtype}, sub
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is False and sched["set_alpha_to_one"] is False and sched["skip_prk_steps"] is True
    vae_pre = json.loads((out / "feature_extractor_vae" / "preprocessor_config.json").read_text())
    assert (vae_pre["image_mean"], vae_pre["image_std"]) == (0.5, 0.8)
    _assert_same_teacher(teacher, load_teacher(TeacherConfig(pretrained=str(out), tile_size=TILE, cond_size=TILE)),
                         cond_images)
    # a loaded teacher without its text encoder in memory re-saves by copying text_encoder/ + tokenizer/
    loaded = load_teacher(TeacherConfig(pretrained=str(out), tile_size=TILE, cond_size=TILE))
    again = Path(save_teacher(loaded, tmp_path / "resaved"))
    assert (again / "tokenizer" / "vocab.json").read_bytes() == (out / "tokenizer" / "vocab.json").read_bytes()
    with pytest.raises(FileExistsError):
        (tmp_path / "not_a_teacher").mkdir()
        (tmp_path / "not_a_teacher" / "precious.txt").write_text("x")
        save_teacher(teacher, tmp_path / "not_a_teacher")


def test_unet_override_from_prefixed_state_dict(teacher, upstream_folder, tmp_path, cond_images):
    other = build_tiny_teacher(CFG, seed=1).unet  # another UNet of the same architecture
    sd = {"unet.unet." + k: v for k, v in other.state_dict().items()}  # as in InstantMesh's Lightning ckpt
    sd["betas"] = torch.linspace(0.00085, 0.012, 1000)  # a non-UNet tensor beside it
    _save(sd, tmp_path / "instantmesh_unet.safetensors")
    torch.save({"state_dict": sd, "global_step": 1000}, tmp_path / "instantmesh_unet.ckpt")
    for path in (tmp_path / "instantmesh_unet.safetensors", tmp_path / "instantmesh_unet.ckpt"):
        t = load_teacher(TeacherConfig(pretrained=str(upstream_folder), unet=str(path), tile_size=TILE, cond_size=TILE))
        for k, v in other.state_dict().items():
            assert torch.equal(t.unet.state_dict()[k], v), k
        x = _noisy(t)
        c = t.encode_condition(cond_images, generator=_gen(2))
        n = torch.randn(c.cond_lat.shape, generator=_gen(4))
        with torch.no_grad():
            torch.testing.assert_close(t.predict_v(x, 500, c, cond_noise=n),
                                       teacher.predict_v(x, 500, c, cond_noise=n, unet=other))
    # a diffusers UNet folder works as well
    other.save_pretrained(str(tmp_path / "unet_folder"))
    t = load_teacher(TeacherConfig(pretrained=str(upstream_folder), unet=str(tmp_path / "unet_folder"),
                                   tile_size=TILE, cond_size=TILE))
    assert torch.equal(t.unet.conv_in.weight, other.conv_in.weight)
    # keys of another model: a clear error
    _save({"model.conv_in.weight": torch.zeros(3, 3)}, tmp_path / "wrong.safetensors")
    with pytest.raises(TeacherFolderError, match="wrong.safetensors"):
        load_teacher(TeacherConfig(pretrained=str(upstream_folder), unet=str(tmp_path / "wrong.safetensors")))


def test_incomplete_folders_name_what_is_missing(upstream_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(upstream_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(TeacherFolderError) as e:
        load_teacher(TeacherConfig(pretrained=str(broken)))
    assert "unet/diffusion_pytorch_model.safetensors" in str(e.value) and "tokenizer/" in str(e.value)
    index = json.loads((upstream_folder / "model_index.json").read_text())
    del index["ramping_coefficients"]
    shutil.copytree(upstream_folder / "tokenizer", broken / "tokenizer")
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherFolderError, match="ramping_coefficients"):  # UNet weights come from the override
        load_teacher(TeacherConfig(pretrained=str(broken), unet=str(upstream_folder / "unet")))
    with pytest.raises(TeacherFolderError, match="no such file"):
        load_teacher(TeacherConfig(pretrained=str(tmp_path / "nowhere")))
    # a weights file lacking tensors its config.json needs
    (broken / "model_index.json").write_text((upstream_folder / "model_index.json").read_text())
    vis = broken / "vision_encoder" / "model.safetensors"
    with safe_open(str(vis), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "visual_projection.weight"}
    _save(sd, vis)
    with pytest.raises(TeacherFolderError, match="vision_encoder.*missing"):
        load_teacher(TeacherConfig(pretrained=str(broken), unet=str(upstream_folder / "unet")))


@pytest.mark.s3
def test_save_and_load_through_s3(teacher, s3_bucket, tmp_path, cond_images):
    from geco import storage

    uri = storage.join(s3_bucket, "models", "zero123plus")
    save_teacher(teacher, uri, dtypes="upstream")
    assert storage.exists(storage.join(uri, "model_index.json"))
    cfg = TeacherConfig(pretrained=uri, tile_size=TILE, cond_size=TILE, cache_dir=str(tmp_path / "cache"))
    loaded = load_teacher(cfg)
    assert Path(loaded.source_dir).is_relative_to(tmp_path / "cache")
    _assert_same_teacher(teacher, loaded, cond_images)
    weights = Path(loaded.source_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    load_teacher(cfg)  # second load: served from the cache
    assert weights.stat().st_mtime_ns == stamp
