"""Stage-1 VSD: the gradient identity and its sign, what each loss trains, the LoRA fake score that
shares the teacher's weights without changing it, and a tiny end-to-end loop.

Everything runs on the tiny random teacher (16 px tiles -> 24 x 16 grid latents) on CPU, one thread.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from geco.config import GeneratorConfig, Stage1Config, TeacherConfig
from geco.distill.vsd import (
    FakeScore,
    FakeScoreObjective,
    GeneratorObjective,
    VSDStep,
    estimate_stage1_memory,
    fake_score_loss,
    generator_loss,
    make_fake_score,
    predict_eps,
    regression_loss,
    sample_timesteps,
    set_gradient_checkpointing,
    vsd_gradient,
)
from geco.models.generator import OneStepGenerator
from geco.models.lpips import LPIPSLoss, LPIPSUnavailableWarning
from geco.models.teacher import build_tiny_teacher
from geco.train.loop import GradientStep, make_adamw

TILE = 16
CFG = TeacherConfig(tile_size=TILE, cond_size=TILE, num_inference_steps=2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def teacher():
    return build_tiny_teacher(CFG, seed=0)


@pytest.fixture
def cond(teacher):
    rgb = torch.rand(2, 3, TILE, TILE, generator=_gen(1))
    return teacher.encode_condition(rgb, generator=_gen(2))


def _perturb_lora(fake: FakeScore, seed: int = 3, scale: float = 0.05) -> None:
    """Give the zero-initialised LoRA up-weights some value so that the fake score != the teacher."""
    g = _gen(seed)
    with torch.no_grad():
        for n, p in fake.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(teacher, gen, fake, *, lpips=None, regression_pairs=None, optimizer_g=None, **settings) -> VSDStep:
    """The one stage-1 step around plain (unwrapped) models, with Adam(W) per network as VSDTask
    builds them; ``settings`` are Stage1Config fields."""
    s = Stage1Config(**settings)
    gen_obj = GeneratorObjective(gen, teacher, fake, s, lpips)
    fake_obj = FakeScoreObjective(fake, teacher, s)
    opt_g = optimizer_g or make_adamw(gen.unet.parameters(), lr=s.lr_generator, betas=s.betas_generator)
    opt_f = make_adamw(fake.trainable_parameters(), lr=s.lr_fake, betas=s.betas_fake)
    return VSDStep(teacher, gen_obj, fake_obj, GradientStep(gen.unet.parameters(), opt_g),
                   GradientStep(fake.trainable_parameters(), opt_f), s, regression_pairs=regression_pairs)


def _cond_batch(b=2, seed=1) -> dict:
    return {"cond": torch.rand(b, 3, TILE, TILE, generator=_gen(seed)), "keys": [f"obj{i}" for i in range(b)]}


def _fixed_inputs(teacher, cond, b=2, seed=10):
    g = _gen(seed)
    x0 = torch.randn(teacher.latent_shape(b), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    cond_noise = torch.randn((b, *cond.cond_lat.shape[1:]), generator=g)
    t = torch.tensor([300, 700][:b])
    return x0, noise, cond_noise, t


# -------------------------------------------------------------------------------------------------
def test_sample_timesteps_range_and_seed():
    t = sample_timesteps(4096, _gen(0))
    assert t.dtype == torch.int64 and t.shape == (4096,)
    assert int(t.min()) >= 20 and int(t.max()) <= 980
    assert int(t.min()) < 40 and int(t.max()) > 960  # covers the range
    assert torch.equal(t, sample_timesteps(4096, _gen(0)))
    assert torch.equal(sample_timesteps(3, _gen(0), 0.5, 0.5), torch.tensor([500, 500, 500]))
    assert int(sample_timesteps(100, _gen(0), 0.9, 1.0).max()) <= 999
    with pytest.raises(ValueError):
        sample_timesteps(2, None, 0.9, 0.1)


def test_gradient_identity(teacher, cond):
    """d loss / d x0 = (eps_teacher(CFG 4) - eps_fake(CFG 1)) / B, computed independently."""
    fake = make_fake_score(teacher, "lora")
    _perturb_lora(fake)
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    x0 = x0.requires_grad_(True)
    loss, stats = generator_loss(teacher, fake, x0, cond, t, noise, teacher_cfg=4.0, fake_cfg=1.0,
                                 cond_noise=cond_noise)
    loss.backward()

    with torch.no_grad():
        x_t = teacher.add_noise(x0.detach(), noise, t)
        eps_t = predict_eps(teacher, x_t, t, cond, 4.0, cond_noise=cond_noise)
        eps_f = predict_eps(teacher, x_t, t, cond, 1.0, cond_noise=cond_noise, unet=fake.unet)
    expected = (eps_t - eps_f) / x0.shape[0]
    assert expected.abs().mean() > 1e-3  # a non-trivial difference
    torch.testing.assert_close(x0.grad, expected, rtol=1e-5, atol=1e-6)
    # the loss value is 0.5 * ||g||^2 / B (the "sum" reduction divided by the batch size)
    g = eps_t - eps_f
    assert math.isclose(float(loss.detach()), 0.5 * float(g.pow(2).sum()) / 2, rel_tol=1e-5)
    assert math.isclose(stats["vsd_grad_abs_mean"], float(g.abs().mean()), rel_tol=1e-5)
    assert stats["t_mean"] == 500.0
    # vsd_gradient is the same quantity
    g2, parts = vsd_gradient(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    torch.testing.assert_close(g2, g)
    # an untrained fake score equals the teacher: with CFG 1 on both sides the gradient vanishes
    fresh = make_fake_score(teacher, "lora")
    g0, _ = vsd_gradient(teacher, fresh, x0, cond, t, noise, teacher_cfg=1.0, fake_cfg=1.0, cond_noise=cond_noise)
    assert float(g0.abs().max()) == 0.0


def test_sign_on_point_masses(teacher, cond, monkeypatch):
    """Toy scores we control: the teacher's data is a point mass at mu_T, the fake score's at the
    generator's current output mu_F = x0 (a perfectly fitted fake score). eps(x_t) = (x_t - a mu)/s.
    Then g = eps_T - eps_F = a (mu_F - mu_T) / s, and gradient descent on the loss must move x0
    towards mu_T (the teacher's mode), i.e. reduce the teacher-vs-fake discrepancy."""
    fake = make_fake_score(teacher, "lora")
    shape = teacher.latent_shape(2)
    mu_t = torch.randn(shape, generator=_gen(5))
    state = {"mu_f": None}

    def toy_predict_v(x_t, t, c, cond_timestep=None, guidance_scale=1.0, *, cond_noise=None, generator=None,
                      unet=None, use_reference=True):
        a, s = teacher.alpha_sigma(t, x_t)
        mu = mu_t if unet is None else state["mu_f"]
        eps = (x_t - a * mu) / s
        return (eps - s * x_t) / a  # the v that v_to_eps turns back into eps

    monkeypatch.setattr(teacher, "predict_v", toy_predict_v)
    x0 = torch.randn(shape, generator=_gen(6)).requires_grad_(True)
    opt = torch.optim.SGD([x0], lr=0.2)  # |1 - lr a/(s B)| < 1 for every t in [20, 980]
    dist = [float((x0.detach() - mu_t).norm())]
    g = _gen(7)
    for step in range(10):
        state["mu_f"] = x0.detach().clone()
        t = sample_timesteps(2, g)
        noise = torch.randn(shape, generator=g)
        opt.zero_grad()
        loss, _ = generator_loss(teacher, fake, x0, cond, t, noise)
        loss.backward()
        if step == 0:
            # exact direction: -grad is a positive multiple of (mu_T - x0), per sample
            a, s = teacher.alpha_sigma(t, x0)
            torch.testing.assert_close(-x0.grad, (a / s) * (mu_t - x0.detach()) / 2, rtol=1e-4, atol=1e-6)
        opt.step()
        dist.append(float((x0.detach() - mu_t).norm()))
    assert all(b < a for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] < 0.75 * dist[0]


def test_generator_loss_trains_only_the_generator(teacher, cond):
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, "lora")
    _perturb_lora(fake)
    z = gen.sample_noise(2, 11)
    x0 = gen(cond, z)
    _, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    loss, _ = generator_loss(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    loss.backward()
    assert all(p.grad is None for p in teacher.unet.parameters())
    assert all(p.grad is None for p in fake.unet.parameters())
    grads = [p.grad for p in gen.unet.parameters()]
    assert all(gr is not None for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fake_score_loss_trains_only_the_fake_score(teacher, cond, mode):
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, mode)
    x0 = gen(cond, gen.sample_noise(2, 12))  # carries the generator's graph: must be cut
    _, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    loss = fake_score_loss(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in gen.unet.parameters())
    assert all(p.grad is None for p in teacher.unet.parameters())
    trainable = fake.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0
    frozen = [p for p in fake.unet.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    if mode == "lora":
        n_lora = sum(p.numel() for p in trainable)
        assert 0 < n_lora < 0.1 * sum(p.numel() for p in teacher.unet.parameters())
    else:
        assert len(trainable) == len(list(teacher.unet.parameters()))


def test_lora_fake_score_shares_weights_and_leaves_the_teacher_bit_identical(teacher, cond):
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    x_t = teacher.add_noise(x0, noise, t)
    with torch.no_grad():
        before = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise)
    teacher_state = _snapshot(teacher.unet)

    fake = make_fake_score(teacher, "lora", lora_rank=4)
    assert fake.shares_teacher_weights
    w_teacher = teacher.unet.conv_in.weight
    assert fake.unet.conv_in.weight is w_teacher  # same tensor, no copy
    q_teacher = teacher.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    q_fake = fake.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q_fake.base_layer.weight is q_teacher.weight
    assert type(q_teacher) is torch.nn.Linear  # no adapter injected into the teacher's module
    assert not any(p.requires_grad for p in teacher.unet.parameters())

    opt = torch.optim.Adam(fake.trainable_parameters(), lr=1e-2)
    g = _gen(20)
    for _ in range(3):
        opt.zero_grad()
        tt = sample_timesteps(2, g)
        loss = fake_score_loss(teacher, fake, x0, cond, tt, torch.randn(x0.shape, generator=g), generator=g)
        loss.backward()
        opt.step()

    with torch.no_grad():
        after = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise)
        v_fake = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise, unet=fake.unet)
        with fake.adapter_disabled():
            v_fake_off = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise, unet=fake.unet)
        v_fake_on = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise, unet=fake.unet)
    assert torch.equal(before, after)  # the teacher is bit-identical
    assert _same(teacher_state, _snapshot(teacher.unet))
    assert not torch.allclose(v_fake, before, atol=1e-4)  # the fake score did learn something
    assert torch.equal(v_fake_off, before)  # adapter off == the bare shared base == the teacher
    assert torch.equal(v_fake_on, v_fake)  # and back on afterwards
    assert set(fake.trainable_state_dict()) and all("lora" in k for k in fake.trainable_state_dict())


