"""The one-step generator: the exact x0 formula and its constants, the clean reference pass, seeds,
one UNet evaluation per call (counted with hooks), parameters and gradients, save/load.

A tiny random teacher (16 px tiles and condition) on CPU."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from geco.config import GeneratorConfig, TeacherConfig
from geco.generate import count_calls
from geco.models.generator import (
    ALPHA_950,
    SIGMA_950,
    GeneratorLoadError,
    OneStepGenerator,
    load_generator,
    make_generator,
    save_generator,
)
from geco.models.teacher import build_tiny_teacher

TILE = 16


@pytest.fixture(scope="module")
def teacher():
    return build_tiny_teacher(TeacherConfig(tile_size=TILE, cond_size=TILE), seed=0)


@pytest.fixture(scope="module")
def gen(teacher):
    g = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    with torch.no_grad():  # make it differ from the teacher, as a trained one would
        for p in g.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return g


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cond(teacher, images):
    return teacher.encode_condition(images, generator=torch.Generator().manual_seed(2))


def _z(teacher, b=2, seed=3):
    return torch.randn(teacher.latent_shape(b), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
def test_schedule_constants_at_950(teacher, gen):
    abar = teacher.alphas_cumprod[950].double()
    assert abar.sqrt().item() == pytest.approx(ALPHA_950, abs=1e-5)
    assert (1 - abar).sqrt().item() == pytest.approx(SIGMA_950, abs=1e-5)
    # UPSTREAM.md: alpha ~ 0.053, sigma ~ 0.999 at t* = 950
    assert round(ALPHA_950, 3) == 0.053 and round(SIGMA_950, 3) == 0.999
    a, s = gen.alpha_sigma()
    assert gen.timestep == 950
    assert a == pytest.approx(ALPHA_950, abs=1e-5) and s == pytest.approx(SIGMA_950, abs=1e-5)
    assert a * a + s * s == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [True, False])
def test_x0_is_exact_v_identity_on_what_the_unet_saw(teacher, gen, cond, scale):
    g = OneStepGenerator(teacher, gen.unet, GeneratorConfig(scale_input_by_sigma=scale))
    z = _z(teacher)
    x_in = g.model_input(z)
    torch.testing.assert_close(x_in, z * SIGMA_950 if scale else z, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        x0 = g(cond, z)
        v = teacher.predict_v(x_in, 950, cond, cond_timestep=0, guidance_scale=1.0,
                              cond_noise=torch.zeros_like(cond.cond_lat), unet=gen.unet)
    # exact: x0 = alpha_t * x_in - sigma_t * v with the teacher's schedule at t* ...
    a, s = teacher.alpha_sigma(950, x_in)
    torch.testing.assert_close(x0, a * x_in - s * v, atol=1e-6, rtol=1e-6)
    # ... whose values are the published constants
    torch.testing.assert_close(x0, ALPHA_950 * x_in - SIGMA_950 * v, atol=1e-4, rtol=1e-4)


def test_one_evaluation_with_a_clean_reference_pass(teacher, gen, cond):
    """Per call: exactly two UNet forwards, the reference pass on the clean cond_lat at timestep 0
    ("write"), then the sample at t* ("read"); guidance 1 (batch B, not 2B)."""
    calls = []

    def pre(_m, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        mode = (kwargs.get("cross_attention_kwargs") or {}).get("ref_mode")
        calls.append((sample.detach().clone(), torch.as_tensor(t).detach().clone(), mode))

    z = _z(teacher)
    h = gen.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            gen(cond, z)
    finally:
        h.remove()
    assert [c[2] for c in calls] == ["write", "read"]
    ref, ref_t, _ = calls[0]
    torch.testing.assert_close(ref, cond.cond_lat)  # clean: no noise added
    assert torch.all(ref_t == 0)
    sample, t, _ = calls[1]
    assert sample.shape[0] == 2  # conditional half only
    torch.testing.assert_close(sample, z * SIGMA_950, atol=1e-5, rtol=1e-4)
    assert torch.all(t == 950)


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_counts_one_unet_evaluation(teacher, gen, batch):
    x = torch.rand(batch, 3, TILE, TILE, generator=torch.Generator().manual_seed(5))
    with count_calls({"unet": gen.unet, "teacher_unet": teacher.unet, "vae_decoder": teacher.vae.decoder}) as n:
        latents, views = gen.generate(x, generator=0)
    assert n["unet"] == 2 and n["unet_denoise"] == 1 and n["unet_reference"] == 1
    assert n["teacher_unet"] == 0  # the generator runs its own copy
    assert n["vae_decoder"] == 1
    assert latents.shape == teacher.latent_shape(batch)
    assert views.shape == (batch, 6, 3, TILE, TILE)
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0


def test_seeds(teacher, gen, images):
    state = torch.get_rng_state()
    a, va = gen.generate(images[:1], generator=7)
    b, vb = gen.generate(images[:1], generator=7)
    c, _ = gen.generate(images[:1], generator=8)
    d, _ = gen.generate(images[:1], generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a, b) and torch.equal(va, vb) and torch.equal(a, d)
    assert (a - c).abs().mean() > 1e-3
    with pytest.raises(TypeError, match="seed"):
        gen.generate(images[:1], generator=1.5)


def test_own_unet_copy_shared_frozen_encoders(teacher):
    g = OneStepGenerator.from_teacher(teacher)
    tsd, gsd = teacher.unet.state_dict(), g.unet.state_dict()
    assert tsd.keys() == gsd.keys()
    assert all(torch.equal(tsd[k], gsd[k]) for k in tsd)
    assert all(tsd[k].data_ptr() != gsd[k].data_ptr() for k in tsd)  # a copy, not shared storage
    # only the UNet is a parameter of the generator; the teacher's VAE/encoders are shared by reference
    assert set(g.state_dict()) == {f"unet.{k}" for k in gsd}
    assert sum(p.numel() for p in g.parameters()) == sum(p.numel() for p in teacher.unet.parameters())
    assert g.teacher is teacher and g.teacher.vae is teacher.vae
    assert "teacher" not in dict(g.named_children())


def test_deepcopy_copies_the_unet_and_shares_the_teacher(teacher, gen):
    import copy

    ema = copy.deepcopy(gen)
    assert ema.teacher is teacher and ema.unet is not gen.unet
    p, q = next(ema.unet.parameters()), next(gen.unet.parameters())
    assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_gradients_reach_the_generator_unet_only(teacher, cond):
    g = OneStepGenerator.from_teacher(teacher)
    x0 = g(cond, _z(teacher))
    teacher.decode_latents(x0).mean().backward()
    grads = [p.grad for p in g.unet.parameters()]
    assert all(gr is not None for gr in grads) and sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None for p in teacher.vae.parameters())
    assert all(p.grad is None for p in teacher.unet.parameters())


def test_save_and_load(teacher, gen, cond, tmp_path, caplog):
    dest = tmp_path / "gen"
    save_generator(gen, dest)
    assert (dest / "unet" / "config.json").is_file()
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((dest / "generator.json").read_text())
    assert meta["timestep"] == 950 and meta["scale_input_by_sigma"] is True
    loaded = load_generator(GeneratorConfig(pretrained=str(dest)), teacher)
    z = _z(teacher)
    with torch.no_grad():
        torch.testing.assert_close(loaded(cond, z), gen(cond, z), atol=0, rtol=0)
    assert make_generator(GeneratorConfig(pretrained=str(dest)), teacher).timestep == 950
    # t* is part of the checkpoint: a config that disagrees is overridden, loudly
    with caplog.at_level(logging.WARNING):
        other = load_generator(GeneratorConfig(pretrained=str(dest), timestep=800), teacher)
    assert other.timestep == 950 and "950" in caplog.text
    # saving again over a generator checkpoint replaces it; over anything else refuses
    save_generator(gen, dest)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_generator(gen, tmp_path / "other")


def test_load_errors(teacher, tmp_path):
    with pytest.raises(GeneratorLoadError, match="no such file"):
        load_generator(GeneratorConfig(pretrained=str(tmp_path / "nope")), teacher)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeneratorLoadError, match="unet/config.json"):
        load_generator(GeneratorConfig(pretrained=str(tmp_path / "empty")), teacher)
    big = build_tiny_teacher(TeacherConfig(tile_size=TILE, cond_size=TILE, tiny_cross_attention_dim=16), seed=0)
    save_generator(OneStepGenerator.from_teacher(big), tmp_path / "other")
    with pytest.raises(GeneratorLoadError, match="does not fit the teacher"):
        load_generator(GeneratorConfig(pretrained=str(tmp_path / "other")), teacher)