def test_full_fake_score_is_an_independent_copy(teacher, cond):
    fake = make_fake_score(teacher, "full")
    assert not fake.shares_teacher_weights
    assert fake.unet.conv_in.weight.data_ptr() != teacher.unet.conv_in.weight.data_ptr()
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    with torch.no_grad():
        x_t = teacher.add_noise(x0, noise, t)
        assert torch.equal(teacher.predict_v(x_t, t, cond, cond_noise=cond_noise),
                           teacher.predict_v(x_t, t, cond, cond_noise=cond_noise, unet=fake.unet))
    loss, stats = generator_loss(teacher, fake, x0.requires_grad_(True), cond, t, noise, cond_noise=cond_noise)
    assert torch.isfinite(loss) and stats["vsd_grad_abs_mean"] > 0  # CFG 4 vs CFG 1 differ
    with pytest.raises(ValueError, match="mode"):
        make_fake_score(teacher, "half")


def test_lora_init_is_seeded_and_trained_weights_are_fp32(teacher):
    state = torch.random.get_rng_state()
    a = make_fake_score(teacher, "lora", seed=1).trainable_state_dict()
    b = make_fake_score(teacher, "lora", seed=1).trainable_state_dict()
    c = make_fake_score(teacher, "lora", seed=2).trainable_state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert _same(a, b) and not _same(a, c)
    # a 16-bit teacher: the shared base stays bf16, what is trained is fp32 (lr 1e-6 Adam steps are
    # below bf16 resolution)
    t16 = build_tiny_teacher(CFG.model_copy(update={"dtype": "bfloat16"}), seed=0)
    for mode in ("lora", "full"):
        fake = make_fake_score(t16, mode)
        assert {p.dtype for p in fake.trainable_parameters()} == {torch.float32}
        assert t16.unet.dtype == torch.bfloat16
    cond16 = t16.encode_condition(torch.rand(1, 3, TILE, TILE, generator=_gen(8)), generator=_gen(9))
    x0 = torch.randn(t16.latent_shape(1), generator=_gen(10))
    loss = fake_score_loss(t16, fake, x0, cond16, torch.tensor([500]), torch.randn(x0.shape, generator=_gen(11)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in fake.trainable_parameters())


def test_fake_score_loss_decreases_on_fixed_generator_outputs(teacher, cond):
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    with torch.no_grad():
        particles = gen(cond, gen.sample_noise(2, 30))
    fake = make_fake_score(teacher, "lora", lora_rank=8)
    # a fixed evaluation set of (t, noise, reference noise)
    g = _gen(31)
    evals = [(torch.tensor([tt, tt + 100]), torch.randn(particles.shape, generator=g),
              torch.randn((2, *cond.cond_lat.shape[1:]), generator=g)) for tt in (100, 400, 700)]

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(float(fake_score_loss(teacher, fake, particles, cond, t, n, cond_noise=cn))
                       for t, n, cn in evals) / len(evals)

    start = eval_loss()
    opt = torch.optim.Adam(fake.trainable_parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        loss = fake_score_loss(teacher, fake, particles, cond, sample_timesteps(2, g),
                               torch.randn(particles.shape, generator=g), generator=g)
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.9 * start, (start, end)  # 0.529 -> 0.430 here


def test_vsd_loop_end_to_end(teacher):
    """~20 alternating steps: the generator and the LoRA change, the teacher (and the shared base)
    do not, every statistic is finite."""
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, "lora")
    teacher_state = _snapshot(teacher.unet)
    gen_state = _snapshot(gen.unet)
    lora_before = {k: v.clone() for k, v in fake.trainable_state_dict().items()}
    step = _step(teacher, gen, fake, lr_generator=1e-4, lr_fake=1e-3, betas_generator=(0.0, 0.99))
    g = _gen(40)
    history = [step([_cond_batch()], g) for _ in range(20)]
    for st in history:
        for k in ("loss_vsd", "loss_fake", "grad_norm_g", "grad_norm_f", "vsd_grad_abs_mean", "t_mean"):
            assert math.isfinite(st[k]), (k, st)
        assert 20 <= st["t_mean"] <= 980 and st["g_skipped"] == 0 and st["f_skipped"] == 0
    assert history[0]["grad_norm_g"] > 0 and history[0]["grad_norm_f"] > 0
    assert _same(teacher_state, _snapshot(teacher.unet))  # teacher (incl. the shared LoRA base) untouched
    assert not _same(gen_state, _snapshot(gen.unet))
    lora_after = fake.trainable_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_gradient_checkpointing_gives_the_same_step(teacher):
    """Checkpointing (generator and LoRA fake score) recomputes with the same reference-attention mode
    and adapter state: one step matches the step without it."""
    results = []
    for ckpt in (False, True):
        gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
        fake = make_fake_score(teacher, "lora")
        _perturb_lora(fake)
        set_gradient_checkpointing(gen.unet, ckpt)
        set_gradient_checkpointing(fake.unet, ckpt)
        step = _step(teacher, gen, fake, lr_generator=1e-4, lr_fake=1e-3)
        assert gen.unet.is_gradient_checkpointing == ckpt and fake.unet.is_gradient_checkpointing == ckpt
        assert not teacher.unet.is_gradient_checkpointing
        results.append(step([_cond_batch()], _gen(50)))
    a, b = results
    for k in ("loss_vsd", "loss_fake", "grad_norm_g", "grad_norm_f"):
        assert math.isclose(a[k], b[k], rel_tol=1e-4), (k, a[k], b[k])


def test_fake_score_loss_eps_target_by_hand(teacher, cond):
    """The default fake-score loss is the authors' eps-MSE, eps = sigma x_t + alpha v (the fake
    score's v output converted); per sample it is alpha_bar_t times the v-MSE (the v option)."""
    fake = make_fake_score(teacher, "lora")
    _perturb_lora(fake)
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    with torch.no_grad():
        x_t = teacher.add_noise(x0, noise, t)
        v = teacher.predict_v(x_t, t, cond, cond_noise=cond_noise, unet=fake.unet)
        abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps_hat = s * x_t + a * v
        by_hand = float(((eps_hat - noise) ** 2).mean())
        v_target = a * noise - s * x0
        v_by_hand = float(((v - v_target) ** 2).mean())
        eps = fake_score_loss(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)  # the default
        v_loss = fake_score_loss(teacher, fake, x0, cond, t, noise, target="v", cond_noise=cond_noise)
    assert math.isclose(float(eps), by_hand, rel_tol=1e-5)
    assert math.isclose(float(v_loss), v_by_hand, rel_tol=1e-5)
    for i in range(2):  # per sample: eps loss = alpha_bar_t * v loss
        sl = slice(i, i + 1)
        with torch.no_grad():
            e_i = fake_score_loss(teacher, fake, x0[sl], cond[i], t[sl], noise[sl], cond_noise=cond_noise[sl])
            v_i = fake_score_loss(teacher, fake, x0[sl], cond[i], t[sl], noise[sl], target="v",
                                  cond_noise=cond_noise[sl])
        assert math.isclose(float(e_i), float(abar[i]) * float(v_i), rel_tol=1e-4)
    assert Stage1Config().fake_loss == "eps"
    assert FakeScoreObjective(fake, teacher, Stage1Config(fake_loss="v")).target == "v"
    with pytest.raises(ValueError, match="eps"):
        fake_score_loss(teacher, fake, x0, cond, t, noise, target="x0")


def test_vsd_gradient_difference_is_fp32_under_bf16_autocast(teacher, cond):
    """Under bf16 autocast the UNets compute in bf16, but g = eps_teacher - eps_fake is formed from
    the predictions cast to float32 (CFG, eps conversion and difference in float32): exactly the
    float32 difference of the autocast predictions, not a bf16 one."""
    fake = make_fake_score(teacher, "lora")
    _perturb_lora(fake)
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    x_t = teacher.add_noise(x0, noise, t)
    with torch.no_grad():
        v_t32 = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v_t = teacher.predict_v(x_t, t, cond, guidance_scale=4.0, cond_noise=cond_noise)
            v_f = teacher.predict_v(x_t, t, cond, cond_noise=cond_noise, unet=fake.unet)
            g, parts = vsd_gradient(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    assert not torch.equal(v_t, v_t32)  # autocast is on: the UNet ran in bf16
    a, s = teacher.alpha_sigma(t, x_t)
    eps_t, eps_f = s * x_t + a * v_t.float(), s * x_t + a * v_f.float()
    assert g.dtype == parts["eps_teacher"].dtype == parts["eps_fake"].dtype == torch.float32
    torch.testing.assert_close(g, eps_t - eps_f, rtol=0, atol=0)
    g16 = (eps_t.bfloat16() - eps_f.bfloat16()).float()
    assert not torch.equal(g, g16)  # what a bf16 difference would have given


def test_vsd_gradient_zeroes_nan_and_inf(teacher, cond, monkeypatch):
    """The authors' nan_to_num: NaN/inf in the teacher-minus-fake difference become 0, the rest is
    kept, and the generator's gradient stays finite."""
    fake = make_fake_score(teacher, "lora")
    _perturb_lora(fake)
    x0, noise, cond_noise, t = _fixed_inputs(teacher, cond)
    g_ok, _ = vsd_gradient(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    predict_v = teacher.predict_v

    def broken(x_t, tt, c, *args, unet=None, **kw):
        v = predict_v(x_t, tt, c, *args, unet=unet, **kw)
        if unet is None:  # the teacher's prediction
            v = v.clone()
            v[0, 0, 0, 0], v[1, 1, 2, 3], v[1, 2, 0, 1] = float("nan"), float("inf"), float("-inf")
        return v

    monkeypatch.setattr(teacher, "predict_v", broken)
    g, _ = vsd_gradient(teacher, fake, x0, cond, t, noise, cond_noise=cond_noise)
    assert torch.isfinite(g).all()
    bad = torch.zeros_like(g, dtype=torch.bool)
    bad[0, 0, 0, 0] = bad[1, 1, 2, 3] = bad[1, 2, 0, 1] = True
    assert (g[bad] == 0).all() and torch.equal(g[~bad], g_ok[~bad])
    x = x0.clone().requires_grad_(True)
    loss, _ = generator_loss(teacher, fake, x, cond, t, noise, cond_noise=cond_noise)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_generator_gradient_is_clipped_only_when_asked(teacher, max_norm):
    """With SGD at lr 1 the generator's update is minus its gradient: unclipped (the default, the
    authors' code) its norm is the logged pre-clip norm; with max_grad_norm_generator it is that."""
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, "lora")
    before = [p.detach().clone() for p in gen.unet.parameters()]
    sgd = torch.optim.SGD(gen.unet.parameters(), lr=1.0)
    settings = {"max_grad_norm_generator": max_norm} if max_norm else {}
    st = _step(teacher, gen, fake, optimizer_g=sgd, **settings)([_cond_batch()], _gen(80))
    step_norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.detach() - b) for p, b in zip(gen.unet.parameters(), before)])))
    assert st["grad_norm_g"] > 1.0  # the pre-clip norm, larger than any limit tested here
    assert math.isclose(step_norm, max_norm or st["grad_norm_g"], rel_tol=1e-3), (step_norm, st["grad_norm_g"])
    assert Stage1Config().max_grad_norm_generator == 0.0


def test_non_finite_generator_gradient_skips_its_update(teacher):
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, "lora")
    step = _step(teacher, gen, fake, lr_generator=1e-3, lr_fake=1e-3)
    objective = step.generator

    def poisoned(*args):
        out = objective(*args)
        return {**out, "loss": out["loss"] * float("nan")}

    step.generator = poisoned
    before = _snapshot(gen.unet)
    lora_before = {k: v.clone() for k, v in fake.trainable_state_dict().items()}
    st = step([_cond_batch()], _gen(81))
    assert st["g_skipped"] == 1.0 and st["f_skipped"] == 0.0 and not math.isfinite(st["grad_norm_g"])
    assert _same(before, _snapshot(gen.unet))
    assert any(not torch.equal(lora_before[k], v) for k, v in fake.trainable_state_dict().items())


def test_regression_loss_skips_lpips_when_unavailable():
    g = _gen(60)
    pred = torch.rand(2, 6, 3, 8, 8, generator=g, requires_grad=True)
    target = torch.rand(2, 6, 3, 8, 8, generator=g)
    mse = float(torch.nn.functional.mse_loss(pred.detach(), target))
    with pytest.warns(LPIPSUnavailableWarning, match="LPIPS term skipped"):
        loss, stats = regression_loss(pred, target, lpips=None)
    assert math.isclose(float(loss.detach()), mse, rel_tol=1e-6) and stats["reg_lpips_skipped"] == 1.0
    with pytest.warns(LPIPSUnavailableWarning):
        loss2, _ = regression_loss(pred, target, lpips=LPIPSLoss(None, reason="no weights in the test"))
    assert math.isclose(float(loss2.detach()), mse, rel_tol=1e-6)
    # with an LPIPS-like callable the term is added (weights multiply); no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l1 = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731
        loss3, stats3 = regression_loss(pred, target, lpips=l1, mse_weight=2.0, lpips_weight=0.5, lpips_size=16)
    expected = 2.0 * mse + 0.5 * stats3["reg_lpips"]
    assert math.isclose(float(loss3.detach()), expected, rel_tol=1e-5)
    loss3.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        regression_loss(pred, target[:1])


def test_vsd_step_with_a_regression_batch(teacher):
    gen = OneStepGenerator.from_teacher(teacher, GeneratorConfig())
    fake = make_fake_score(teacher, "lora")
    z = gen.sample_noise(2, 70)
    teacher_images = torch.rand(2, 3, 3 * TILE, 2 * TILE, generator=_gen(71))
    asked = []

    def pairs(keys, cond):
        asked.append(list(keys))
        return z, teacher_images

    step = _step(teacher, gen, fake, lr_generator=1e-4, regression_weight=1.0, regression_pairs=pairs,
                 lpips=lambda a, b: (a - b).abs().mean())
    st = step([_cond_batch()], _gen(72))
    assert math.isfinite(st["loss_reg"]) and "reg_lpips" in st and st["g_skipped"] == 0
    assert st["loss_generator"] > st["loss_vsd"] and asked == [["obj0", "obj1"]]
    with pytest.raises(ValueError, match="regression_pairs"):
        _step(teacher, gen, fake, regression_weight=1.0)


def test_memory_estimate():
    lora = estimate_stage1_memory(lora=True)
    full = estimate_stage1_memory(lora=False)
    ckpt = estimate_stage1_memory(lora=True, gradient_checkpointing=True)
    fp32 = estimate_stage1_memory(lora=True, dtype="float32")
    assert lora["total"] < full["total"]
    assert full["fake_adam"] == full["generator_adam"] and lora["fake_adam"] < 0.01
    assert ckpt["activations"] < 0.3 * lora["activations"]
    assert math.isclose(fp32["teacher_weights"], 2 * lora["teacher_weights"], rel_tol=1e-3)
    parts = {k: v for k, v in full.items() if k != "total"}
    assert math.isclose(sum(parts.values()), full["total"], abs_tol=0.01)
    # SD2 UNet: 866 M parameters -> 1.6 GiB at fp16, Adam 6.5 GiB
    assert 1.5 < lora["teacher_weights"] < 1.7 and 6.3 < lora["generator_adam"] < 6.6
    b4 = estimate_stage1_memory(batch=4)
    assert math.isclose(b4["activations"], 4 * lora["activations"], rel_tol=1e-2)
