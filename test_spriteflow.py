"""Tests for SpriteFlow, to be read as a second lesson.

Part 1 checks the mathematics with property tests: each docstring names the
identity it checks. Part 2 drives the samplers with a vector field we know in
closed form. Part 3 checks what a user relies on: the loader, the network,
training, checkpoints and the command line. Part 4 (further down) covers fid.py.

Run with:  python -m pytest -q
"""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import linalg

import fid
import spriteflow as sf

ROOT = Path(__file__).resolve().parent
torch.set_num_threads(min(2, torch.get_num_threads()))
# No deadline: torch's first call in a process is slow, and we never assert wall time.
settings.register_profile("spriteflow", deadline=None, max_examples=40)
settings.load_profile("spriteflow")

times = st.floats(0.0, 1.0, allow_nan=False)
inner_times = st.floats(0.01, 0.98, allow_nan=False)
schedules = st.sampled_from(sf.SCHEDULES)
seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def tensors(seed, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)



# -----------------------------------------------------------------------------
# Part 1: schedules and the Gaussian path
# -----------------------------------------------------------------------------


@given(schedules)
def test_schedule_boundary_values(name):
    """alpha_0 = 0, alpha_1 = 1, beta_0 = 1, beta_1 = 0, exactly, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        alpha, beta, _, _ = sf.schedule(name, torch.tensor([0.0, 1.0], dtype=dtype))
        assert alpha.tolist() == [0.0, 1.0]
        assert beta.tolist() == [1.0, 0.0]


@given(schedules, times)
def test_schedule_derivatives_match_autograd(name, t0):
    """d_alpha = d alpha/dt and d_beta = d beta/dt, compared with autograd."""
    t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    alpha, beta, d_alpha, d_beta = sf.schedule(name, t)
    (grad_alpha,) = torch.autograd.grad(alpha, t, retain_graph=True)
    (grad_beta,) = torch.autograd.grad(beta, t)
    assert torch.allclose(d_alpha, grad_alpha, atol=1e-12)
    assert torch.allclose(d_beta, grad_beta, atol=1e-12)


@given(schedules, seeds, shapes)
def test_path_endpoints_are_exactly_noise_and_data(name, seed, shape):
    """x_0 = eps and x_1 = z, bit for bit: the path starts at noise and ends at data."""
    z, eps = (
        tensors(seed, (2, *shape), torch.float32),
        tensors(seed + 1, (2, *shape), torch.float32),
    )
    assert torch.equal(sf.sample_path(z, torch.zeros(2), eps, name), eps)
    assert torch.equal(sf.sample_path(z, torch.ones(2), eps, name), z)


@given(schedules, times, seeds, shapes)
def test_conditional_vector_field_is_time_derivative_of_path(name, t0, seed, shape):
    """u_t(x_t | z) = d/dt x_t for fixed (z, eps), with the derivative from forward-mode
    autograd."""
    z, eps = tensors(seed, (3, *shape)), tensors(seed + 1, (3, *shape))
    t = torch.full((3,), t0, dtype=torch.float64)
    _, dx_dt = torch.func.jvp(
        lambda s: sf.sample_path(z, s, eps, name), (t,), (torch.ones_like(t),)
    )
    assert torch.allclose(sf.conditional_vector_field(z, t, eps, name), dx_dt, atol=1e-10)


@given(schedules, inner_times, seeds, shapes)
def test_conditional_score_is_gradient_of_log_density(name, t0, seed, shape):
    """grad_x log N(x; alpha_t z, beta_t^2 I) from autograd equals -(x - alpha_t z) / beta_t^2."""
    z = tensors(seed, (2, *shape))
    x = tensors(seed + 1, (2, *shape)).requires_grad_(True)
    t = torch.full((2,), t0, dtype=torch.float64)
    alpha, beta, _, _ = sf.schedule(name, sf.expand(t, x))
    d = x[0].numel()
    log_p = (
        (-((x - alpha * z) ** 2) / (2 * beta**2)).flatten(1).sum(1)
        - d * torch.log(beta.flatten())
        - d / 2 * math.log(2 * math.pi)
    )
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    assert torch.allclose(sf.conditional_score(x.detach(), z, t, name), grad, rtol=1e-9, atol=1e-9)


@given(schedules, inner_times, seeds, shapes)
def test_vector_field_to_score_recovers_conditional_score(name, t0, seed, shape):
    """score_from_vector_field(u_t(x | z), x) = grad log p_t(x | z) at points x on the path."""
    z, eps = tensors(seed, (2, *shape)), tensors(seed + 1, (2, *shape))
    t = torch.full((2,), t0, dtype=torch.float64)
    x = sf.sample_path(z, t, eps, name)
    u = sf.conditional_vector_field(z, t, eps, name)
    assert torch.allclose(
        sf.score_from_vector_field(u, x, t, name),
        sf.conditional_score(x, z, t, name),
        rtol=1e-8,
        atol=1e-8,
    )


@given(schedules, st.floats(0.0, 0.94), seeds, shapes)
def test_data_prediction_maps_to_the_conditional_vector_field(name, t0, seed, shape):
    """velocity_from_data(z, x_t) = d_alpha z + d_beta eps wherever beta_t >= BETA_MIN, so a
    perfect x-prediction is a perfect velocity."""
    z, eps = tensors(seed, (2, *shape)), tensors(seed + 1, (2, *shape))
    t = torch.full((2,), t0, dtype=torch.float64)
    if sf.schedule(name, t)[1][0] < sf.BETA_MIN:
        return
    x = sf.sample_path(z, t, eps, name)
    assert torch.allclose(
        sf.velocity_from_data(z, x, t, name),
        sf.conditional_vector_field(z, t, eps, name),
        atol=1e-9,
    )


@given(schedules, st.floats(0.0, 1.0), seeds, shapes)
def test_data_from_velocity_inverts_velocity_from_data(name, t0, seed, shape):
    """data_from_velocity(velocity_from_data(z_hat, x), x) = z_hat for every t in [0, 1]:
    both use the same clamped coefficients u = a z_hat + b x, and a > 0."""
    z_hat, x = tensors(seed, (2, *shape)), tensors(seed + 1, (2, *shape))
    t = torch.full((2,), t0, dtype=torch.float64)
    u = sf.velocity_from_data(z_hat, x, t, name)
    assert torch.allclose(sf.data_from_velocity(u, x, t, name), z_hat, atol=1e-8)


@given(seeds, st.floats(0.05, 1.0, exclude_max=True))  # b = 1 is plain RGB, checked last
def test_the_flow_colours_are_luminance_and_scaled_chroma(seed, b):
    """y = D R rgb: R orthonormal with the grey axis (1, 1, 1)/sqrt 3 first, D = diag(1, b, b).
    So ||rgb|| = ||(y_L, y_1 / b, y_2 / b)||, a grey pixel has no chroma, alpha is untouched,
    from_flow inverts to_flow, and b = 1 leaves RGB as it is."""
    x = tensors(seed, (2, 8, 4, 4)).float()  # two views
    x[:, 4:7] = x[:, 4:5]  # view 1 is grey
    y = sf.to_flow(x, b).unflatten(1, (2, 4))  # (2, V, 4, 4, 4)
    rgb = x.unflatten(1, (2, 4))[:, :, :3]
    unscaled = torch.cat([y[:, :, :1], y[:, :, 1:3] / b], 2)
    assert torch.allclose(unscaled.norm(dim=2), rgb.norm(dim=2), atol=1e-5)
    assert torch.allclose(y[:, 1, 1:3], torch.zeros(2, 2, 4, 4), atol=1e-6)
    assert torch.allclose(y[:, 1, 0], math.sqrt(3) * x[:, 4], atol=1e-5)
    assert torch.equal(y[:, :, 3], x.unflatten(1, (2, 4))[:, :, 3])
    assert torch.allclose(sf.from_flow(sf.to_flow(x, b), b), x, atol=1e-5)
    assert torch.equal(sf.to_flow(x, 1), x)


@given(schedules, st.floats(0.0, 1.0), seeds, st.floats(1.0, 50.0), st.sampled_from([1, 0.25]))
def test_data_loss_is_the_velocity_loss_with_a_capped_weight(name, t0, seed, cap, b):
    """For x-prediction the training loss ||u(z_hat) - u(z)||^2 over velocities equals
    w(t) ||z_hat - z||^2, and weight_cap replaces w(t) by min(w(t), cap). The path runs in
    the flow's colours y = to_flow(z, b); both losses measure the errors back in RGB."""
    z, z_hat, eps = (tensors(seed + k, (2, 4, 8, 8)).float() for k in range(3))
    t = torch.full((2,), t0)
    y = sf.to_flow(z, b)
    x = sf.sample_path(y, t, eps, name)
    u_gap = sf.velocity_from_data(z_hat, x, t, name) - sf.velocity_from_data(y, x, t, name)
    velocity_loss = sf.from_flow(u_gap, b).pow(2).flatten(1).mean(1)
    uncapped = sf.TrainConfig(schedule=name, weight_cap=0, chroma=b)
    loss = sf.flow_matching_loss(lambda x_t, t_, c: z_hat, z, t, eps, None, uncapped)
    assert torch.allclose(loss, velocity_loss, rtol=1e-4, atol=1e-6)
    recipe = sf.TrainConfig(schedule=name, weight_cap=cap, chroma=b)
    capped = sf.flow_matching_loss(lambda x_t, t_, c: z_hat, z, t, eps, None, recipe)
    x_loss = (sf.from_flow(z_hat, b) - z).pow(2).flatten(1).mean(1)
    assert torch.allclose(capped, torch.minimum(loss, cap * x_loss), rtol=1e-4, atol=1e-6)


@given(schedules, st.floats(0.0, 0.99), seeds)
def test_a_shown_view_is_clean_in_x_t_and_left_out_of_the_loss(name, t0, seed):
    """Training with a view shown (views models): x_t[k] = z[k] for the shown view k, and the
    loss is w(t) ||z_hat - z||^2 averaged over the other views only, whatever the network
    says about view k."""
    z, z_hat, eps = (tensors(seed + k, (3, 8, 4, 4)).float() for k in range(3))  # V = 2
    t = torch.full((3,), t0)
    shown = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4, [0.0] * 8])
    shown = shown[:, :, None, None]  # character 0 shows view 0, 1 view 1, 2 none
    seen = {}

    def model(x_t, t_, c, out=z_hat):
        seen["x_t"] = x_t
        return out

    cfg = sf.TrainConfig(schedule=name, weight_cap=0, chroma=1)  # plain RGB: z is y
    loss = sf.flow_matching_loss(model, z, t, eps, None, cfg, shown)
    x_t = sf.sample_path(z, t, eps, name)
    assert torch.equal(seen["x_t"], torch.where(shown.bool(), z, x_t))
    other = lambda x_t, t_, c: z_hat + 5 * shown  # noqa: E731  differs on shown views only
    assert torch.allclose(sf.flow_matching_loss(other, z, t, eps, None, cfg, shown), loss)
    w = sf.data_coefficients(t, name, t)[0] ** 2
    err = (z_hat - z).pow(2).unflatten(1, (2, 4)).flatten(2).mean(2)  # (3, V)
    expected = w * torch.stack([err[0, 1], err[1, 0], err[2].mean()])
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_shown_views_mark_one_whole_view_for_a_share_of_the_characters():
    """shown_views: each character shows no view or exactly one (all 4 of its channels),
    for about the asked share p of characters, each view equally often."""
    gen = torch.Generator().manual_seed(0)
    shown = sf.shown_views(20000, 4, 0.5, gen, torch.device("cpu"))[:, :, 0, 0]  # (n, 16)
    per_view = shown.unflatten(1, (4, 4))  # (n, V, 4)
    assert set(per_view.sum(2).unique().tolist()) <= {0.0, 4.0}
    assert set(per_view.sum((1, 2)).unique().tolist()) == {0.0, 4.0}
    share = (shown.sum(1) > 0).float().mean().item()
    assert abs(share - 0.5) < 0.02
    by_view = per_view[:, :, 0].mean(0)  # each view about p / V
    assert torch.allclose(by_view, torch.full((4,), 0.125), atol=0.01)


@given(inner_times, st.floats(0.1, 10.0))
def test_time_shift_scales_the_noise_to_signal_ratio(t0, s):
    """shift_time keeps 0 and 1 fixed, is increasing, is the identity for s = 1, and turns the
    linear path's noise-to-signal ratio (1 - t)/t into s (1 - t)/t."""
    t = torch.tensor([0.0, t0, 1.0], dtype=torch.float64)
    shifted = sf.shift_time(t, s)
    assert shifted[0] == 0.0 and shifted[2] == 1.0
    assert torch.allclose((1 - shifted[1]) / shifted[1], s * (1 - t[1]) / t[1], rtol=1e-9)
    assert sf.shift_time(torch.tensor(t0 + 0.01, dtype=torch.float64), s) > shifted[1]
    assert torch.allclose(sf.shift_time(t, 1.0), t)


# -----------------------------------------------------------------------------
# Part 2: samplers against a closed-form Gaussian
#
# If the data are z ~ N(mu, s^2 I), then x_t = alpha z + beta eps is Gaussian
# with mean alpha mu and variance v_t = alpha^2 s^2 + beta^2, and the marginal
# vector field (the flow-matching minimiser) is known exactly:
#     u_t(x) = d_alpha mu + (alpha d_alpha s^2 + beta d_beta) / v_t (x - alpha mu)
# Its flow maps X_0 = xi to exactly X_1 = mu + s xi. The marginal score is
# -(x - alpha mu) / v_t, and the best clean-sprite guess (what a network that
# predicts data learns) is the posterior mean
#     z_hat(x, t) = E[z | x_t = x] = mu + alpha s^2 / v_t (x - alpha mu).
# -----------------------------------------------------------------------------

MU, S = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.5


def gaussian_velocity(name):
    def u(x, t):
        alpha, beta, d_alpha, d_beta = sf.schedule(name, sf.expand(t.double(), x))
        v = alpha**2 * S**2 + beta**2
        return d_alpha * MU + (alpha * d_alpha * S**2 + beta * d_beta) / v * (x - alpha * MU)
    return u


def gaussian_clean(name):
    def z_hat(x, t):
        alpha, beta, _, _ = sf.schedule(name, sf.expand(t.double(), x))
        return MU + alpha * S**2 / (alpha**2 * S**2 + beta**2) * (x - alpha * MU)
    return z_hat


def noise(n=20000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sf.SCHEDULES)
@pytest.mark.parametrize("sampler", ["euler", "heun", "heun on a shifted grid", "sde", "multistep"])
def test_samplers_carry_noise_to_the_gaussian(name, sampler):
    """Driven by the exact marginal field (the multistep solver by the exact guess z_hat),
    each sampler maps N(0, I) to N(mu, s^2 I); Heun also on a shifted time grid (the ODE's
    solution does not depend on the grid)."""
    u, x0 = gaussian_velocity(name), noise()
    if sampler == "euler":
        x1 = sf.sample_euler(u, x0, 200)
    elif sampler == "heun":
        x1 = sf.sample_heun(u, x0, 50)
    elif sampler == "heun on a shifted grid":
        x1 = sf.sample_heun(u, x0, 50, ts=sf.time_grid(50, 3.0))
    elif sampler == "sde":
        x1 = sf.sample_sde(u, x0, 400, name, sigma=1.0, generator=torch.Generator().manual_seed(1))
    else:
        x1 = sf.sample_multistep(gaussian_clean(name), x0, 20, name)
    assert torch.allclose(x1.mean(0), MU, atol=0.02)
    assert torch.allclose(x1.var(0), torch.full((2,), S**2, dtype=torch.float64), rtol=0.06)


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_score_and_guess_from_the_marginal_field_are_the_exact_ones(name):
    """score_from_vector_field turns the exact marginal field u_t(x) into the exact marginal
    score -(x - alpha mu)/v_t (so the SDE needs no second network), and velocity_from_data
    turns the posterior mean z_hat into that same field u_t(x)."""
    u, z_hat, x = gaussian_velocity(name), gaussian_clean(name), noise(100)
    for t0 in (0.1, 0.5, 0.9):
        t = torch.full((100,), t0, dtype=torch.float64)
        alpha, beta, _, _ = sf.schedule(name, sf.expand(t, x))
        true_score = -(x - alpha * MU) / (alpha**2 * S**2 + beta**2)
        assert torch.allclose(
            sf.score_from_vector_field(u(x, t), x, t, name), true_score, atol=1e-10
        )
        assert torch.allclose(sf.velocity_from_data(z_hat(x, t), x, t, name), u(x, t), atol=1e-10)


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_convergence_order_euler_first_heun_second(name):
    """Doubling the steps divides Euler's error by ~2 (order 1) and Heun's by ~4 (order 2),
    measured against the exact endpoint mu + s xi."""
    u, x0 = gaussian_velocity(name), noise(64)
    exact = MU + S * x0

    def err(fn, n):
        return (fn(u, x0, n) - exact).abs().max().item()

    euler_ratio = err(sf.sample_euler, 32) / err(sf.sample_euler, 64)
    heun_ratio = err(sf.sample_heun, 32) / err(sf.sample_heun, 64)
    assert 1.7 < euler_ratio < 2.3
    assert 3.4 < heun_ratio < 4.6


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_multistep_is_exact_for_a_point_mass(name):
    """When the data are one point mu, the guess z_hat = mu never changes, so every step's
    closed form is exact: with N = 1, 2 and 5 calls the solver lands on mu from any noise."""
    x0 = noise(64)
    point = lambda x, t: MU.expand_as(x)  # noqa: E731
    for steps in (1, 2, 5):
        assert torch.allclose(
            sf.sample_multistep(point, x0, steps, name), MU.expand_as(x0), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_multistep_is_second_order_and_beats_heun_20_with_20_calls(name):
    """On the Gaussian the multistep solver makes exactly N calls of z_hat; its error falls
    ~4x when N doubles (128 -> 256 -> 512, where the error is clean of start-up effects on
    the uniform grid: ratios ~3.2-3.8), and with 20 calls it is more accurate than Heun with
    20 steps, 40 calls."""
    x0, calls = noise(64), []
    exact = MU + S * x0

    def counted(x, t):
        calls.append(t)
        return gaussian_clean(name)(x, t)

    def err(steps):
        calls.clear()
        error = (sf.sample_multistep(counted, x0, steps, name) - exact).abs().max().item()
        assert len(calls) == steps == sf.Solver("multistep", steps).calls()
        return error

    e128, e256, e512 = err(128), err(256), err(512)
    assert e128 / e256 > 3 and e256 / e512 > 3
    heun = (sf.sample_heun(gaussian_velocity(name), x0, 20) - exact).abs().max().item()
    assert sf.Solver("heun", 20).calls() == 40 and err(20) < heun


def test_sde_draws_gaussian_noise_once_per_step(monkeypatch):
    """With zero drift (the velocity and its score both 0), Var[X_1] = sum_i sigma_{t_i}^2 h,
    which tends to integral_0^1 sigma_t^2 dt = sigma^2/3 for sigma_t = sigma (1 - t). Noise
    drawn twice per step would double it. One step's increment is Gaussian: kurtosis 3
    (uniform noise has 1.8)."""
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    monkeypatch.setattr(sf, "score_from_vector_field", lambda u, x, t, sched: torch.zeros_like(x))
    n, steps, sigma = 40000, 200, 1.5
    x = sf.sample_sde(zero, torch.zeros(n, 1, dtype=torch.float64), steps, "linear", sigma=sigma,
                      generator=torch.Generator().manual_seed(0))
    riemann = sigma**2 * sum((1 - i / steps) ** 2 for i in range(steps)) / steps
    assert abs(x.var().item() - riemann) / riemann < 0.04
    assert abs(riemann - sigma**2 / 3) / (sigma**2 / 3) < 0.01
    one = sf.sample_sde(zero, torch.zeros(n, 1, dtype=torch.float64), 1, "linear", sigma=1.0,
                        generator=torch.Generator().manual_seed(1))
    kurtosis = ((one - one.mean()) ** 4).mean() / one.var() ** 2
    assert abs(kurtosis.item() - 3.0) < 0.15


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_sde_stays_finite_near_the_data_end(name):
    """Near t = 1 the score of a nearly deterministic target grows like 1/beta; sigma_t =
    sigma beta_t keeps the drift finite even with 2,000 steps and a data spread of 1e-3."""
    global S
    old, S = S, 1e-3
    try:
        x = sf.sample_sde(
            gaussian_velocity(name), noise(500), 2000, name,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        S = old
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), MU, atol=1e-2)


# -----------------------------------------------------------------------------
# Part 3: training helpers, data, network, trainer, command line
# -----------------------------------------------------------------------------


@given(st.floats(0.02, 0.28))
def test_power_ema_gamma_has_the_asked_relative_length(sigma_rel):
    """The weights tau^gamma on [0, 1] have relative standard deviation sigma_rel:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); and sigma_rel = 0.10 gives
    EDM2's gamma = 6.94."""
    gamma = sf.ema_gamma(sigma_rel)
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(sigma_rel**2, rel=1e-9)
    assert sf.ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def test_power_ema_is_the_tau_power_weighted_mean_of_all_steps():
    """After T updates with beta_t = (1 - 1/t)^(gamma + 1) the average equals
    sum_t t^gamma theta_t / sum_t t^gamma to first order, and it equals theta_1 after
    the first update (beta_1 = 0): a power EMA needs no warm-up."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    gamma, thetas = 3.0, torch.linspace(0, 1, 400)
    for t, theta in enumerate(thetas, start=1):
        model.weight.data.fill_(theta)
        sf.ema_update(ema, model, t, gamma)
        if t == 1:
            assert ema.weight.item() == pytest.approx(thetas[0].item())
    weights = torch.arange(1, 401, dtype=torch.float64) ** gamma
    expected = (weights * thetas.double()).sum() / weights.sum()
    assert ema.weight.item() == pytest.approx(expected.item(), abs=5e-3)


@given(st.integers(1, 500), st.floats(1e-5, 1e-2), st.integers(0, 10**6))
def test_lr_warms_up_linearly_then_stays_constant(warmup, base, step):
    """The LR rises linearly over `warmup` steps to base_lr and then stays exactly there,
    whatever the budget: that is what lets --resume extend a run without a jump."""
    assert sf.lr_at(0, base, warmup) == pytest.approx(base / warmup)
    early = min(step, warmup - 1)
    assert sf.lr_at(early, base, warmup) == pytest.approx(base * (early + 1) / warmup)
    assert sf.lr_at(warmup - 1 + step, base, warmup) == base


def test_progress_is_the_larger_share_of_steps_and_minutes():
    """run_progress: steps/max_steps or minutes/max_minutes, whichever is further, capped at 1."""
    cfg = sf.TrainConfig(max_steps=1000, max_minutes=10)
    assert sf.run_progress(100, 60.0, cfg) == pytest.approx(0.1)
    assert sf.run_progress(100, 300.0, cfg) == pytest.approx(0.5)
    assert sf.run_progress(900, 300.0, cfg) == pytest.approx(0.9)
    assert sf.run_progress(5000, 0.0, cfg) == 1.0
    assert sf.run_progress(5000, 300.0, sf.TrainConfig(max_minutes=10)) == pytest.approx(0.5)


def checker_rgba(w=32, h=32, block=4, seed=0):
    """A small RGBA image of solid blocks with some fully transparent ones."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (h // block, w // block, 4)).astype(np.uint8)
    cells[..., 3] = np.where(cells[..., 3] > 100, 255, 0)
    return cells.repeat(block, 0).repeat(block, 1)


def test_loader_handles_every_mode_and_format(tmp_path):
    """P with a transparency key, LA, L, RGB and RGBA, as PNG, GIF, WebP and BMP, all load as
    (128, 128, 4) uint8 with the right colours; the key colour becomes alpha 0."""
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 255, 0, 200, 30, 40] + [0] * 762)
    pal.paste(1, (8, 8, 24, 24))
    pal.save(tmp_path / "pal.png", transparency=0)
    pal.save(tmp_path / "pal.gif", transparency=0)
    Image.new("LA", (32, 32), (90, 255)).save(tmp_path / "la.png")
    Image.new("L", (32, 32), 77).save(tmp_path / "l.bmp")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "rgb.webp", lossless=True)
    Image.fromarray(checker_rgba()).save(tmp_path / "rgba.png")
    for name in ["pal.png", "pal.gif"]:
        arr = sf.load_rgba(tmp_path / name)
        assert arr.shape == (128, 128, 4) and arr.dtype == np.uint8
        assert (arr[0, 0] == 0).all()  # key colour -> transparent, and RGB zeroed
        assert arr[64, 64].tolist() == [200, 30, 40, 255]
    assert sf.load_rgba(tmp_path / "la.png")[5, 5].tolist() == [90, 90, 90, 255]
    assert sf.load_rgba(tmp_path / "l.bmp")[5, 5].tolist() == [77, 77, 77, 255]
    assert sf.load_rgba(tmp_path / "rgb.webp")[5, 5].tolist() == [1, 2, 3, 255]
    rgba = sf.load_rgba(tmp_path / "rgba.png")
    assert np.array_equal(
        rgba,
        checker_rgba().repeat(4, 0).repeat(4, 1)
        * (checker_rgba()[..., 3:] > 0).repeat(4, 0).repeat(4, 1),
    )


def test_loader_pads_to_square_resizes_nearest_and_clears_hidden_colour(tmp_path):
    """A 64x32 image is padded (transparent, centred) to 64x64 and scaled x2 by nearest
    neighbour: no new colours appear, and pixels with alpha 0 carry RGB 0."""
    img = checker_rgba(64, 32, block=4, seed=3)
    img[img[..., 3] == 0, :3] = 123  # junk colour under transparency
    Image.fromarray(img).save(tmp_path / "wide.png")
    arr = sf.load_rgba(tmp_path / "wide.png")
    assert arr.shape == (128, 128, 4)
    assert (arr[:32] == 0).all() and (arr[96:] == 0).all()  # 16 px padding above and below, x2
    middle = arr[32:96]
    expected = img.repeat(2, 0).repeat(2, 1).copy()
    expected[expected[..., 3] == 0] = 0
    assert np.array_equal(middle, expected)
    assert (arr[arr[..., 3] == 0, :3] == 0).all()


def test_loader_puts_18x20_art_on_a_whole_number_grid(tmp_path):
    """An 18x20 sprite is padded to 32x32, the smallest side that divides 128, and scaled
    by exactly 4: every art pixel becomes one 4x4 block, so detect_grid finds 4."""
    rng = np.random.default_rng(0)
    arts = []
    for i in range(4):
        art = rng.integers(0, 256, (20, 18, 4), dtype=np.uint8)  # (H, W, 4): 18 wide, 20 tall
        art[..., 3] = np.where(art[..., 3] > 60, 255, 0)
        Image.fromarray(art).save(tmp_path / f"a{i}.png")
        arts.append(art)
    x, names, _, _ = sf.load_folder(tmp_path)
    canvas = np.zeros((32, 32, 4), dtype=np.uint8)
    canvas[6:26, 7:25] = arts[0]  # centred: (32 - 20) / 2 rows, (32 - 18) / 2 columns
    canvas[canvas[..., 3] == 0] = 0
    expected = canvas.repeat(4, 0).repeat(4, 1)
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), expected)
    assert sf.detect_grid(x, names) == 4


def write_sprites(folder, n=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(checker_rgba(32, 32, 4, seed + i)).save(folder / f"s{i}.png")
    return folder


def test_loader_skips_unreadable_file_with_one_warning(tmp_path):
    """A broken file among good ones is skipped with a warning that names it."""
    write_sprites(tmp_path / "d", 3)
    (tmp_path / "d" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "d" / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match="broken.png"):
        x, names, classes, y = sf.load_folder(tmp_path / "d")
    assert x.shape == (3, 4, 128, 128) and x.dtype == torch.uint8 and len(names) == 3


def test_loader_rejects_missing_empty_and_all_broken_folders(tmp_path):
    """Missing, empty and all-unreadable folders raise UserError with a clear sentence."""
    with pytest.raises(sf.UserError, match="does not exist"):
        sf.load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sf.UserError, match="no PNG"):
        sf.load_folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(sf.UserError, match="could be read"):
            sf.load_folder(tmp_path / "bad")


def test_split_is_deterministic_disjoint_and_stable():
    """The split depends on file names only: it is disjoint, holds out about the asked share,
    and adding files never moves an old file to the other side."""
    names = [f"sprite_{i:04d}.png" for i in range(400)]
    train, val = sf.split_train_val(names, 0.1)
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 400
    assert 20 <= len(val) <= 60
    assert torch.equal(val, sf.split_train_val(names, 0.1)[1])
    more = [f"extra_{i}.png" for i in range(50)] + names  # new files sort first: indices shift
    train2, val2 = sf.split_train_val(more, 0.1)
    assert {names[i] for i in val.tolist()} == {more[i] for i in val2.tolist()} & set(names)
    assert len(sf.split_train_val(names[:2], 0.1)[1]) == 1


def test_split_is_stratified_and_a_class_keeps_its_only_sprite(tmp_path):
    """Classes human 8, robot 1, slime 8: whatever the share held out, robot's one sprite is
    trained on, even when its name hashes lowest of all (the sprite a tiny folder would hold
    out), and every class keeps a training sprite; training then warns about the thin class."""
    crc = lambda name: zlib.crc32(name.encode()) / 2**32  # noqa: E731 (the split's own hash)
    robot = min((f"robot/r{i}.png" for i in range(100)), key=crc)
    names = sorted(
        [f"human/h{i}.png" for i in range(8)] + [robot] + [f"slime/s{i}.png" for i in range(8)]
    )
    assert crc(robot) == min(map(crc, names))
    y = torch.tensor([["human", "robot", "slime"].index(n.split("/")[0]) for n in names])
    for fraction in (1e-9, 0.05, 0.3, 0.99):
        train, val = sf.split_train_val(names, fraction, y)
        assert names.index(robot) in train.tolist() and set(train.tolist()).isdisjoint(val.tolist())
        assert sorted(set(y[train].tolist())) == [0, 1, 2]
    assert len(sf.split_train_val(names, 1e-9, y)[1]) == 1  # a tiny share still holds out one
    for seed, (cls, n) in enumerate((("human", 8), ("robot", 1), ("slime", 8))):
        write_sprites(tmp_path / "d" / cls, n, seed=10 * seed)
    with pytest.warns(UserWarning, match=r"few training sprites in class .*robot \(1\)"):
        run = sf.train(tiny_config(tmp_path / "d", tmp_path / "r", max_steps=1))
    assert sf.read_checkpoint(run / "last.pt")["class_counts"][1] == 1


def test_detect_grid_ignores_a_stray_image_and_names_it():
    """18 sprites drawn on a 4-pixel grid and one photo-like noise image: the grid is still 4,
    and a warning names the image that is off it."""
    rng = np.random.default_rng(0)
    cells = torch.from_numpy(rng.integers(0, 256, (18, 4, 32, 32), dtype=np.uint8))
    art = cells.repeat_interleave(4, 2).repeat_interleave(4, 3)  # (18, 4, 128, 128)
    stray = torch.from_numpy(rng.integers(0, 256, (1, 4, 128, 128), dtype=np.uint8))
    names = [f"s{i:02d}.png" for i in range(18)] + ["photo.png"]
    assert sf.own_grid(torch.cat([art, stray])).tolist() == [4] * 18 + [1]
    with pytest.warns(
        UserWarning, match=r"1 of 19 images are not drawn on the 4-pixel grid .*photo\.png"
    ):
        assert sf.detect_grid(torch.cat([art, stray]), names) == 4


def tiny_unet(unshuffle=4, target="data"):
    torch.manual_seed(0)
    return sf.UNet(channels=(16, 32), blocks=1, unshuffle=unshuffle, target=target)


@pytest.mark.parametrize("unshuffle", [1, 2, 4])
def test_unet_shape_zero_init_and_time_dependence(unshuffle):
    """Output has the input's shape (B, 4, 128, 128); the zero-initialised head outputs exactly
    0; once the zero-initialised layers are perturbed (as training does), changing t changes
    the output."""
    model = tiny_unet(unshuffle).eval()
    x = torch.randn(1, 4, 128, 128)
    with torch.no_grad():
        out = model(x, torch.full((1,), 0.3))
        assert out.shape == x.shape and (out == 0).all()
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        a, b = model(x, torch.full((1,), 0.3)), model(x, torch.full((1,), 0.7))
    assert (a - b).abs().max() > 1e-4


def test_unet_has_no_batchnorm_and_samples_do_not_see_each_other():
    """GroupNorm only, with 8 groups (fewer where a width has no 8-way split): a sprite's
    output does not depend on the rest of its batch."""
    model = tiny_unet()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert {g.num_groups for g in model.modules() if isinstance(g, torch.nn.GroupNorm)} == {8}
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(3, 4, 128, 128), torch.rand(3)
    with torch.no_grad():
        assert torch.allclose(model(x, t)[:1], model(x[:1], t[:1]), atol=1e-5)


@pytest.mark.parametrize("target", sf.TARGETS)
def test_unet_guess_and_velocity_agree(target):
    """UNet.clean and UNet.velocity describe one field: u = a z_hat + b x with the
    coefficients of section 3, whichever target the network predicts."""
    model = tiny_unet(target=target)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 128, 128), torch.tensor([0.2, 0.97])
    with torch.no_grad():
        z_hat, u = model.clean(x, t), model.velocity(x, t)
    assert torch.allclose(sf.velocity_from_data(z_hat, x, t, model.schedule), u, atol=1e-4)
    assert not torch.allclose(z_hat, u, atol=1e-3)


def test_tiny_model_overfits_a_handful_of_sprites():
    """A small U-Net trained on 4 sprites drives the flow-matching loss, at fixed (t, eps),
    far below its starting value."""
    z = sf.to_float(
        torch.from_numpy(
            np.stack([checker_rgba(32, 32, 4, s).repeat(4, 0).repeat(4, 1) for s in range(4)])
        ).permute(0, 3, 1, 2)
    )
    model = tiny_unet(target="data")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t_fix, eps_fix = torch.rand(32, generator=g) * 0.9, torch.randn(32, 4, 128, 128, generator=g)
    z_fix = z.repeat(8, 1, 1, 1)
    uncapped = sf.TrainConfig(weight_cap=0)

    def fixed_loss():
        with torch.no_grad():
            return (
                sf.flow_matching_loss(model, z_fix, t_fix, eps_fix, None, uncapped)
                .mean()
                .item()
            )

    start = fixed_loss()
    for _ in range(80):
        t, eps = torch.rand(8, generator=g), torch.randn(8, 4, 128, 128, generator=g)
        loss = sf.flow_matching_loss(model, z.repeat(2, 1, 1, 1), t, eps, None, uncapped).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.2 * start


def tiny_config(data, run_dir, **kw):
    base = dict(
        data=str(data), run_dir=str(run_dir), max_steps=6, batch_size=4, channels="16,32",
        blocks=1, log_every=2, val_every=3, sample_every=6, sample_steps=2, warmup=2,
        bf16=False,  # no probe: runs compare bit for bit
    )
    base.update(kw)
    return sf.TrainConfig(**base)


def assert_same_training_state(a, b):
    """Two checkpoints hold bit-identical weights, EMA and AdamW moments."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for i, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], b["optimizer"]["state"][i][name]), (i, name)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Stop at step 3, resume to step 6: model, EMA, guide and optimizer state equal those of
    a run that went straight to step 6 (RNG, LR schedule and step count are all restored)."""
    data = write_sprites(tmp_path / "d", 6)
    # the guide snapshot at step 4
    straight = sf.train(tiny_config(data, tmp_path / "a", guide_fraction=0.5))
    assert (
        sf.train(tiny_config(data, tmp_path / "b", guide_fraction=0.5), stop_after=3)
        == tmp_path / "b"
    )
    assert (tmp_path / "b" / "lock").exists() and not list((tmp_path / "b").glob("*.tmp"))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    # the budget and recipe come from the checkpoint
    resumed = sf.train(tiny_config(data, tmp_path / "b", resume=True))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert_same_training_state(a, b)
    assert all(torch.equal(a["guide"][name], b["guide"][name]) for name in a["guide"])
    rows = (tmp_path / "b" / "training_log.csv").read_text().strip().splitlines()
    assert (
        rows[0].startswith("step,epoch,loss,lr,grad_norm,img_per_s,val_loss,loss_t0")
        and rows[0].endswith(",minutes,skipped")
    )
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "6"]


def test_a_longer_budget_on_resume_continues_the_same_lr_schedule(tmp_path):
    """Without a cool-down (--cooldown 0), a 6-step run resumed with --max-steps 12 ends bit for
    bit where a straight 12-step run ends (weights, EMA, AdamW moments): the LR depends on the
    step alone, never on the budget, so extending a run changes nothing that came before. (The
    autoguidance snapshot is taken at a share of the budget, so it is switched off here.)"""
    data = write_sprites(tmp_path / "d", 6)
    cfg = dict(warmup=4, guide="off", cooldown=0)
    straight = sf.train(tiny_config(data, tmp_path / "a", max_steps=12, **cfg))
    sf.train(tiny_config(data, tmp_path / "b", max_steps=6, **cfg))
    resumed = sf.train(tiny_config(data, tmp_path / "b", resume=True, max_steps=12))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    assert_same_training_state(a, b)
    rows = list(csv.DictReader(open(resumed / "training_log.csv")))
    # each row's LR is that of its last step, step - 1 counted from 0
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == [pytest.approx(sf.lr_at(int(r["step"]) - 1, 1e-3, 4)) for r in rows]
    assert lrs[:3] == [5e-4, 7.5e-4, 1e-3] and set(lrs[2:]) == {1e-3}  # warm-up, then constant


def test_a_cooled_run_extends_from_its_state_before_the_cool_down(tmp_path):
    """With --cooldown 0.5 the LR of a 6-step run falls linearly from progress 0.5 to 0 at
    progress 1 (steps 4 and 5, counted from 0, at 2/3 and 1/3 of it), and the state before
    step 4, the first lowered step, is kept as stable.pt. Resumed with --max-steps 12 the run
    continues from stable.pt, not from its cooled last.pt, and ends bit for bit where a
    straight 12-step run ends: extension stays exact with a cool-down too."""
    data = write_sprites(tmp_path / "d", 6)
    cfg = dict(warmup=2, guide="off", cooldown=0.5)
    straight = sf.train(tiny_config(data, tmp_path / "a", max_steps=12, **cfg))
    first = sf.train(tiny_config(data, tmp_path / "b", max_steps=6, **cfg))
    assert torch.load(first / "stable.pt", weights_only=True)["step"] == 4
    rows = list(csv.DictReader(open(first / "training_log.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3 / 3], rel=1e-3)
    resumed = sf.train(tiny_config(data, tmp_path / "b", resume=True, max_steps=12))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    assert_same_training_state(a, b)
    assert torch.load(resumed / "stable.pt", weights_only=True)["step"] == 7
    rows = list(csv.DictReader(open(resumed / "training_log.csv")))
    lrs = [float(r["lr"]) for r in rows]
    expected = [sf.lr_at(int(r["step"]) - 1, 1e-3, 2, (int(r["step"]) - 1) / 12, 0.5)
                for r in rows]
    assert lrs == pytest.approx(expected, rel=1e-3) and lrs[-1] == pytest.approx(1e-3 / 6, rel=1e-3)


def test_a_run_stopped_in_its_cool_down_resumes_where_it_stopped(tmp_path):
    """Stopped at step 5, inside the cool-down, and resumed with the same budget, a run goes
    on from last.pt (not from stable.pt) and ends bit for bit like the uninterrupted run."""
    data = write_sprites(tmp_path / "d", 6)
    cfg = dict(warmup=2, guide="off", cooldown=0.5)
    straight = sf.train(tiny_config(data, tmp_path / "a", **cfg))
    sf.train(tiny_config(data, tmp_path / "b", **cfg), stop_after=5)
    resumed = sf.train(tiny_config(data, tmp_path / "b", resume=True))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert_same_training_state(a, b)


@given(st.floats(0.01, 0.99), st.floats(0, 1))
def test_the_cool_down_falls_linearly_to_zero_at_the_end_of_the_budget(f, progress):
    """lr = base * min(1, (1 - progress) / f): the full LR until progress 1 - f, then a
    straight line to 0 at progress 1, never above the base LR."""
    lr = sf.lr_at(10**6, 1.0, 1, progress, f)
    assert 0 <= lr <= 1
    if progress <= 1 - f:
        assert lr == 1
    else:
        assert lr == pytest.approx((1 - progress) / f)
    assert sf.lr_at(10**6, 1.0, 1, 1.0, f) == 0


def test_progress_eta_uses_this_sessions_pace_and_the_time_limit():
    """A resumed run at step 1,100 that took 60 s for its own 100 steps (0.01 min/step) has
    900 steps, 9 minutes, left, not the 0.8 minutes that dividing by all 1,100 steps would
    claim; a 3-minute budget with 1 minute used caps the estimate at the 2 minutes left."""
    assert sf.progress_text(1100, 1.0, 0.01, sf.TrainConfig(max_steps=2000)).endswith("eta 9 min)")
    assert sf.progress_text(
        1100, 1.0, 0.01, sf.TrainConfig(max_steps=2000, max_minutes=3)
    ).endswith("eta 2 min)")


def test_seed_makes_runs_reproducible_and_checkpoints_load_safely(tmp_path):
    """Two runs with one seed give identical weights; checkpoints load with weights_only=True
    and hold model, EMA (one state dict), optimizer, step, RNG state and config."""
    data = write_sprites(tmp_path / "d", 5)
    a = torch.load(
        sf.train(tiny_config(data, tmp_path / "a", max_steps=3)) / "last.pt", weights_only=True
    )
    b = torch.load(
        sf.train(tiny_config(data, tmp_path / "b", max_steps=3)) / "last.pt", weights_only=True
    )
    assert set(a) >= {
        "model", "ema", "optimizer", "step", "rng", "config", "best_val", "seconds", "grid",
        "fingerprint",
    }
    assert a["ema"].keys() == a["model"].keys()
    assert_same_training_state(a, b)
    assert (
        (tmp_path / "a" / "best.pt").exists()
        and list((tmp_path / "a" / "samples").glob("*.png")) == []
    )


def test_a_failed_checkpoint_write_ends_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk while step 6's last.pt is written (torch.save says "unexpected pos" there):
    the run ends with one sentence, no half-written *.tmp is left, and step 3's last.pt,
    written before, still loads."""
    data = write_sprites(tmp_path / "d", 4)
    real_save, writes = torch.save, []

    def save(obj, f, *args, **kw):
        writes.append(Path(f).name)
        if len(writes) == 3:  # after step 3's last.pt and best.pt
            Path(f).write_bytes(b"the first bytes of a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(sf.UserError) as e:
        sf.train(tiny_config(data, tmp_path / "r", cooldown=0))  # no stable.pt among the writes
    assert writes == ["last.pt.tmp", "best.pt.tmp", "last.pt.tmp"]
    assert str(e.value) == (
        f"cannot write checkpoint '{tmp_path / 'r' / 'last.pt'}' (the disk may be full); "
        "the previous checkpoint, if any, is unchanged"
    )
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert sf.read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 3


def test_a_run_keeps_its_flow_colours_and_older_runs_sample_in_rgb(tmp_path):
    """A run trained with --chroma 0.25 samples in those colours; a config without `chroma`
    (written before the flow had its own colours) trained in plain RGB and loads with b = 1."""
    data = write_sprites(tmp_path / "d", 4)
    run = sf.train(tiny_config(data, tmp_path / "r", max_steps=1, chroma=0.25))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert sf.load_models(run / "last.pt")[0].chroma == 0.25 == ckpt["config"]["chroma"]
    del ckpt["config"]["chroma"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert sf.load_models(tmp_path / "old.pt")[0].chroma == 1.0


def test_resume_takes_best_pt_when_it_is_all_that_is_left(tmp_path, capsys):
    """With last.pt gone and only best.pt left, --resume continues from best.pt and says so."""
    data = write_sprites(tmp_path / "d", 4)
    run = sf.train(tiny_config(data, tmp_path / "r", max_steps=3))
    (run / "last.pt").unlink()
    capsys.readouterr()
    sf.train(tiny_config(data, run, resume=True))
    assert (
        "resuming from best.pt (step 3), the newest complete checkpoint"
        in capsys.readouterr().err
    )
    assert sf.read_checkpoint(run / "last.pt")["step"] == 6


def run_cli(*args, cwd, timeout=120, **kw):
    env = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "spriteflow.py"), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def run_main(monkeypatch, capsys, *args):
    """spriteflow.main in this process, which is quicker than a subprocess: (status, stdout,
    stderr)."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    capsys.readouterr()
    status = sf.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_trains_then_samples_and_plots_the_log(tmp_path):
    """`train` writes a log, its plot training_log.png, a sample grid and checkpoints; `sample`
    with no checkpoint option finds the newest under runs/ and writes 128x128 RGBA sprites, a
    sheet and a trajectory, and names them all."""
    write_sprites(tmp_path / "imgs", 6)
    r = run_cli(
        "train", "--data", "imgs", "--max-steps", "4", "--batch-size", "2", "--channels", "16,32",
        "--blocks", "1", "--log-every", "2", "--val-every", "2", "--sample-every", "4",
        "--sample-steps", "2", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    run = next((tmp_path / "runs").iterdir())
    assert {"last.pt", "best.pt", "training_log.csv", "training_log.png", "samples"} <= {
        p.name for p in run.iterdir()
    }
    with Image.open(run / "training_log.png") as im:
        assert im.size == (900, 560)
    assert (run / "samples" / "step_0000004.png").exists() and "step 4 " in r.stderr
    r = run_cli("sample", "--n", "3", "--steps", "2", "--out", "out", "--trajectory", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        "wrote 3 sprites, grid.png, sheet.png, sheet.json, trajectory.gif, trajectory.png"
        " (multistep, 2 steps"
    )
    sprites = sorted((tmp_path / "out").glob("sprite_*.png"))
    assert len(sprites) == 3
    with Image.open(sprites[0]) as im:
        assert im.size == (128, 128) and im.mode == "RGBA"
        assert set(np.unique(np.array(im)[..., 3])) <= {0, 255}
    assert {"grid.png", "sheet.png", "sheet.json", "trajectory.gif", "trajectory.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }


def test_pixel_art_stats_count_flat_blocks_and_colours():
    """Two flat colour halves on an 8x8 grid of 4-px blocks: 104 of 112 neighbouring pairs
    match and there are 2 colours; transparent blocks are ignored; speckle scores low."""
    img = torch.zeros(1, 32, 32, 4, dtype=torch.uint8)
    img[..., 3] = 255
    img[:, :, :16, :3], img[:, :, 16:, :3] = 40, 140
    assert fid.pixel_art_stats(img) == {"flatness": round(104 / 112, 3), "colours": 2.0}
    img[:, :4, :, 3] = 0  # a transparent top row of blocks changes nothing but the counts
    assert fid.pixel_art_stats(img) == {"flatness": round(90 / 97, 3), "colours": 2.0}
    speckle = torch.randint(
        0, 256, (1, 8, 8, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    speckle[..., 3] = 255
    assert (
        fid.pixel_art_stats(speckle.repeat_interleave(4, 1).repeat_interleave(4, 2))["flatness"]
        < 0.2
    )


def test_bench_ends_with_one_json_line(monkeypatch, capsys):
    """`spriteflow.py bench` times the default model, its sampling and its full-resolution
    twin; the last line of its output is one JSON object with the keys the README documents
    (no speed is asserted). It runs in this process on fp32 alone: the bf16 pass is the same
    code with autocast on."""
    monkeypatch.setattr(sf, "cpu_has_bf16", lambda: False)
    status, out, err = run_main(
        monkeypatch, capsys, "bench", "--steps", "1", "--batch-size", "2", "--device", "cpu"
    )
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    speeds = {
        "train_img_s_fp32",
        f"sample_img_s_fp32_{sf.DEFAULT_SAMPLER}{sf.DEFAULT_STEPS}",  # the default solver
        "sample_img_s_fp32_heun20",
        "full_res_train_img_s",
    }
    assert (
        speeds | {"machine", "device", "threads", "peak_mem_mb", "bf16_chosen", "bf16_why"}
        <= result.keys()
    )
    assert result["device"] == "cpu" and min(result[k] for k in speeds) > 0
    assert result["bf16_chosen"] is False and "train_img_s_bf16" not in result
    assert "fp32:" in err and "full resolution" in err


@pytest.mark.parametrize(
    "case",
    [
        "missing folder", "empty folder", "missing checkpoint", "corrupt checkpoint",
        "checkpoint is a folder", "no runs", "bad value", "bad sample value", "bad choice",
        "unknown flag", "existing run", "one frame", "removed flag",
    ],
)
def test_bad_input_is_one_clear_sentence(tmp_path, monkeypatch, capsys, case):
    """Each bad input ends with exit 2 and a one-line message, never a traceback; an
    existing run's checkpoint is left untouched. (In this process, for speed: the signal tests
    check the exit status of a real process.)"""
    (tmp_path / "empty").mkdir()
    write_sprites(tmp_path / "imgs", 2)
    (tmp_path / "bad.pt").write_bytes(b"\x00 not a checkpoint")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"precious")
    args = {
        "missing folder": ["train", "--data", "nope"],
        "empty folder": ["train", "--data", "empty"],
        "missing checkpoint": ["sample", "--checkpoint", "gone.pt"],
        "corrupt checkpoint": ["sample", "--checkpoint", "bad.pt"],
        "checkpoint is a folder": ["sample", "--checkpoint", "run"],
        "no runs": ["sample"],
        "bad value": ["train", "--data", "imgs", "--lr", "-1"],
        "bad sample value": ["sample", "--checkpoint", "bad.pt", "--steps", "0"],
        "bad choice": ["sample", "--checkpoint", "bad.pt", "--sampler", "rk4"],
        "unknown flag": ["train", "--wat"],
        "existing run": ["train", "--data", "imgs", "--run-dir", "run"],
        "one frame": ["interpolate", "1", "2", "--checkpoint", "bad.pt", "--frames", "1"],
        "removed flag": ["sample", "--checkpoint", "bad.pt", "--ema", "0.05"],
    }[case]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line
        try:
            status, _, err = run_main(monkeypatch, capsys, *args)
        except SystemExit as e:  # argparse's own errors end the process
            status, err = e.code, capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err and err.strip()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert case != "checkpoint is a folder" or "is a folder" in err
    assert case != "one frame" or "--frames must be at least 2" in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"precious"


def test_corrupt_checkpoint_on_resume_is_refused_and_kept(tmp_path):
    """--resume on a corrupt last.pt stops with a message and does not overwrite the file."""
    data = write_sprites(tmp_path / "d", 3)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pt").write_bytes(b"half-written")
    with pytest.raises(sf.UserError, match="corrupt"):
        sf.train(tiny_config(data, tmp_path / "r", resume=True))
    assert (tmp_path / "r" / "last.pt").read_bytes() == b"half-written"


def train_in_background(tmp_path, *extra):
    """A CLI training run in a subprocess, read until its third step is logged."""
    write_sprites(tmp_path / "imgs", 4)
    proc = subprocess.Popen(
        [
            sys.executable, str(ROOT / "spriteflow.py"), "train", "--data", "imgs",
            "--run-dir", "r", "--batch-size", "2", "--channels", "16,32", "--blocks", "1",
            "--log-every", "1", "--val-every", "100000", "--sample-every", "100000",
            "--no-bf16", *extra,
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step 3 "):
            break
    return proc, "".join(lines)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_its_number(tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM (schedulers, `timeout`) during training saves last.pt and
    exits with 128 + the signal's number, 130 or 143, as a shell does, with no traceback; with
    no budget given the run announces the default 30 minutes."""
    proc, head = train_in_background(tmp_path)
    assert "budget 30 min" in head, head
    proc.send_signal(signum)
    rest = proc.communicate(timeout=120)[1]
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, rest
    assert (
        "interrupted at step" in rest
        and f"stopped by {name}; saved" in rest
        and "Traceback" not in rest
    )
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] >= 3


def test_a_signal_during_start_up_ends_there_and_leaves_no_run_folder(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM while the run is still starting (here: as the model is being wrapped, the last
    step before training) stops it in one line with exit 143, and the run folder it had made
    is removed again, since nothing was written to it."""
    data = write_sprites(tmp_path / "imgs", 2)
    real_wrap = sf.wrap

    def wrap_then_sigterm(*args):
        # the handler, as the OS would call it
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        return real_wrap(*args)

    monkeypatch.setattr(sf, "wrap", wrap_then_sigterm)
    status, _, err = run_main(
        monkeypatch, capsys, "train", "--data", data, "--run-dir", tmp_path / "r",
        "--channels", "16,32", "--blocks", "1", "--max-steps", "2", "--no-bf16",
    )
    assert status == 143 and err.strip() == "stopped by SIGTERM; nothing was written"
    assert not (tmp_path / "r").exists()
    with pytest.raises(sf.Interrupted) as e:
        sf.train(tiny_config(data, tmp_path / "r2"))
    assert e.value.signum == signal.SIGTERM and not (tmp_path / "r2").exists()


def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    """DDP over gloo: 2 processes each train on their own shard; gradients are averaged, so
    both end with identical weights (checked in-process by an all-reduce max == min)."""
    write_sprites(tmp_path / "imgs", 8)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "spriteflow.py"), "train", "--data", "imgs", "--run-dir", "r",
            "--max-steps", "3", "--batch-size", "2", "--channels", "16,32", "--blocks", "1",
            "--log-every", "1", "--val-every", "3", "--sample-every", "100",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights identical across 2 processes" in r.stderr
    assert "x2" in r.stderr and (tmp_path / "r" / "last.pt").exists()
    # rank 0 alone logs
    assert len((tmp_path / "r" / "training_log.csv").read_text().strip().splitlines()) == 4


def test_generate_is_seeded_and_binary_alpha():
    """generate() returns uint8 (N, 128, 128, 4) with alpha in {0, 255}, RGB 0 where
    transparent, and the same sprites for the same noise, for every solver."""
    model = tiny_unet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for sampler in sf.SAMPLERS:
        solver = sf.Solver(sampler, steps=2, seed=5)
        a = sf.generate(model, sf.gaussian_noise(3, 5), solver=solver)
        b = sf.generate(model, sf.gaussian_noise(3, 5), solver=solver)
        assert a.shape == (3, 128, 128, 4) and a.dtype == torch.uint8 and torch.equal(a, b)
        assert set(a[..., 3].unique().tolist()) <= {0, 255}
        assert (a[..., :3][a[..., 3] == 0] == 0).all()


def test_generate_returns_rgb_sprites_whatever_colours_the_flow_works_in(monkeypatch):
    """A model in the flow's colours (b = 0.25) whose guess is always y = to_flow(z, b): the
    multistep solver lands on y exactly at t = 1 (it holds the guess's line), and generate
    hands back z in RGB, not y."""
    model = sf.UNet((16, 32), 1, 4, chroma=0.25)
    sprite = torch.zeros(1, 4, 128, 128, dtype=torch.uint8)
    sprite[:, :, 32:96, 32:96] = torch.tensor([200, 100, 30, 255])[:, None, None]  # orange
    z = sf.to_float(sprite)  # (1, 4, 128, 128): an orange block, transparent around it
    monkeypatch.setattr(model, "clean", lambda x, t, c=None: sf.to_flow(z, 0.25).expand_as(x))
    sprites = sf.generate(model, sf.gaussian_noise(2, 0), solver=sf.Solver("multistep", 3))
    assert torch.equal(sprites, sf.to_uint8(z).expand(2, -1, -1, -1))


def test_sheet_json_is_texture_packer_json_array(tmp_path):
    """sheet.json is exactly TexturePacker's JSON-array layout (as Phaser, PixiJS and Aseprite
    read it), plus each frame's class: compared with a hand-written file for two sprites of
    one class; sheet.png has the size its meta says."""
    sprites = torch.zeros(2, 128, 128, 4, dtype=torch.uint8)
    sprites[1, 32:96, 32:96] = 255
    sf.write_sprites(tmp_path, sprites, names=["slime", "slime"])
    expected = json.loads("""{
      "frames": [
        {"filename": "sprite_000.png", "frame": {"x": 0, "y": 0, "w": 128, "h": 128},
         "rotated": false, "trimmed": false,
         "spriteSourceSize": {"x": 0, "y": 0, "w": 128, "h": 128},
         "sourceSize": {"w": 128, "h": 128}, "class": "slime"},
        {"filename": "sprite_001.png", "frame": {"x": 128, "y": 0, "w": 128, "h": 128},
         "rotated": false, "trimmed": false,
         "spriteSourceSize": {"x": 0, "y": 0, "w": 128, "h": 128},
         "sourceSize": {"w": 128, "h": 128}, "class": "slime"}
      ],
      "meta": {"app": "SpriteFlow", "version": "1.0", "image": "sheet.png", "format": "RGBA8888",
               "size": {"w": 256, "h": 128}, "scale": "1"}
    }""")
    assert json.loads((tmp_path / "sheet.json").read_text()) == expected
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size == (256, 128) and im.mode == "RGBA"
        assert np.array_equal(np.array(im)[:, 128:], sprites[1].numpy())


# -----------------------------------------------------------------------------
# Part 3b: the pixel grid, classes and guidance, budgets and bf16
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_detect_grid_finds_the_block_size_of_the_art(k):
    """Art drawn at k x k blocks is detected as grid k (1 for art with no blocks at all)."""
    rng = np.random.default_rng(k)
    cells = torch.from_numpy(rng.integers(0, 256, (6, 4, 128 // k, 128 // k), dtype=np.uint8))
    x = cells.repeat_interleave(k, 2).repeat_interleave(k, 3)  # (6, 4, 128, 128)
    assert sf.detect_grid(x) == k


def test_snapped_samples_are_exactly_block_constant():
    """snap_to_grid: every k x k block of the uint8 result is one colour, alpha is decided
    per block, and an already block-constant image passes through unchanged."""
    x = torch.randn(3, 4, 128, 128, generator=torch.Generator().manual_seed(0)) * 0.5
    for k in (2, 4, 8):
        img = sf.to_uint8(sf.snap_to_grid(x, k)).permute(0, 3, 1, 2)  # (3, 4, 128, 128)
        assert sf.detect_grid(img, share=1.0) >= k
    blocky = sf.to_float(sf.to_uint8(sf.snap_to_grid(x, 4)).permute(0, 3, 1, 2))
    assert torch.equal(sf.to_uint8(sf.snap_to_grid(blocky, 4)), sf.to_uint8(blocky))


def test_classes_come_from_subfolders_and_flat_folders_have_none(tmp_path):
    """Images in <folder>/<class>/ are labelled by the class folder's name (sorted); a flat
    folder, or a mix of loose and foldered images (with a warning), has no classes."""
    write_sprites(tmp_path / "d" / "slime", 2)
    write_sprites(tmp_path / "d" / "knight", 3, seed=5)
    x, names, classes, y = sf.load_folder(tmp_path / "d")
    assert (
        classes == ["knight", "slime"]
        and y.tolist() == [0, 0, 0, 1, 1]
        and names[0].startswith("knight/")
    )
    assert sf.load_folder(tmp_path / "d", labels=False)[2] == []
    write_sprites(tmp_path / "d", 1, seed=9)
    with pytest.warns(UserWarning, match="outside the class folders"):
        assert sf.load_folder(tmp_path / "d")[3] is None


def test_label_dropout_rate_matches_p():
    """drop_labels replaces each label by the "no class" index with probability p."""
    c = torch.zeros(200_000, dtype=torch.long)
    dropped = (
        (sf.drop_labels(c, 0.1, 7, torch.Generator().manual_seed(0)) == 7).float().mean().item()
    )
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(c))


def test_class_plan_spreads_samples_like_the_training_set():
    """n samples are split over classes in proportion to the counts (largest remainders),
    grouped by class; named classes share evenly; an unknown name lists the known ones."""
    plan = sf.class_plan(10, ["a", "b", "c"], [50, 30, 20])
    assert plan.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert sf.class_plan(4, ["a", "b", "c"], [50, 30, 20], ["c", "a"]).tolist() == [0, 0, 2, 2]
    with pytest.raises(sf.UserError, match="knows a, b, c"):
        sf.class_plan(4, ["a", "b", "c"], [1, 1, 1], ["dragon"])


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_guidance_weight_one_is_the_conditional_model_and_zero_the_weak_one():
    """u_w = u_weak + w (u_main - u_weak): w = 1 gives the conditional (or main) field
    exactly; w = 0 gives the unconditional field (classifier-free), or for autoguidance the
    guide's luminance and alpha under the main model's chroma; all within the [-1, 1] clamp."""
    torch.manual_seed(0)
    model = perturbed(sf.UNet((16, 32), 1, 4, n_classes=3))
    guide = perturbed(sf.UNet((16, 32), 1, 4), seed=1)
    x, t, c = torch.randn(2, 4, 128, 128), torch.full((2,), 0.4), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(sf.guided_clean(model, c, 1.0)(x, t), model.clean(x, t, c))
        assert torch.allclose(
            sf.guided_clean(model, c, 0.0)(x, t), model.clean(x, t, None).clamp(-1, 1), atol=1e-5
        )
        plain = sf.UNet((16, 32), 1, 4)
        main = perturbed(plain)
        z_main, z_guide = main.clean(x, t), guide.clean(x, t)
        # autoguidance moves luminance and alpha only
        grey = (z_main - z_guide)[:, :3].mean(1, keepdim=True)
        expected = torch.cat([z_main[:, :3] - grey, z_guide[:, 3:]], 1).clamp(-1, 1)
        assert torch.allclose(sf.guided_clean(main, None, 0.0, guide)(x, t), expected, atol=1e-6)
        two = sf.guided_clean(model, c, 2.0)(x, t)
        expected = (2 * model.clean(x, t, c) - model.clean(x, t, None)).clamp(-1, 1)
        assert torch.allclose(two, expected, atol=1e-5)


def test_guidance_combines_and_clamps_rgb_guesses_whatever_the_flow_colours():
    """With b = 0.25 the guesses are read in RGB, z = from_flow(model.clean), and
    z_w = to_flow(clamp(z_weak + w (z_main - z_weak))): the clamp bounds RGB to [-1, 1],
    where the flow's luminance of a white pixel is sqrt 3."""
    model = perturbed(sf.UNet((16, 32), 1, 4, n_classes=3, chroma=0.25))
    x, t, c = torch.randn(2, 4, 128, 128), torch.full((2,), 0.4), torch.tensor([0, 2])
    with torch.no_grad():
        z_main = sf.from_flow(model.clean(x, t, c), 0.25)
        z_weak = sf.from_flow(model.clean(x, t, None), 0.25)
        two = sf.guided_clean(model, c, 2.0)(x, t)
    expected = sf.to_flow((z_weak + 2 * (z_main - z_weak)).clamp(-1, 1), 0.25)
    assert torch.allclose(two, expected, atol=1e-5)
    assert sf.from_flow(two, 0.25).abs().max() <= 1 + 1e-5


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A tiny two-class run (10 steps), trained once for the tests below."""
    tmp = tmp_path_factory.mktemp("classes")
    write_sprites(tmp / "d" / "knight", 4)
    write_sprites(tmp / "d" / "slime", 4, seed=20)
    run = sf.train(
        tiny_config(tmp / "d", tmp / "run", max_steps=10, val_every=5, sample_every=100, lr=3e-3)
    )
    return tmp, run / "last.pt"


def first_sprite(folder):
    """The first image of a folder by name: iterdir's order is the file system's, not fixed."""
    return sorted(folder.iterdir())[0]


def test_class_names_survive_the_checkpoint_and_guide_only_without_classes(class_run, tmp_path):
    """The checkpoint keeps the class names, counts and pixel grid; a class run trains no
    guide, while a flat folder too small for groups of its own (fewer than 8 sprites a
    group) trains unconditionally with an autoguidance guide."""
    model, guide, ckpt = sf.load_models(class_run[1])
    assert ckpt["classes"] == ["knight", "slime"] and ckpt["grid"] == 8  # 4-px art at 4x
    assert ckpt["class_counts"] == [4, 3]  # training sprites: a slime is held out for validation
    assert model.n_classes == 2 and guide is None
    flat = sf.train(tiny_config(write_sprites(tmp_path / "flat", 4), tmp_path / "r", max_steps=2))
    model, guide, ckpt = sf.load_models(flat / "last.pt")
    assert model.n_classes == 0 and ckpt["classes"] == [] and guide is not None


def sample_at_guidances(ckpt, tmp_path, monkeypatch, capsys):
    """Sheets and summary lines of `sample` without --guidance ("default"), at 1 and at 2."""
    sheets, said = {}, {}
    for name, extra in (("default", []), ("w1", ["--guidance", "1"]), ("w2", ["--guidance", "2"])):
        status, out, err = run_main(
            monkeypatch, capsys, "sample", "--checkpoint", ckpt, "--n", 2,
            "--steps", 2, "--out", tmp_path / name, *extra,
        )
        assert status == 0, err
        sheets[name] = np.array(Image.open(tmp_path / name / "sheet.png"))
        said[name] = out + err
    return sheets, said


def test_a_flat_folder_samples_unguided_by_default_though_it_keeps_a_guide(
    tmp_path, monkeypatch, capsys
):
    """A flat folder trained without groups keeps the autoguidance guide, yet `sample`
    without --guidance draws exactly the sprites of `--guidance 1`: on real game art the
    guide washed every sprite out (lab record, "Guidance on real art"), so it steers only
    when asked."""
    data = write_sprites(tmp_path / "flat", 4)
    flat = sf.train(tiny_config(data, tmp_path / "r", max_steps=2, groups=0))
    sheets, said = sample_at_guidances(flat / "last.pt", tmp_path, monkeypatch, capsys)
    assert np.array_equal(sheets["default"], sheets["w1"])
    assert "guidance 1 (none)" in said["default"]
    assert "guidance 2 (autoguidance)" in said["w2"]


def test_the_datas_own_groups_are_nearest_centre_clusters_largest_first():
    """data_groups: k-means on thumbnails of where each colour sits. Five red and three
    blue sprites make two groups, the larger first; every sprite is labelled with its
    nearest centre, the same data gives the same groups, and given centres are kept."""
    x = torch.zeros(8, 4, 128, 128, dtype=torch.uint8)
    x[:, 3, 32:96, 32:96] = 255
    x[:5, 0, 32:96, 32:96] = 200  # red
    x[5:, 2, 32:96, 32:96] = 200  # blue
    x[::2, :, 32:40] = 0  # a little variety within each kind
    y, names, centres = sf.data_groups(x, torch.arange(8), 2)
    assert names == ["group1", "group2"] and y.tolist() == [0] * 5 + [1] * 3
    features = sf.thumbnails(x)
    assert torch.equal(y, torch.cdist(features, centres).argmin(1))
    again = sf.data_groups(x, torch.arange(8), 2)
    assert torch.equal(again[0], y) and torch.equal(again[2], centres)
    kept = sf.data_groups(x.flip(0), torch.arange(8), 2, centres)
    assert kept[0].tolist() == [1] * 3 + [0] * 5 and torch.equal(kept[2], centres)


def test_a_flat_folder_trains_on_its_own_groups_and_samples_them_unguided(
    tmp_path, monkeypatch, capsys
):
    """By default a folder without classes trains on groups of its own (at most one per 8
    training sprites: 19 make 2), kept with their centres in the checkpoint so that a
    resumed run labels the data alike. `sample` draws the groups in proportion and, by
    default, does not guide with them (w = 1 drew closer to real art than w = 2); asked
    for, --guidance 2 guides with the groups. An edit is drawn in the sprite's own group."""
    data = write_sprites(tmp_path / "flat", 20)
    run = sf.train(tiny_config(data, tmp_path / "r", max_steps=2))
    model, guide, ckpt = sf.load_models(run / "last.pt")
    assert ckpt["classes"] == ["group1", "group2"] and model.n_classes == 2 and guide is None
    assert ckpt["group_centres"].shape == (2, 4 * 64)
    sf.train(tiny_config(data, tmp_path / "r", max_steps=4, resume=True))
    assert sf.load_models(run / "last.pt")[2]["step"] == 4
    sheets, said = sample_at_guidances(run / "last.pt", tmp_path, monkeypatch, capsys)
    assert np.array_equal(sheets["default"], sheets["w1"])
    assert "guidance 1 (none)" in said["default"]
    assert "guidance 2 (the data's own groups)" in said["w2"]
    sprite = data / "s7.png"
    x, names, _, _ = sf.load_folder(data)
    own = sf.data_groups(x, torch.arange(len(x)), 2, ckpt["group_centres"])[0]
    mask = np.zeros((128, 128, 4), np.uint8)
    mask[:64] = 255  # repaint the top half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    status, out, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", run / "last.pt",
                                "--edit", sprite, "--mask", tmp_path / "mask.png", "--n", 2,
                                "--steps", 2, "--out", tmp_path / "edit")
    assert status == 0, err
    frames = json.loads((tmp_path / "edit" / "sheet.json").read_text())["frames"]
    group = ckpt["classes"][own[names.index("s7.png")]]
    assert [f["class"] for f in frames] == ["original", group, group]


def test_sample_by_class_writes_rows_and_a_sheet_that_slices_back(class_run):
    """`sample --class` draws the named classes, one grid row each; sheet.png cut at the
    frames of sheet.json gives back exactly the sprite files, with their classes. An unknown
    class is one sentence and leaves no empty output folder behind."""
    tmp, ckpt = class_run
    r = run_cli(
        "sample", "--checkpoint", ckpt, "--n", "4", "--steps", "2", "--class", "slime,knight",
        "--out", "s", "--native", cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    assert "guidance 2 (classifier-free)" in r.stdout
    meta = json.loads((tmp / "s" / "sheet.json").read_text())
    assert [f["class"] for f in meta["frames"]] == ["knight", "knight", "slime", "slime"]
    assert meta["meta"]["size"] == {"w": 256, "h": 256}
    with Image.open(tmp / "s" / "sheet.png") as im:
        sheet = np.array(im)
    assert im.mode == "RGBA"
    for f in meta["frames"]:
        x, y, w, h = (f["frame"][k] for k in "xywh")
        assert np.array_equal(
            sheet[y:y + h, x:x + w], np.array(Image.open(tmp / "s" / f["filename"]))
        )
    with Image.open(tmp / "s" / "native" / "sprite_000.png") as im:
        assert im.size == (16, 16)  # 128 / grid 8
    r = run_cli(
        "sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--class", "dragon",
        "--out", "dragons", cwd=tmp,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: unknown class 'dragon'; this checkpoint knows knight, slime"
    )
    assert not (tmp / "dragons").exists()


def test_sample_never_overwrites_an_output_folder(class_run):
    """A second `sample --out s2` writes to s2-2 and leaves the first sprites alone; an output
    folder that cannot be created is one sentence."""
    tmp, ckpt = class_run
    for _ in range(2):
        assert run_cli(
            "sample", "--checkpoint", ckpt, "--n", "1", "--steps", "1", "--out", "s2", cwd=tmp
        ).returncode == 0
    assert (tmp / "s2" / "sprite_000.png").exists() and (tmp / "s2-2" / "sprite_000.png").exists()
    (tmp / "afile").write_text("a file, not a folder")
    r = run_cli(
        "sample", "--checkpoint", ckpt, "--n", "1", "--steps", "1", "--out", "afile/out", cwd=tmp
    )
    assert (
        r.returncode == 2
        and r.stderr.startswith("error: cannot write to")
        and len(r.stderr.strip().splitlines()) == 1
    )


def test_sample_with_guidance_1_says_none_and_a_missing_mask_is_named(
    class_run, tmp_path, monkeypatch, capsys
):
    """`--guidance 1` is labelled "(none)" in the summary; `--edit` with a --mask file that
    does not exist names the file, and leaves no empty output folder."""
    tmp, ckpt = class_run
    status, out, err = run_main(
        monkeypatch, capsys, "sample", "--checkpoint", ckpt, "--n", "1", "--steps", "1",
        "--guidance", "1", "--out", tmp_path / "g", "--no-bf16",
    )
    assert status == 0 and "guidance 1 (none)" in out, err
    sprite = first_sprite(tmp / "d" / "knight")
    status, out, err = run_main(
        monkeypatch, capsys, "sample", "--checkpoint", ckpt, "--edit", sprite,
        "--mask", tmp_path / "nope.png", "--out", tmp_path / "e",
    )
    assert (
        status == 2
        and err.strip() == f"error: mask file '{tmp_path / 'nope.png'}' does not exist"
    )
    assert not (tmp_path / "e").exists()


def test_sampling_onto_a_full_disk_is_one_sentence_and_leaves_no_empty_files(
    class_run, tmp_path, monkeypatch, capsys
):
    """When the disk fills up as a sprite is written (the file exists, its bytes do not),
    sample ends with one sentence naming the file and the reason, and leaves no 0-byte
    sprite, no temporary file and no empty output folder."""
    def full_disk(image, fp, *args, **kw):
        Path(fp).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    status, out, err = run_main(
        monkeypatch, capsys, "sample", "--checkpoint", class_run[1], "--n", "2", "--steps", "1",
        "--out", tmp_path / "o", "--no-bf16",
    )
    assert status == 2 and err == (
        f"error: cannot write file '{tmp_path / 'o' / 'sprite_000.png'}' "
        "(No space left on device)\n"
    )
    assert list(tmp_path.rglob("*")) == []


def test_trajectory_shows_the_guided_guess_that_steered_the_solver(tmp_path):
    """trajectory.png has one row per time t: the states x_t of the sprites on the left and,
    on the right, the guess z_hat the solver used there, guided as the sprites were (classes,
    w = 2): (2 z(x, t, c) - z(x, t, -)) clamped, not the plain conditional guess."""
    torch.manual_seed(0)
    model = perturbed(sf.UNet((16, 32), 1, 4, n_classes=2))
    with torch.no_grad():  # classes that change the guess a lot, as in a trained model
        model.class_embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    x0, labels, solver = sf.gaussian_noise(2, 0), torch.tensor([0, 1]), sf.Solver("multistep", 2)
    sf.write_trajectory(model, x0, labels, 2.0, None, solver, False, tmp_path)
    with Image.open(tmp_path / "trajectory.png") as im:
        sheet = np.array(im.convert("RGB")).astype(int)
    assert sheet.shape == (3 * 128, 4 * 128, 3)  # t_0, t_1, t_2; two states, then two guesses
    frames = [x0]
    sf.integrate(sf.guided_clean(model, labels, 2.0), x0, solver, model.schedule, frames)
    shown = lambda z: (  # noqa: E731
        np.array(sf.sprite_sheet(sf.to_uint8(z, binary_alpha=False), 2)).astype(int)
    )
    for row, (x, t) in enumerate(zip(frames, sf.time_grid(solver.steps))):
        with torch.no_grad():
            conditional, unconditional = (
                model.clean(x, sf.at(x, t), labels),
                model.clean(x, sf.at(x, t)),
            )
        guesses = sheet[128 * row:128 * (row + 1), 256:]
        assert np.abs(guesses - shown((2 * conditional - unconditional).clamp(-1, 1))).max() <= 3
        assert np.abs(guesses - shown(conditional)).max() > 50


def test_old_checkpoints_are_refused_in_one_sentence(class_run, tmp_path):
    """A checkpoint from an earlier version (several EMAs, config keys that no longer exist,
    no pixel grid) is refused with one sentence, not a traceback."""
    ckpt = torch.load(class_run[1], weights_only=True)
    old = {k: ckpt[k] for k in ("model", "optimizer", "step", "best_val", "rng", "unshuffle")}
    old.update(
        ema={"0.1": ckpt["ema"]},
        config={**ckpt["config"], "ema_lengths": "0.1", "t_dist": "logit-normal"},
    )
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(sf.UserError, match="not a SpriteFlow checkpoint of this version"):
        sf.load_models(tmp_path / "old.pt")


def test_bf16_is_chosen_by_the_cpu_flags_and_a_probe(monkeypatch):
    """--bf16/--no-bf16 win; a CPU without bf16 instructions gets fp32 without a probe;
    with them, a probe step decides (bf16 only when at least 10% faster)."""
    model, cpu = tiny_unet(), torch.device("cpu")
    assert sf.decide_bf16(True, cpu, model) == (True, "as asked")
    monkeypatch.setattr(sf, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(
        sf, "probe_ms", lambda *a: pytest.fail("no probe without bf16 instructions")
    )
    assert sf.decide_bf16(None, cpu, model)[0] is False
    monkeypatch.setattr(sf, "cpu_has_bf16", lambda: True)
    for fp32_ms, bf16_ms, chosen in [(100, 60, True), (100, 95, False)]:
        monkeypatch.setattr(
            sf,
            "probe_ms",
            lambda m, d, bf16, batch, a=fp32_ms, b=bf16_ms: b if bf16 else a,
        )
        assert sf.decide_bf16(None, cpu, model)[0] is chosen


def test_a_run_begun_in_bf16_resumes_in_fp32_where_bf16_cannot_pay(monkeypatch):
    """A run keeps its precision on resume, except on a CPU without bf16 instructions, where
    bf16 is emulated and several times slower: there it goes on in fp32, and says why."""
    model, cpu = tiny_unet(), torch.device("cpu")
    monkeypatch.setattr(sf, "probe_ms", lambda *a: pytest.fail("a resumed run times no probe"))
    monkeypatch.setattr(sf, "cpu_has_bf16", lambda: True)
    assert sf.decide_bf16(None, cpu, model, {"bf16": True}) == (True, "as the run trained")
    monkeypatch.setattr(sf, "cpu_has_bf16", lambda: False)
    chosen = sf.decide_bf16(None, cpu, model, {"bf16": True})
    assert chosen == (False, "this CPU lists no bf16 instructions")


def test_sample_takes_the_newest_runs_last_checkpoint(tmp_path, monkeypatch):
    """With no --checkpoint, `sample` takes the run that saved last, and that run's last.pt
    even when best.pt was written after it (a save where the validation loss improved)."""
    monkeypatch.chdir(tmp_path)
    for run, age in (("old", 100), ("new", 10)):
        (tmp_path / "runs" / run).mkdir(parents=True)
        for name, extra in (("last.pt", 1), ("best.pt", 0)):
            path = tmp_path / "runs" / run / name
            path.write_bytes(b"")
            os.utime(path, (time.time() - age - extra, time.time() - age - extra))
    assert sf.newest_checkpoint() == Path("runs") / "new" / "last.pt"
    (tmp_path / "runs" / "new" / "last.pt").unlink()  # a crash can leave best.pt alone
    assert sf.newest_checkpoint() == Path("runs") / "new" / "best.pt"


def test_sample_keeps_the_runs_precision_without_timing_anything(
    class_run, tmp_path, monkeypatch, capsys
):
    """A timed probe can decide differently from one call to the next, and bf16 draws other
    sprites than fp32, so `sample` times nothing: on a CPU with bf16 instructions it keeps the
    precision the run trained in, on one without them fp32, and a seed draws the same sprites
    on every call."""
    monkeypatch.setattr(sf, "probe_ms", lambda *a: pytest.fail("sampling must not time a probe"))
    ckpt = torch.load(class_run[1], weights_only=False)
    ckpt["bf16"] = True
    torch.save(ckpt, tmp_path / "bf16.pt")
    said = {}
    for name, path, flags in (
        ("trained fp32", class_run[1], True),
        ("trained bf16", tmp_path / "bf16.pt", True),
        ("no bf16 flags", tmp_path / "bf16.pt", False),
    ):
        monkeypatch.setattr(sf, "cpu_has_bf16", lambda flags=flags: flags)
        status, out, err = run_main(
            monkeypatch, capsys, "sample", "--checkpoint", path, "--n", "1", "--steps", "1",
            "--out", tmp_path / name, "--device", "cpu",
        )
        assert status == 0, err
        said[name] = out
    assert "bf16 off (as the run trained)" in said["trained fp32"]
    assert "bf16 on (as the run trained)" in said["trained bf16"]
    assert "bf16 off (this CPU lists no bf16 instructions)" in said["no bf16 flags"]


def test_a_time_budget_is_counted_across_resumes_at_a_constant_lr(tmp_path):
    """With --max-minutes and no cool-down the run stops when the time is spent, at the full
    LR; the checkpoint keeps the training time, so a resumed run finds its budget already
    spent and takes no step."""
    data = write_sprites(tmp_path / "d", 4)
    run = sf.train(tiny_config(data, tmp_path / "r", max_steps=0, max_minutes=0.02, log_every=1,
                             val_every=1000, lr=1e-3, warmup=1, cooldown=0))  # full LR throughout
    rows = list(csv.DictReader(open(run / "training_log.csv")))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (
        ckpt["seconds"] >= 1.2
        and float(rows[-1]["lr"]) == 1e-3
        and float(rows[-1]["minutes"]) >= 0.02
    )
    sf.train(tiny_config(data, tmp_path / "r", resume=True, max_steps=0))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == ckpt["step"]


def test_the_last_step_is_saved_even_between_validations(tmp_path):
    """A run that ends just after a log row but between validations (4 steps; rows every 2,
    validation every 3) still saves step 4. The row that final validation adds carries the
    validation alone, not a made-up loss of 0 for the no steps since the last row."""
    data = write_sprites(tmp_path / "d", 4)
    run = sf.train(tiny_config(data, tmp_path / "r", max_steps=4))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    rows = list(csv.DictReader(open(run / "training_log.csv")))
    assert [r["step"] for r in rows] == ["2", "3", "4", "4"]
    assert rows[-1]["loss"] == rows[-1]["img_per_s"] == "" and float(rows[-1]["val_loss"]) > 0


def test_a_larger_time_budget_on_resume_extends_the_run_at_the_same_lr(tmp_path):
    """`--resume --max-minutes` with a larger budget continues a finished run: more steps, the
    training time summed over both sessions, and, without a cool-down, every step at the same
    constant LR (a one-step warm-up), across the seam too: a 30-minute run becomes a 60-minute
    one."""
    data = write_sprites(tmp_path / "d", 4)
    cfg = dict(max_steps=0, log_every=1, val_every=1000, lr=1e-3, warmup=1, guide="off",
               cooldown=0)
    run = sf.train(tiny_config(data, tmp_path / "r", max_minutes=0.01, **cfg))
    first = torch.load(run / "last.pt", weights_only=True)
    longer = (first["seconds"] + 2) / 60  # two more seconds, however long the first part took
    sf.train(tiny_config(data, tmp_path / "r", resume=True, max_minutes=longer, **cfg))
    second = torch.load(run / "last.pt", weights_only=True)
    assert second["step"] > first["step"] and second["seconds"] >= first["seconds"] + 2
    rows = list(csv.DictReader(open(run / "training_log.csv")))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == second["step"]  # one log, in step order
    assert {float(r["lr"]) for r in rows} == {1e-3}  # a one-step warm-up: full LR throughout


# -----------------------------------------------------------------------------
# Part 3c: nothing lost, nothing silent
# -----------------------------------------------------------------------------


def test_divergence_stops_without_saving_non_finite_weights(tmp_path):
    """An absurd LR makes the loss non-finite: the run stops with one sentence naming the
    last good checkpoint and a lower --lr, and no checkpoint holds non-finite weights;
    sample refuses a checkpoint that does."""
    data = write_sprites(tmp_path / "d", 4)
    with pytest.raises(
        sf.UserError, match=r"diverged at step .*last good checkpoint is .*last.pt .*lower --lr"
    ):
        sf.train(
            tiny_config(
                data, tmp_path / "r", max_steps=60, val_every=1, lr=300, grad_clip=1e9, warmup=50
            )
        )
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for sd in [ckpt["model"], ckpt["ema"]] for v in sd.values())
    for v in ckpt["ema"].values():
        v.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(sf.UserError, match="non-finite"):
        sf.load_models(tmp_path / "nan.pt")


def test_one_trainer_per_run_folder(tmp_path):
    """While a run holds its folder's lock, a second trainer there gets one sentence; a lock
    left by a killed process does not block (the OS releases flock with the process), and a
    temporary file it left mid-save is removed."""
    proc, _ = train_in_background(tmp_path, "--max-steps", "100000")
    try:
        r = run_cli("train", "--data", "imgs", "--run-dir", "r", "--resume", cwd=tmp_path)
        assert (
            r.returncode == 2 and "is being written by another training process" in r.stderr
        ), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "r" / "last.pt.tmp").write_bytes(b"")  # as if killed mid-save
    folder, fd, created = sf.claim_run_dir(sf.TrainConfig(run_dir=str(tmp_path / "r")))
    os.close(fd)
    assert (
        folder == tmp_path / "r"
        and not created
        and not (tmp_path / "r" / "last.pt.tmp").exists()
    )


def test_resume_remembers_its_data_and_refuses_other_data(tmp_path):
    """--resume without --data uses the run's own folder; another folder, or changed files
    in the same folder, is refused unless --allow-new-data; the log never repeats a step."""
    data, other = write_sprites(tmp_path / "d", 4), write_sprites(tmp_path / "o", 4, seed=9)
    sf.train(tiny_config(data, tmp_path / "r", max_steps=4, val_every=2))
    with open(tmp_path / "r" / "training_log.csv", "a") as f:
        f.write("5,junk\n")  # a row written after the last checkpoint by a killed process
    with pytest.raises(sf.UserError, match="this run trained on"):
        sf.train(tiny_config(other, tmp_path / "r", resume=True, max_steps=6))
    sf.train(sf.TrainConfig(run_dir=str(tmp_path / "r"), resume=True, max_steps=6))
    steps = [r["step"] for r in csv.DictReader(open(tmp_path / "r" / "training_log.csv"))]
    assert (
        steps == sorted(set(steps), key=int)
        and "junk" not in (tmp_path / "r" / "training_log.csv").read_text()
    )
    write_sprites(data, 5)
    with pytest.raises(sf.UserError, match="changed since this run started"):
        sf.train(sf.TrainConfig(run_dir=str(tmp_path / "r"), resume=True, max_steps=8))
    sf.train(
        sf.TrainConfig(run_dir=str(tmp_path / "r"), resume=True, max_steps=8, allow_new_data=True)
    )


def test_loader_scales_16_bit_warns_about_skipped_and_empty_files(tmp_path, monkeypatch):
    """16-bit grey is scaled (mid-grey stays mid-grey); .jpg and other files are reported
    once per suffix with a count; a sliver of an image is reported as nearly empty; the
    decompression-bomb warning names the file."""
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert sf.load_rgba(tmp_path / "grey16.png")[5, 5].tolist() == [128, 128, 128, 255]
    Image.new("RGBA", (4000, 10), (200, 0, 0, 255)).save(tmp_path / "sliver.png")
    for name in ("a.jpg", "b.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sf.load_folder(tmp_path)
    text = [str(w.message) for w in caught]
    assert (
        any("skipped 2 .jpg file(s)" in m and "JPEG" in m for m in text)
        and any("skipped 1 .txt" in m for m in text)
    )
    assert any("sliver.png" in m and "nearly empty" in m for m in text)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match="grey16.png"):
        sf.load_rgba(tmp_path / "grey16.png")


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "imgs", "--run-dir", "afile/run"],
        ["train", "--data", "imgs", "--lr", "nan"],
        ["train", "--data", "imgs", "--chroma", "0"],
        ["sample", "--checkpoint", "x.pt", "--guidance", "nan"],
        ["sample", "--checkpoint", "x.pt", "--sigma", "-1"],
    ],
)
def test_filesystem_errors_and_non_finite_flags_are_one_sentence(tmp_path, args):
    """An uncreatable run folder, and NaN, negative or (where it must be positive) zero
    numbers, end in one `error:` line and exit 2, before any data is loaded."""
    write_sprites(tmp_path / "imgs", 2)
    (tmp_path / "afile").write_text("a file, not a folder")
    r = run_cli(*args, cwd=tmp_path)
    assert (
        r.returncode == 2
        and r.stderr.startswith("error: ")
        and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr


def test_log_plot_handles_short_and_empty_logs_and_help_says_defaults_once(tmp_path):
    """training_log.png: a one-row log is drawn (as a dot); a log with no finite loss draws
    nothing and raises nothing; --help never prints '(default: ...)' twice or empty."""
    (tmp_path / "training_log.csv").write_text("step,loss\n1,0.5\n")
    sf.plot_training_log(tmp_path)
    with Image.open(tmp_path / "training_log.png") as im:
        assert im.size == (900, 560) and len(set(im.getdata())) > 2
    (tmp_path / "training_log.png").unlink()
    (tmp_path / "training_log.csv").write_text("step,loss,val_loss\n1,nan,\n2,nan,inf\n")
    sf.plot_training_log(tmp_path)
    assert not (tmp_path / "training_log.png").exists()
    for command in ("train", "sample"):
        text = run_cli(command, "--help", cwd=tmp_path).stdout
        assert (
            "(default: )" not in text
            and not any(line.count("default") > 1 for line in text.split("\n  -"))
        )


# -----------------------------------------------------------------------------
# Part 3d: what an invertible flow can do
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_inversion_then_generation_returns_the_point_for_the_exact_flow(name):
    """Driven by the closed-form Gaussian field, the backward Heun pass maps a sample to
    noise and the forward pass maps it back: the round trip is exact up to the solver."""
    x1 = MU + S * noise(2000, seed=3)
    x0 = sf.invert(gaussian_velocity(name), x1, 100)
    # it is N(0, I) noise
    assert torch.allclose(x0.std(0), torch.ones(2, dtype=torch.float64), atol=0.08)
    assert (sf.sample_heun(gaussian_velocity(name), x0, 100) - x1).abs().max() < 1e-4


def test_inversion_round_trip_of_a_trained_model_is_close(class_run):
    """`invert` on a (tiny, briefly trained) model reconstructs the sprite loosely and says how
    well."""
    tmp, ckpt = class_run
    r = run_cli(
        "invert", first_sprite(tmp / "d" / "slime"), "--checkpoint", ckpt, "--steps", "10",
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    assert (
        float(r.stdout.split("RMS error ")[1].split()[0]) < 0.5
        and (tmp / "invert" / "roundtrip.png").exists()
    )


@given(seeds, st.floats(0.0, 1.0))
def test_slerp_keeps_gaussian_norms(seed, s):
    """slerp(a, b, s) has norm (1 - s)|a| + s|b| and ends at a and b; for two Gaussian
    noises that is ~sqrt(d) all the way, where the straight line drops to ~0.71 sqrt(d)."""
    a, b = tensors(seed, (1, 4, 16, 16)), tensors(seed + 1, (1, 4, 16, 16))
    mid = sf.slerp(a, b, s)
    assert torch.allclose(mid.norm(), (1 - s) * a.norm() + s * b.norm(), rtol=1e-6)
    assert (
        torch.allclose(sf.slerp(a, b, 0.0), a, atol=1e-9)
        and torch.allclose(sf.slerp(a, b, 1.0), b, atol=1e-9)
    )


def test_interpolate_writes_a_gif_and_a_strip(class_run):
    """`interpolate SEED SPRITE` morphs between a seed's noise and a sprite's inverted noise."""
    tmp, ckpt = class_run
    r = run_cli(
        "interpolate", "3", first_sprite(tmp / "d" / "knight"), "--checkpoint", ckpt,
        "--steps", "2", "--frames", "3", cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    with Image.open(tmp / "interpolate" / "strip.png") as im:
        assert im.size == (3 * 128, 128)
    assert (tmp / "interpolate" / "morph.gif").exists()


def test_edit_leaves_unmasked_pixels_exactly_unchanged(class_run):
    """`sample --edit SPRITE --mask MASK --class knight` repaints only the masked pixels: every
    variation equals the sprite bit for bit outside the mask; sheet.json gives each frame its
    class, the sprite itself "original"."""
    tmp, ckpt = class_run
    sprite = first_sprite(tmp / "d" / "knight")
    mask = np.zeros((128, 128, 4), np.uint8)
    mask[:48, 32:96] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    r = run_cli(
        "sample", "--checkpoint", ckpt, "--edit", sprite, "--mask", "mask.png", "--n", "2",
        "--steps", "3", "--class", "knight", "--out", "e", cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    original = sf.load_rgba(sprite)
    keep = mask[..., 3] == 0
    for k in (1, 2):
        edited = np.array(Image.open(tmp / "e" / f"sprite_{k:03d}.png"))
        assert np.array_equal(edited[keep], original[keep])
    frames = json.loads((tmp / "e" / "sheet.json").read_text())["frames"]
    assert [(f["filename"], f["class"]) for f in frames] == [
        ("sprite_000.png", "original"),
        ("sprite_001.png", "knight"),
        ("sprite_002.png", "knight"),
    ]


# -----------------------------------------------------------------------------
# Characters of several views: layouts on disk, mirroring, joint sampling and the
# missing views of a given sprite.
# -----------------------------------------------------------------------------


def write_sheet(path, rows, cols, cell=(8, 10), empty=(), seed=0):
    """A sprite sheet of rows x cols cells of random blocks (2 px); cells listed in `empty`
    as (row, col) are fully transparent. Returns the cells (rows, cols, h, w, 4)."""
    rng = np.random.default_rng(seed)
    w, h = cell
    cells = rng.integers(0, 256, (rows, cols, h // 2, w // 2, 4)).astype(np.uint8)
    cells[..., 3] = 255
    cells = cells.repeat(2, 2).repeat(2, 3)
    for r, c in empty:
        cells[r, c] = 0
    sheet = cells.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return cells


def write_characters(folder, n, views, seed=0):
    """n character folders of `views` sprites each, views named 0.png, 1.png, ..."""
    for i in range(n):
        write_sprites(folder / f"c{i}", views, seed=seed + 10 * i)
        for k in range(views):  # write_sprites names them s0..; views go in name order
            (folder / f"c{i}" / f"s{k}.png").rename(folder / f"c{i}" / f"{k}.png")
    return folder


def test_a_sheet_gives_one_character_per_column_of_each_block_of_view_rows(tmp_path):
    """With --cell WxH --views V, column j of every block of V rows is one character, its
    views stacked top to bottom (channels 4k..4k+3 = row k of the block, loaded like a single
    sprite); a column of empty cells is skipped; without --views every drawn cell is one
    sprite; sheets in class folders give classes."""
    cells = write_sheet(tmp_path / "d" / "knights" / "k.png", 4, 3, empty=[(2, 1), (3, 1)])
    write_sheet(tmp_path / "d" / "slimes" / "s.png", 2, 2, seed=1)
    x, names, classes, y = sf.load_sheets(tmp_path / "d", "8x10", views=2)
    assert x.shape == (5 + 2, 8, 128, 128) and x.dtype == torch.uint8
    assert names[:5] == ["knights/k.png#r00c00", "knights/k.png#r00c01", "knights/k.png#r00c02",
                         "knights/k.png#r02c00", "knights/k.png#r02c02"]
    assert classes == ["knights", "slimes"] and y.tolist() == [0] * 5 + [1] * 2
    for k in range(2):  # the character at rows 2-3, column 2
        cell = torch.from_numpy(sf.square_rgba(Image.fromarray(cells[2 + k, 2])))
        assert torch.equal(x[4, 4 * k:4 * k + 4], cell.permute(2, 0, 1))
    single = sf.load_sheets(tmp_path / "d", "8x10")[0]
    assert single.shape == (4 * 3 - 2 + 4, 4, 128, 128)


def test_character_folders_stack_their_views_in_name_order_inside_class_folders(tmp_path):
    """Each character folder is one example: view k (its k-th file by name) in channels
    4k..4k+3; character folders inside class folders take the class of the top folder."""
    write_characters(tmp_path / "d" / "orc", 2, 3)
    write_characters(tmp_path / "d" / "elf", 1, 3, seed=50)
    x, names, classes, y = sf.load_examples(tmp_path / "d", views=3)
    assert names == ["elf/c0", "orc/c0", "orc/c1"] and classes == ["elf", "orc"]
    assert y.tolist() == [0, 1, 1] and x.shape == (3, 12, 128, 128)
    for k in range(3):
        view = sf.load_rgba(tmp_path / "d" / "orc" / "c1" / f"{k}.png")
        assert torch.equal(x[2, 4 * k:4 * k + 4], torch.from_numpy(view).permute(2, 0, 1))


@pytest.mark.parametrize("case", ["not divisible", "rows not in blocks", "view missing in sheet",
                                  "view missing in folder", "loose file", "bad cell"])
def test_bad_layouts_are_one_sentence(tmp_path, monkeypatch, capsys, case):
    """A sheet that does not divide into cells, rows that do not group into characters, a
    character short of a view (an empty cell, or a folder with too few files), a loose file
    beside character folders and a malformed --cell each end in one sentence and exit 2,
    leaving no run folder behind."""
    write_sheet(tmp_path / "sheet" / "a.png", 3, 2, empty=[(1, 1)])
    write_characters(tmp_path / "chars", 2, 3)
    (tmp_path / "chars" / "c1" / "2.png").unlink()
    write_characters(tmp_path / "loose", 1, 2)
    write_sprites(tmp_path / "loose", 1)
    args, said = {
        "not divisible": (["--data", "sheet", "--cell", "7x10"], "does not divide into 7x10"),
        "rows not in blocks": (["--data", "sheet", "--cell", "8x10", "--views", "2"],
                               "3 rows of cells, which do not group into characters of 2"),
        "view missing in sheet": (["--data", "sheet", "--cell", "8x10", "--views", "3"],
                                  "column 2, rows 1-3 of sheet 'a.png' has 2 of its 3 views"),
        "view missing in folder": (["--data", "chars", "--views", "3"],
                                   "'c1' holds 2 readable image(s), but --views 3 needs exactly"),
        "loose file": (["--data", "loose", "--views", "2"], "sits directly in"),
        "bad cell": (["--data", "sheet", "--cell", "8by10"], "--cell must be WIDTHxHEIGHT"),
    }[case]
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(monkeypatch, capsys, "train", *args, "--run-dir", "r")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and said in err, err
    assert not (tmp_path / "r").exists()


def test_mirroring_flips_every_view_and_swaps_left_and_right():
    """mirror(z) flips each view left to right; with 4 views (front, left, back, right) views
    1 and 3 trade places, so mirror(mirror(z)) = z; one view is a plain flip."""
    z = torch.randn(2, 16, 8, 8)
    m = sf.mirror(z)
    for k, source in enumerate([0, 3, 2, 1]):
        assert torch.equal(m[:, 4 * k:4 * k + 4], z[:, 4 * source:4 * source + 4].flip(-1))
    assert torch.equal(sf.mirror(m), z)
    assert torch.equal(sf.mirror(z[:, :4]), z[:, :4].flip(-1))


def test_views_widen_only_the_stem_and_the_head_and_one_view_is_the_old_network():
    """A V-view U-Net differs from the single-view one only in the stem's input and the
    head's output (64V channels after unshuffle 4), so V = 1 is the old network; the noise
    and the luminance guide of one view are the old formulas."""
    one = tiny_unet()
    four = sf.UNet(channels=(16, 32), blocks=1, unshuffle=4, views=4)
    shapes1 = {k: v.shape for k, v in one.state_dict().items()}
    shapes4 = {k: v.shape for k, v in four.state_dict().items()}
    assert {k for k in shapes1 if shapes1[k] != shapes4[k]} == {"stem.1.weight", "head.2.weight",
                                                                "head.2.bias"}
    assert shapes4["stem.1.weight"][1] == 256 and shapes4["head.2.weight"][0] == 256
    assert four(torch.randn(1, 16, 128, 128), torch.full((1,), 0.5)).shape == (1, 16, 128, 128)
    assert torch.equal(sf.gaussian_noise(3, 7), sf.gaussian_noise(3, 7, views=1))
    main, weak = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    grey = (main - weak)[:, :3].mean(1, keepdim=True)
    assert torch.equal(sf.luminance_guide(main, weak),
                       torch.cat([main[:, :3] - grey, weak[:, 3:]], 1))


@pytest.fixture(scope="module")
def views_run(tmp_path_factory):
    """A tiny run on 6 characters of 4 views in two classes (6 steps)."""
    tmp = tmp_path_factory.mktemp("views")
    write_characters(tmp / "d" / "knight", 3, 4)
    write_characters(tmp / "d" / "slime", 3, 4, seed=100)
    run = sf.train(tiny_config(tmp / "d", tmp / "run", views=4, sample_every=6, lr=3e-3))
    return tmp, run / "last.pt"


def test_a_views_run_samples_each_character_as_one_row_of_its_views(views_run, monkeypatch,
                                                                     capsys):
    """A --views 4 checkpoint stores V; its sample grids and `sample` draw whole characters,
    one row of 4 views each: grid.png is 4 sprites wide, and sheet.json names every frame's
    file, character, view and class, each frame cut from sheet.png being its file."""
    tmp, ckpt = views_run
    assert sf.read_checkpoint(ckpt)["config"]["views"] == 4
    with Image.open(ckpt.parent / "samples" / "step_0000006.png") as im:
        assert im.size == (4 * 128, 4 * 128)  # 16 // 4 characters, one row each
    status, out, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", ckpt, "--n", 2,
                                "--steps", 2, "--out", tmp / "s", "--class", "slime")
    assert status == 0, err
    assert out.startswith("wrote 2 characters of 4 views, grid.png")
    with Image.open(tmp / "s" / "grid.png") as im:
        assert im.size == (4 * 128, 2 * 128)
    frames = json.loads((tmp / "s" / "sheet.json").read_text())["frames"]
    assert [(f["filename"], f["character"], f["view"], f["class"]) for f in frames[3:5]] == [
        ("sprite_000_v3.png", 0, 3, "slime"), ("sprite_001_v0.png", 1, 0, "slime")]
    assert (frames[5]["frame"]["x"], frames[5]["frame"]["y"]) == (128, 128)
    sheet = np.array(Image.open(tmp / "s" / "sheet.png"))
    for f in frames:
        x, y = f["frame"]["x"], f["frame"]["y"]
        assert np.array_equal(sheet[y:y + 128, x:x + 128],
                              np.array(Image.open(tmp / "s" / f["filename"])))


@pytest.mark.parametrize("method", ["multistep", "heun"])
def test_inpainting_over_views_shows_the_network_the_given_view_at_every_call(method):
    """inpaint(..., shown=True): at every call x_t's known view is y itself, as views models
    are trained (section 7); the other views come from x_t, the noise at the first call."""
    y = torch.rand(2, 8, 16, 16) * 2 - 1  # 2 characters of 2 views
    m = sf.view_mask(2, 1)  # view 1 is given
    calls = []

    def clean(x_t, t):
        calls.append(x_t.clone())
        return torch.zeros_like(x_t)

    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    z = sf.inpaint(clean, "linear", y, m, x, sf.Solver(method, 4), shown=True)
    assert len(calls) >= 4
    for x_t in calls:
        assert torch.equal(x_t[:, 4:], y[:, 4:])
    assert torch.equal(calls[0][:, :4], x[:, :4]) and torch.isfinite(z).all()


def test_views_from_keeps_the_given_view_bit_for_bit(views_run, monkeypatch, capsys):
    """`sample --views-from SPRITE --view 2 --n 2 --class knight` draws two characters whose
    view 2 is the sprite exactly as loaded, with three views drawn around it in the sprite's
    own colours (--palette given, the default); it needs a views checkpoint and a view number
    below V, and refuses --trajectory and --colours; --palette given needs --views-from."""
    tmp, ckpt = views_run
    given = tmp / "d" / "knight" / "c1" / "2.png"
    status, out, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", ckpt,
                                "--views-from", given, "--view", 2, "--n", 2, "--steps", 2,
                                "--class", "knight", "--out", tmp / "vf")
    assert status == 0, err
    assert "view 2 from" in out and "the other 3 drawn" in out
    kept = sf.load_rgba(given)
    palette = {tuple(p) for p in kept[kept[..., 3] > 0][:, :3].tolist()}
    for c in range(2):
        assert np.array_equal(np.array(Image.open(tmp / "vf" / f"sprite_{c:03d}_v2.png")), kept)
        for v in (0, 1, 3):
            drawn = np.array(Image.open(tmp / "vf" / f"sprite_{c:03d}_v{v}.png"))
            assert not np.array_equal(drawn, kept)
            assert {tuple(p) for p in drawn[drawn[..., 3] > 0][:, :3].tolist()} <= palette
    for extra, said in [(["--view", "4"], "--view must be below 4"),
                        (["--trajectory"], "work on single sprites"),
                        (["--colours", "4"], "--colours cannot be used with --views-from")]:
        status, _, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", ckpt,
                                  "--views-from", given, "--out", tmp / "no", *extra)
        assert status == 2 and said in err, err
    single = sf.train(tiny_config(write_sprites(tmp / "flat", 3), tmp / "r1", max_steps=1))
    status, _, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", single / "last.pt",
                              "--views-from", given, "--out", tmp / "no")
    assert status == 2 and "needs a checkpoint trained with --views" in err
    status, _, err = run_main(monkeypatch, capsys, "sample", "--checkpoint", ckpt,
                              "--palette", "given", "--out", tmp / "no")
    assert status == 2 and "--palette given takes the colours of the --views-from" in err


# -----------------------------------------------------------------------------
# Palettes: the data's, the artist's files, and a colour budget per sprite
# -----------------------------------------------------------------------------

PICO = [[0, 0, 0], [29, 43, 83], [126, 37, 83], [255, 241, 232]]


def palette_files(folder):
    """The same four colours in every format `sample --palette` reads: {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(map(str, c)) for c in PICO]
    hexes = ["%02x%02x%02x" % tuple(c) for c in PICO]
    files = {
        "gpl": "GIMP Palette\nName: four\nColumns: 4\n# a comment\n"
               + "\n".join(f"{line}\tcolour {k}" for k, line in enumerate(lines)) + "\n",
        "hex": "\n".join(hexes) + "\n",
        "txt": "; Paint.NET Palette File\n; four colours\n" + "\n".join("FF" + h for h in hexes)
               + "\n00ABCDEF\n",  # a fully transparent entry is not a colour
        "pal": "JASC-PAL\r\n0100\r\n4\r\n" + "\r\n".join(lines) + "\r\n",
    }
    paths = {}
    for suffix, text in files.items():
        paths[suffix] = folder / f"four.{suffix}"
        paths[suffix].write_text(text)
    strip = np.array([[c + [255] for c in PICO] + [[9, 9, 9, 0]]], np.uint8)  # + a clear pixel
    paths["png"] = folder / "four.png"
    Image.fromarray(np.repeat(strip, 3, 0)).save(paths["png"])
    return paths


def test_palette_files_parse_to_their_colours(tmp_path):
    """GIMP .gpl, Lospec .hex, Paint.NET .txt (AARRGGBB, ';' comments), JASC .pal (CRLF) and
    an image (its distinct opaque colours) all give the same four colours."""
    for suffix, path in palette_files(tmp_path).items():
        colours = sf.read_palette(path)
        assert colours.dtype == torch.uint8 and colours.shape == (4, 3), suffix
        assert sorted(colours.tolist()) == sorted(PICO), suffix


def test_oklab_puts_white_at_one_and_greys_on_the_axis():
    """OKLab: white -> (1, 0, 0), black -> (0, 0, 0), every grey has a = b = 0, and L grows
    with the grey level."""
    grey = torch.linspace(-1, 1, 9)[:, None].expand(9, 3)
    lab = sf.oklab(grey)
    assert torch.allclose(lab[-1], torch.tensor([1.0, 0, 0]), atol=1e-4)
    assert torch.allclose(lab[0], torch.zeros(3), atol=1e-6)
    assert lab[:, 1:].abs().max() < 1e-4 and (lab[1:, 0] > lab[:-1, 0]).all()


def test_projection_puts_each_opaque_block_on_its_nearest_palette_colour():
    """Pi with lam = 1 gives every opaque pixel of z_hat the palette colour nearest its k x k
    block's colour (so blocks are constant), lam = 0.5 moves it half-way, alpha and
    transparent pixels never change, and before t_p the guess is left alone."""
    colours = torch.tensor(PICO, dtype=torch.uint8)
    z = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    hard = sf.project_to_palette(z, sf.OnPalette(colours, grid=4))
    opaque = (z[:, 3] >= 0)[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(hard[:, 3], z[:, 3]) and torch.equal(hard[:, :3][~opaque], z[:, :3][~opaque])
    on = (hard[:, :3].permute(0, 2, 3, 1)[opaque[:, 0]] + 1) * 127.5  # (M, 3)
    assert (on.round()[:, None] == colours.float()).all(2).any(1).all()
    assert torch.allclose(sf.snap_to_grid(hard, 4)[:, :3][opaque], hard[:, :3][opaque], atol=1e-6)
    half = sf.project_to_palette(z, sf.OnPalette(colours, grid=4, lam=0.5))
    assert torch.allclose(half, (z + hard) / 2, atol=1e-6)
    clean = sf.held_to_palette(lambda x, t: x, sf.OnPalette(colours, grid=4, t_p=0.5))
    assert torch.equal(clean(z, torch.full((2,), 0.4)), z)
    assert torch.equal(clean(z, torch.full((2,), 0.5)), hard)


def test_generate_with_a_palette_draws_only_its_colours_for_every_solver():
    """With a palette every opaque pixel of generate()'s sprites is a palette colour, alpha
    stays binary and transparent pixels keep RGB 0, for every solver."""
    model, colours = perturbed(tiny_unet()), torch.tensor(PICO, dtype=torch.uint8)
    for sampler in sf.SAMPLERS:
        held = sf.OnPalette(colours, grid=4, t_p=0.5)
        solver = sf.Solver(sampler, 4, palette=held)
        sprites = sf.generate(model, sf.gaussian_noise(2, 3), solver=solver, grid=4)
        rgb = sprites[..., :3][sprites[..., 3] > 0]
        assert len(rgb) and (rgb[:, None] == colours).all(2).any(1).all(), sampler
        assert set(sprites[..., 3].unique().tolist()) <= {0, 255}
        assert (sprites[..., :3][sprites[..., 3] == 0] == 0).all()


def sprite_files(folder):
    """uint8 (N, H, W, 4) of a sample folder's sprite_NNN.png."""
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.glob("sprite_*.png"))])


@pytest.mark.parametrize("kind", ["gpl", "hex", "txt", "pal", "png", "data"])
def test_sample_with_a_palette_draws_every_opaque_pixel_from_it(
    class_run, tmp_path, monkeypatch, capsys, kind
):
    """`sample --palette FILE` for each format, an image, and the checkpoint's own palette
    (`data`): every opaque pixel of every sprite is a palette colour, alpha is binary and
    transparent pixels have RGB 0. With t_p = 0.9 and 10 steps the guesses are projected
    inside the flow as well as at the end."""
    monkeypatch.setattr(sf, "PALETTE_T", 0.9)
    path = "data" if kind == "data" else palette_files(tmp_path / "p")[kind]
    status, out, err = run_main(
        monkeypatch, capsys, "sample", "--checkpoint", class_run[1], "--n", 2, "--steps", 10,
        "--palette", path, "--out", tmp_path / "s", "--no-bf16",
    )
    assert status == 0, err
    ckpt = sf.read_checkpoint(class_run[1])
    colours = ckpt["palette"] if kind == "data" else torch.tensor(PICO, dtype=torch.uint8)
    assert (f"palette of the data ({len(colours)} colours)" if kind == "data"
            else "palette four.{} (4 colours)".format(kind)) in out
    sprites = torch.from_numpy(sprite_files(tmp_path / "s"))
    rgb = sprites[..., :3][sprites[..., 3] > 0]
    assert len(rgb) and (rgb[:, None] == colours).all(2).any(1).all()
    assert set(sprites[..., 3].unique().tolist()) <= {0, 255}
    assert (sprites[..., :3][sprites[..., 3] == 0] == 0).all()


def test_a_palette_applied_after_sampling_changes_colours_only(
    class_run, tmp_path, monkeypatch, capsys
):
    """By default (t_p = 1: the projection after sampling only), a palette changes no alpha:
    the sprites' alpha is bit for bit that of the same seed without a palette, and the
    colours are the palette's, where without it they are not."""
    assert sf.PALETTE_T == 1.0
    runs = {}
    for name, extra in (("plain", []), ("pal", ["--palette", palette_files(tmp_path)["hex"]])):
        status, _, err = run_main(
            monkeypatch, capsys, "sample", "--checkpoint", class_run[1], "--n", 3, "--steps", 4,
            "--out", tmp_path / name, "--no-bf16", *extra,
        )
        assert status == 0, err
        runs[name] = torch.from_numpy(sprite_files(tmp_path / name))
    assert torch.equal(runs["plain"][..., 3], runs["pal"][..., 3])
    def in_palette(sprites):
        rgb = sprites[..., :3][sprites[..., 3] > 0]
        return (rgb[:, None] == torch.tensor(PICO, dtype=torch.uint8)).all(2).any(1)

    assert in_palette(runs["pal"]).all() and not in_palette(runs["plain"]).all()


def test_colours_n_holds_on_every_sprite(class_run, tmp_path, monkeypatch, capsys):
    """`sample --colours 3` leaves at most 3 opaque colours in every sprite (where the same
    seed without it draws more), alone and with a palette, whose colours it then keeps to."""
    counts = {}
    for name, extra in (("free", []), ("three", ["--colours", 3]),
                        ("pal", ["--colours", 3, "--palette", "data"])):
        status, out, err = run_main(
            monkeypatch, capsys, "sample", "--checkpoint", class_run[1], "--n", 2, "--steps", 3,
            "--out", tmp_path / name, "--no-bf16", *extra,
        )
        assert status == 0, err
        sprites = sprite_files(tmp_path / name)
        counts[name] = [len(np.unique(s[s[..., 3] > 0][:, :3], axis=0)) for s in sprites]
    assert max(counts["free"]) > 3
    assert max(counts["three"]) <= 3 and max(counts["pal"]) <= 3
    palette = sf.read_checkpoint(class_run[1])["palette"]
    sprites = torch.from_numpy(sprite_files(tmp_path / "pal"))
    assert (sprites[..., :3][sprites[..., 3] > 0][:, None] == palette).all(2).any(1).all()
    assert "at most 3 colours per sprite" in out


def test_the_checkpoint_keeps_the_data_palette(class_run, monkeypatch):
    """A checkpoint's palette is every opaque colour of its training sprites when there are
    at most PALETTE_SIZE, else that many of them; each palette colour is a data colour."""
    tmp, path = class_run
    palette = sf.read_checkpoint(path)["palette"]
    x = sf.load_folder(tmp / "d")[0]
    used, counts = sf.colour_counts(x, 8)
    assert palette.dtype == torch.uint8 and 0 < len(palette) <= sf.PALETTE_SIZE
    assert (palette[:, None] == used).all(2).any(1).all()
    few = sf.data_palette(x[:1], 8)
    assert sorted(few.tolist()) == sorted(sf.colour_counts(x[:1], 8)[0].tolist())
    monkeypatch.setattr(sf, "PALETTE_SIZE", 5)
    five = sf.data_palette(x, 8)
    assert len(five) == 5 and (five[:, None] == used).all(2).any(1).all()


@pytest.mark.parametrize(
    "case", ["empty", "no header", "out of range", "bad hex", "jasc count", "unknown suffix",
             "missing", "old checkpoint"],
)
def test_a_bad_palette_is_one_sentence(class_run, tmp_path, monkeypatch, capsys, case):
    """A malformed or empty palette file, an unknown kind of file, a missing one, or
    --palette data on a checkpoint that keeps no palette: exit 2, one line, no sprites."""
    files = {
        "empty": ("p.hex", "; only a comment\n\n"),
        "no header": ("p.gpl", "255 0 0\n"),
        "out of range": ("p.gpl", "GIMP Palette\n300 0 0\n"),
        "bad hex": ("p.hex", "ff0000\nzz00zz\n"),
        "jasc count": ("p.pal", "JASC-PAL\n0100\n3\n1 2 3\n"),
        "unknown suffix": ("p.aco", "8BPS"),
    }
    checkpoint, palette = class_run[1], tmp_path / "gone.hex"
    if case in files:
        palette = tmp_path / files[case][0]
        palette.write_text(files[case][1])
    if case == "old checkpoint":
        old = {k: v for k, v in torch.load(checkpoint, weights_only=True).items() if k != "palette"}
        checkpoint, palette = tmp_path / "old.pt", "data"
        torch.save(old, checkpoint)
    status, _, err = run_main(
        monkeypatch, capsys, "sample", "--checkpoint", checkpoint, "--n", 1, "--steps", 1,
        "--palette", palette, "--out", tmp_path / "s",
    )
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert case != "old checkpoint" or "keeps no palette" in err
    assert case != "empty" or "holds no colours" in err
    assert not (tmp_path / "s").exists()


# -----------------------------------------------------------------------------
# Part 4: fid.py. Random Inception weights only: nothing is downloaded. The real
# network at 299x299 is slow on a CPU, so every test that runs it uses a handful
# of images.
# -----------------------------------------------------------------------------

SHAPES_JSON = ROOT.parent / "shared" / "fid" / "pt_inception-2015-12-05_state_dict.json"


def random_state_dict(seed=0):
    """A state dict for FIDInceptionV3 with random, well-scaled weights.

    PyTorch's default initialisation shrinks the signal at every layer, so
    after ~90 layers the features would all be ~1e-8. He-normal convolutions
    and near-identity BatchNorm keep them of order 1, so tests can tell
    images apart."""
    g = torch.Generator().manual_seed(seed)
    state = fid.FIDInceptionV3().state_dict()
    for key, v in state.items():
        if key.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel()))
        elif key.endswith("bn.weight"):
            v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
        elif key.endswith(("bn.bias", "running_mean")):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
        elif key.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
        elif key.startswith("fc."):
            v.copy_(0.01 * torch.randn(v.shape, generator=g))
    return state


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory):
    """Random weights saved like the real file: a plain state dict in a .pth."""
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model(weights_path):
    return fid.load_inception(weights_path, "cpu", allow_download=False)


def random_sprites(n, size=128, seed=0):
    """n random RGBA uint8 sprites (n, size, size, 4) with a transparent border, like real
    sprites."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 4), dtype=np.uint8)
    images[:, : size // 8, :, 3] = 0
    return images


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"sprite_{i:03d}.png")
    return folder


def random_covariance(rng, d, rank=None):
    a = rng.normal(size=(rank or 2 * d, d))
    return a.T @ a / len(a)


# -----------------------------------------------------------------------------
# The network and its weights


def test_state_dict_matches_weights_file_listing():
    """The model's state dict has exactly the keys and shapes of the real weights file."""
    if not SHAPES_JSON.is_file():
        pytest.skip(f"{SHAPES_JSON} (the key/shape listing of the real weights) is absent")
    expected = json.loads(SHAPES_JSON.read_text())["state_dict"]
    got = {k: list(v.shape) for k, v in fid.FIDInceptionV3().state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected


def test_state_dict_built_from_listing_loads_strictly(tmp_path):
    """A .pth with exactly the listed keys/shapes loads through load_inception(weights=...) with
    strict=True."""
    if not SHAPES_JSON.is_file():
        pytest.skip(f"{SHAPES_JSON} (the key/shape listing of the real weights) is absent")
    listing = json.loads(SHAPES_JSON.read_text())["state_dict"]
    state = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else torch.zeros(shape))
             for k, shape in listing.items()}
    path = tmp_path / fid.WEIGHTS_NAME
    torch.save(state, path)
    m = fid.load_inception(path, "cpu", allow_download=False)
    assert not m.training  # eval mode: BatchNorm uses the stored statistics
    # A file missing a key is refused with a clear FIDError, never half-loaded.
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(fid.FIDError, match="not the FID Inception weights"):
        fid.load_inception(path, "cpu", allow_download=False)


def test_forward_shape_and_any_input_size(model):
    """forward takes [0, 1] images of any size and returns (N, 2048) features."""
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 80)).shape == (2, fid.FEATURE_DIM)
        assert model(torch.rand(1, 3, 299, 299)).shape == (1, fid.FEATURE_DIM)


def test_missing_weights_raise_clear_error(tmp_path, monkeypatch):
    """No --weights, an empty torch hub cache and no download: FIDError naming where the file
    goes."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(fid.FIDError) as info:
        fid.load_inception(None, "cpu", allow_download=False)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_NAME) in message
    assert "--weights" in message
    with pytest.raises(fid.FIDError, match="does not exist"):
        fid.load_inception(tmp_path / "nope.pth", "cpu")


class _FakeResponse:
    """Stands in for urllib's response: serves fixed bytes, no network."""

    def __init__(self, data):
        self.data, self.pos, self.headers = data, 0, {"Content-Length": str(len(data))}

    def read(self, n):
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_checks_sha256_prefix(tmp_path, monkeypatch, capsys):
    """The download keeps the file only when its SHA-256 starts with the 8 hex digits in its
    name."""
    import hashlib
    payload = b"not really inception weights"
    monkeypatch.setattr(
        fid.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload)
    )
    dest = tmp_path / fid.WEIGHTS_NAME
    with pytest.raises(fid.FIDError, match="SHA-256"):
        fid.download_weights(dest)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part is left behind
    good_name = f"pt_inception-2015-12-05-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    monkeypatch.setattr(fid, "WEIGHTS_NAME", good_name)
    fid.download_weights(tmp_path / good_name)
    assert (tmp_path / good_name).read_bytes() == payload
    assert "downloading" in capsys.readouterr().err  # the progress bar goes to stderr


# -----------------------------------------------------------------------------
# The Frechet distance


def test_frechet_identical_statistics_is_zero():
    """Identical statistics give FID 0 (up to rounding)."""
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=20), random_covariance(rng, 20)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_is_symmetric():
    """FID(a, b) == FID(b, a)."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=16), random_covariance(rng, 16)
    b = rng.normal(size=16), random_covariance(rng, 16)
    assert fid.frechet_distance(*a, *b) == pytest.approx(fid.frechet_distance(*b, *a), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_frechet_diagonal_closed_form(d, seed):
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.01, 5, size=d), rng.uniform(0.01, 5, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_matches_direct_scipy_computation():
    """Random full covariances: matches scipy's sqrtm directly and the symmetric form
    Tr sqrt(sigma1^1/2 sigma2 sigma1^1/2) computed with eigh."""
    rng = np.random.default_rng(2)
    d = 30
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    w, v = linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    symmetric = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1 + s2)
        - 2 * np.sqrt(linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    )
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(direct, rel=1e-9)
    assert got == pytest.approx(symmetric, rel=1e-8)


def test_frechet_pytorch_fid_test_vector():
    """pytorch-fid's check: mu1 = 0, mu2 = 1, sigma1 = sigma2 = I in 2048-d gives exactly 2048."""
    d = fid.FEATURE_DIM
    assert fid.frechet_distance(
        np.zeros(d), np.eye(d), np.ones(d), np.eye(d)
    ) == pytest.approx(2048.0, abs=1e-6)


def test_frechet_singular_covariances_stay_finite(monkeypatch):
    """Singular covariances give a finite FID; when sqrtm is not finite, the eps * I retry runs and
    warns."""
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(4, 32)), rng.normal(size=(4, 32)) + 0.5  # rank 3 in 32-d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1, s2 = fid.statistics(f1), fid.statistics(f2)
    assert np.isfinite(fid.frechet_distance(*s1, *s2))

    # Force the first sqrtm to fail, as it can on real singular 2048-d covariances.
    real_sqrtm, calls = linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", failing_once)
    with pytest.warns(UserWarning, match="not finite"):
        value = fid.frechet_distance(*s1, *s2)
    assert len(calls) == 2 and np.isfinite(value)
    eye = np.eye(32) * 1e-6  # the retry nudged both covariances
    np.testing.assert_allclose(calls[1], (s1[1] + eye) @ (s2[1] + eye))


def test_frechet_large_imaginary_part_raises():
    """A square root with imaginary diagonal parts above 1e-3 (here: sqrtm(-I) = iI) raises
    ValueError."""
    d = 5
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), -np.eye(d))


@settings(max_examples=10, deadline=None)
@given(n1=st.integers(3, 12), n2=st.integers(3, 60), seed=st.integers(0, 2**32 - 1))
def test_low_rank_route_matches_sqrtm_route(n1, n2, seed):
    """The fast route used for small sample counts gives the FID of the definition,
    |mu1 - mu2|^2 + Tr s1 + Tr s2 - 2 Tr sqrt(s1^1/2 s2 s1^1/2), computed here from symmetric
    eigendecompositions; frechet_distance's sqrtm route agrees wherever it returns. (With
    both covariances singular, sqrtm of the product can come out with large imaginary parts
    and raise, as pytorch-fid's does: about 1 draw in 600 here, which made this test flaky.)"""
    rng = np.random.default_rng(seed)
    d = 24
    f1, f2 = rng.normal(size=(n1, d)), rng.gamma(2.0, size=(n2, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1, s2 = fid.statistics(f1), fid.statistics(f2)
        w, v = np.linalg.eigh(s1[1])
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # s1^1/2
        inner = np.linalg.eigvalsh(root1 @ s2[1] @ root1)
        diff = s1[0] - s2[0]
        trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
        reference = diff @ diff + np.trace(s1[1]) + np.trace(s2[1]) - 2 * trace_root
        try:
            assert fid.frechet_distance(*s1, *s2) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        except ValueError as e:
            assert "imaginary" in str(e)
        assert fid.frechet_distance_low_rank(*s1, s2[0], f2) == pytest.approx(
            reference, rel=1e-6, abs=1e-6
        )
        assert fid.fid_between(s1, s2, f1, f2) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        assert fid.fid_between(s1, s2, None, f2) == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_small_sample_warning():
    """Fewer samples than feature dimensions warns (pointing to KID) but still returns
    statistics."""
    feats = np.random.default_rng(4).normal(size=(10, fid.FEATURE_DIM))
    with pytest.warns(UserWarning, match="KID"):
        mu, sigma = fid.statistics(feats)
    assert mu.shape == (fid.FEATURE_DIM,) and sigma.shape == (fid.FEATURE_DIM, fid.FEATURE_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when there are enough samples
        fid.statistics(np.random.default_rng(4).normal(size=(40, 8)))


# -----------------------------------------------------------------------------
# KID


def test_kid_same_distribution_near_zero_shifted_positive():
    """KID is ~0 for two samples of one distribution and clearly positive for shifted ones."""
    rng = np.random.default_rng(5)
    d = 64
    a, b = rng.normal(size=(300, d)), rng.normal(size=(300, d))
    mean, std = fid.kid(a, b, num_subsets=20, subset_size=100)
    assert abs(mean) < 3 * std + 1e-3
    shifted_mean, shifted_std = fid.kid(a, b + 1.0, num_subsets=20, subset_size=100)
    assert shifted_mean > 0.1 and shifted_mean > 10 * shifted_std


def test_kid_matches_explicit_unbiased_mmd():
    """With subsets equal to the whole sets, KID is the textbook unbiased MMD^2 (std 0)."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.3
    k = lambda p, q: (p @ q / 5 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = fid.kid(x, y, num_subsets=3, subset_size=7)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_subset_size_is_clamped():
    """A subset larger than the samples is clamped to the smaller set's size, with one warning."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(12, 8)), rng.normal(size=(9, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clamped = fid.kid(a, b, num_subsets=5, subset_size=1000, seed=1)
    assert len(caught) == 1 and "using 9" in str(caught[0].message)
    assert clamped == fid.kid(a, b, num_subsets=5, subset_size=9, seed=1)


# -----------------------------------------------------------------------------
# Images


def test_rgba_compositing_exact_pixels(tmp_path):
    """RGBA is composited onto white (default), black or R,G,B with exact, rounded pixel values."""
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], dtype=np.uint8)
    path = tmp_path / "pixels.png"
    Image.fromarray(rgba, "RGBA").save(path)
    white = fid.load_image_file(path)
    assert white.shape == (1, 3, 3) and white.dtype == np.uint8
    # alpha 128: 200 * 128/255 + 255 * 127/255 = 227.39 -> 227, and so on.
    assert white.tolist() == [[[255, 255, 255], [200, 100, 0], [227, 177, 127]]]
    black = fid.load_image_file(path, fid.parse_background("black"))
    assert black.tolist() == [[[0, 0, 0], [200, 100, 0], [100, 50, 0]]]
    custom = fid.load_image_file(path, fid.parse_background("10,20,30"))
    assert custom.tolist() == [[[10, 20, 30], [200, 100, 0], [105, 60, 15]]]
    # The in-memory path (for the trainer) gives the same pixels.
    assert fid.to_rgb_uint8(rgba, (10, 20, 30)).tolist() == custom.tolist()
    with pytest.raises(fid.FIDError):
        fid.parse_background("1,2")


def test_grayscale_and_palette_images_load_as_rgb(tmp_path):
    """L, LA and P images (with and without a transparent colour) load as (H, W, 3) RGB."""
    Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8), "L").save(tmp_path / "gray.png")
    assert fid.load_image_file(tmp_path / "gray.png").tolist() == [
        [[0, 0, 0], [128, 128, 128], [255, 255, 255]]
    ]

    Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA").save(
        tmp_path / "gray_alpha.png"
    )
    assert fid.load_image_file(tmp_path / "gray_alpha.png", (0, 0, 0)).tolist() == [
        [[0, 0, 0], [50, 50, 50]]
    ]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "palette.png")
    assert fid.load_image_file(tmp_path / "palette.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]
    palette.save(tmp_path / "palette.gif", transparency=1)  # colour 1 is transparent
    assert fid.load_image_file(tmp_path / "palette.gif", (0, 255, 0)).tolist() == [
        [[255, 0, 0], [0, 255, 0]]
    ]


def test_features_do_not_depend_on_batch_size(model):
    """Six images give the same features in batches of 2 as in one batch of 6 (eval-mode
    BatchNorm)."""
    images = random_sprites(6, size=64, seed=8)
    one_batch = fid.features_from_uint8(images, model, batch_size=6)
    three_batches = fid.features_from_uint8(images, model, batch_size=2)
    assert one_batch.shape == (6, fid.FEATURE_DIM) and one_batch.dtype == np.float64
    np.testing.assert_allclose(three_batches, one_batch, rtol=1e-5, atol=1e-5)
    assert np.abs(one_batch[0] - one_batch[1]).max() > 1e-4  # different images, different features


def test_mixed_sizes_folder_matches_pytorch_fid_path(tmp_path, model):
    """A folder of mixed sizes and kinds works, and each image's features equal the pytorch-fid
    path:
    ToTensor of the RGB image, then the network (bilinear resize to 299, 2x - 1)."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    rgb = [
        rng.integers(0, 256, size=s, dtype=np.uint8)
        for s in [(128, 128, 3), (40, 72, 3), (300, 310, 3)]
    ]
    Image.fromarray(rgb[0]).save(folder / "a.png")
    Image.fromarray(rgb[1]).save(folder / "sub" / "b.bmp")  # found recursively, lossless
    Image.fromarray(rgb[2]).save(folder / "c.webp", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    feats = fid.features_from_folder(folder, model, batch_size=3)
    assert feats.shape == (3, fid.FEATURE_DIM)
    with torch.no_grad():
        order = [rgb[0], rgb[2], rgb[1]]  # files are sorted: a.png, c.webp, sub/b.bmp
        for got, im in zip(feats, order):
            x = torch.from_numpy(im).permute(2, 0, 1).float().div(255)[None]
            np.testing.assert_allclose(got, model(x)[0].double().numpy(), rtol=1e-5, atol=1e-5)


def test_fid_kid_in_memory(model):
    """fid_kid on in-memory RGBA uint8 arrays: identical sets give FID ~0 and a finite KID."""
    images = random_sprites(3, size=32, seed=10)
    result = fid.fid_kid(images, images, model, batch_size=3)
    assert set(result) == {"fid", "kid_mean", "kid_std"}
    assert abs(result["fid"]) < 1e-6
    assert np.isfinite(result["kid_mean"]) and np.isfinite(result["kid_std"])
    with pytest.warns(UserWarning, match="KID"):  # 3 images << 2048 dimensions
        feats = fid.features_from_uint8(torch.from_numpy(images), model)  # a tensor works too
        mu, sigma = fid.statistics(feats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


# -----------------------------------------------------------------------------
# Command line


def run_fid_cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "fid.py"), *map(str, args)],
        capture_output=True, cwd=cwd, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300,
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, weights_path):
    """One real command-line run on two folders of 6 random 128x128 RGBA PNGs, with --save-stats."""
    tmp = tmp_path_factory.mktemp("cli")
    a = write_pngs(tmp / "a", random_sprites(6, seed=11))
    b = write_pngs(tmp / "b", random_sprites(6, seed=12))
    stats = tmp / "a_stats.npz"
    result = run_fid_cli(a, b, "--weights", weights_path, "--batch-size", 3, "--save-stats", stats)
    return a, b, stats, result


def printed_fid(stdout):
    return float(stdout.split("FID:")[1].split()[0])


def test_cli_two_folders(cli_run):
    """`python fid.py A B --weights W` prints FID and KID (mean +- std) and exits 0."""
    _, _, _, result = cli_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert np.isfinite(printed_fid(result.stdout)) and printed_fid(result.stdout) > 0
    kid_line = result.stdout.split("KID:")[1].splitlines()[0].split()
    assert len(kid_line) == 3 and all(np.isfinite(float(v)) for v in kid_line[::2])
    assert "KID is the better metric" in result.stderr  # 6 images << 2048 dimensions


def test_cli_save_stats_usable_as_path_a(cli_run, weights_path, capsys):
    """--save-stats writes mu (2048,) and sigma (2048, 2048); the file as PATH_A gives the same FID
    as the folder did, and KID is reported as needing images."""
    a, b, stats, result = cli_run
    with np.load(stats) as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
    # In-process this time, to save a second interpreter start.
    assert fid.main([str(stats), str(b), "--weights", str(weights_path), "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert printed_fid(out) == pytest.approx(printed_fid(result.stdout), rel=1e-4, abs=1e-3)
    assert "KID: not available" in out and "KID needs images" in out


def test_cli_missing_weights_fails_cleanly(tmp_path):
    """No weights anywhere and no download: exit code != 0 and a one-line message, no traceback."""
    a = write_pngs(tmp_path / "a", random_sprites(2, size=16, seed=15))
    result = run_fid_cli(a, a, "--no-download", env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fid.WEIGHTS_NAME in lines[0]


@pytest.mark.parametrize(
    "case", ["missing path", "empty folder", "bad npz", "npz without mu", "broken image"]
)
def test_cli_bad_input_is_one_sentence(tmp_path, weights_path, capsys, case):
    """Bad input exits non-zero with one clear line on stderr, never a traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "missing path":
        args = [tmp_path / "nope", empty]
    elif case == "empty folder":
        args = [empty, empty]
    elif case == "bad npz":
        (tmp_path / "bad.npz").write_bytes(b"garbage")
        args = [tmp_path / "bad.npz", tmp_path / "bad.npz"]
    elif case == "npz without mu":
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        args = [tmp_path / "other.npz", tmp_path / "other.npz"]
    else:
        (empty / "broken.png").write_bytes(b"not a png")
        args = [empty, empty]
    assert fid.main([*map(str, args), "--weights", str(weights_path)]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_cli_scores_a_spriteflow_checkpoint(tmp_path, weights_path):
    """PATH_B may be a SpriteFlow checkpoint: fid.py samples --num-samples sprites from its EMA
    weights and scores them against the folder."""
    data = write_sprites(tmp_path / "d", 4)
    run = sf.train(tiny_config(data, tmp_path / "run", max_steps=2, val_every=2, sample_every=100))
    result = run_fid_cli(
        data, run / "last.pt", "--weights", weights_path, "--num-samples", 3, "--steps", 2,
        "--sampler", "euler", "--batch-size", 4,
    )
    assert result.returncode == 0, result.stderr
    assert np.isfinite(printed_fid(result.stdout)) and "KID:" in result.stdout


# -----------------------------------------------------------------------------
# Sprite-level measures: no network weights at all


def blocky_sprites(n, seed, size=32, block=4, brightness=1.0):
    """n uint8 (n, size, size, 4) sprites of random block-x-block colour cells, 70% opaque;
    brightness < 1 darkens every colour (a shifted distribution)."""
    rng = np.random.default_rng(seed)
    grid = size // block
    cells = np.zeros((n, grid, grid, 4), dtype=np.uint8)
    cells[..., :3] = (rng.integers(0, 256, (n, grid, grid, 3)) * brightness).astype(np.uint8)
    cells[..., 3] = np.where(rng.random((n, grid, grid)) < 0.7, 255, 0)
    return cells.repeat(block, 1).repeat(block, 2)


def test_fid_pixel_art_stats_known_values():
    """fid.pixel_art_stats on two flat colour halves of an 8x8 grid of 4-px blocks: 104 of 112
    neighbouring pairs match and there are 2 colours; a transparent row of blocks only changes the
    counts; an array gives the same as a tensor; speckle scores low."""
    img = np.zeros((1, 32, 32, 4), dtype=np.uint8)
    img[..., 3] = 255
    img[:, :, :16, :3], img[:, :, 16:, :3] = 40, 140
    assert fid.pixel_art_stats(img) == fid.pixel_art_stats(torch.from_numpy(img)) == {
        "flatness": round(104 / 112, 3),
        "colours": 2.0,
    }
    img[:, :4, :, 3] = 0
    assert fid.pixel_art_stats(img) == {"flatness": round(90 / 97, 3), "colours": 2.0}
    speckle = blocky_sprites(1, seed=0, size=32)
    speckle[..., 3] = 255
    assert fid.pixel_art_stats(speckle)["flatness"] < 0.2


def test_saturation_of_grey_red_and_mixed_sprites():
    """HSV saturation (max - min) / max over opaque pixels: grey (and black) sprites give 0, pure
    red
    gives 1, transparent pixels are ignored, and a sprite half red, half grey gives 0.5; the
    standard deviation is over sprites."""
    grey = np.zeros((3, 8, 8, 4), dtype=np.uint8)
    # black, grey, white
    grey[..., :3] = np.array([0, 90, 255], dtype=np.uint8)[:, None, None, None]
    grey[..., 3] = 255
    grey[:, :2, :, :] = [255, 0, 0, 0]  # transparent red pixels do not count
    assert fid.saturation_stats(grey) == {"saturation": 0.0, "saturation_std": 0.0}
    red = np.zeros((2, 8, 8, 4), dtype=np.uint8)
    red[..., 0], red[..., 3] = 200, 255
    assert fid.saturation_stats(torch.from_numpy(red)) == {"saturation": 1.0, "saturation_std": 0.0}
    half = red[:1].copy()
    half[:, :, :4, :3] = 100
    assert fid.saturation_stats(half)["saturation"] == pytest.approx(0.5)
    both = np.concatenate([grey[:1], red[:1]])
    assert fid.saturation_stats(both) == pytest.approx({"saturation": 0.5, "saturation_std": 0.5})


def test_random_feature_distance_is_zero_for_identical_sets_and_deterministic():
    """The random-feature Frechet distance of a set to itself is 0 (to 1e-6); two calls give the
    very same number; the seed picks a different network, hence a different number."""
    a, b = blocky_sprites(12, seed=1), blocky_sprites(12, seed=2)
    assert abs(fid.random_feature_distance(a, a)) < 1e-6
    assert fid.random_feature_distance(a, b) == fid.random_feature_distance(a, b) > 0
    assert fid.random_feature_distance(a, b, seed=1) != fid.random_feature_distance(a, b, seed=0)
    feats = fid.random_features(a)
    assert feats.shape == (12, 2 * sum(fid.RANDOM_WIDTHS)) and feats.dtype == np.float64


def test_random_features_do_not_depend_on_batch_size():
    """A sprite's random features, and so the distance, are the same in batches of 1, 5 or all."""
    a, b = blocky_sprites(10, seed=3), blocky_sprites(10, seed=4)
    f_all = fid.random_features(a, batch_size=64)
    np.testing.assert_allclose(fid.random_features(a, batch_size=1), f_all, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fid.random_features(a, batch_size=5), f_all, rtol=1e-5, atol=1e-7)
    assert fid.random_feature_distance(a, b, batch_size=3) == pytest.approx(
        fid.random_feature_distance(a, b), rel=1e-6
    )


def test_random_feature_distance_is_larger_for_a_shifted_set():
    """Against a reference set, a darker set (colours * 0.6) is farther away than a fresh sample of
    the reference's own distribution."""
    reference = blocky_sprites(16, seed=5)
    same = fid.random_feature_distance(reference, blocky_sprites(16, seed=6))
    shifted = fid.random_feature_distance(reference, blocky_sprites(16, seed=7, brightness=0.6))
    assert 0 < same < shifted / 1.5


def test_nearest_neighbours_find_a_planted_copy():
    """A training sprite planted among the queries is found at RMS distance exactly 0 with its
    index;
    all distances match a brute-force computation in [-1, 1], also with chunks smaller than the
    sets."""
    train = blocky_sprites(9, seed=8)
    queries = blocky_sprites(5, seed=9)
    queries[3] = train[7]
    distances, indices = fid.nearest_neighbours(queries, train, chunk=4)
    assert distances[3] == 0 and indices[3] == 7 and (distances[[0, 1, 2, 4]] > 0).all()
    x, y = (
        sf.to_float(torch.from_numpy(queries)).double(),
        sf.to_float(torch.from_numpy(train)).double(),
    )
    brute = ((x[:, None] - y[None]) ** 2).flatten(2).mean(2).sqrt()  # (5, 9)
    torch.testing.assert_close(distances, brute.min(1).values)
    assert torch.equal(indices, brute.argmin(1))


def test_memorisation_report_flags_a_planted_copy():
    """With one of 4 samples a copy of a training sprite (the rest solid white, far from all), the
    report's smallest sample distance is 0, exactly that sample (a share of 1/4) is closer than
    every held-out sprite, and the sheet puts
    each sample beside its neighbour (4 pairs of 32x32 tiles in one row)."""
    train, val = blocky_sprites(10, seed=10), blocky_sprites(3, seed=11)
    # solid white: far from every blocky sprite
    samples = np.full((4, 32, 32, 4), 255, dtype=np.uint8)
    samples[2] = train[4]
    report = fid.memorisation_report(samples, train, val)
    assert report["samples"]["min"] == 0 and report["held_out"]["min"] == report["threshold"] > 0
    assert report["closer_than_held_out"] == 0.25 and report["indices"][2] == 4
    assert set(report["samples"]) == set(report["held_out"]) == {"min", "p5", "median", "mean"}
    sheet = fid.nearest_sheet(samples, train, report["indices"])
    assert sheet.size == (8 * 32, 32)
    # copy == neighbour
    assert np.array_equal(np.asarray(sheet)[:, 4 * 32:5 * 32], np.asarray(sheet)[:, 5 * 32:6 * 32])


def test_cli_measure_prints_one_json_line(tmp_path):
    """`python fid.py measure SAMPLES --data DATA` (data in subfolders) ends with one JSON line:
    the stats of both sides, the random-feature distance and its data-vs-data floor; --json
    prints only that line."""
    samples = write_pngs(tmp_path / "samples", blocky_sprites(3, seed=13))
    write_pngs(tmp_path / "data" / "orc", blocky_sprites(4, seed=14))
    write_pngs(tmp_path / "data" / "elf", blocky_sprites(4, seed=15))
    result = run_fid_cli("measure", samples, "--data", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    expected_keys = {"n_samples", "n_data", "seed", "samples", "data", "random_fd",
                     "random_fd_data_vs_data"}
    assert expected_keys <= line.keys()
    assert line["n_samples"] == line["n_data"] == 3
    measures = {"flatness", "colours", "saturation", "saturation_std"}
    assert set(line["samples"]) == set(line["data"]) == measures
    assert line["random_fd"] > 0 and line["random_fd_data_vs_data"] > 0
    args = ["measure", samples, "--data", tmp_path / "data", "--json", "--n-data", 8]
    assert fid.main(args) == 0


def test_cli_nearest_reports_and_writes_the_sheet(tmp_path, capsys):
    """`python fid.py nearest SAMPLES --data DATA --sheet OUT.png` names the planted copy, ends
    with a JSON line whose share counts it, and writes the sheet."""
    data = blocky_sprites(8, seed=16)
    write_pngs(tmp_path / "data", data)
    samples = np.full((2, 32, 32, 4), 255, dtype=np.uint8)  # solid white: far from all data
    _, val_idx = sf.split_train_val([f"sprite_{i:03d}.png" for i in range(8)], 0.05)
    train_idx = [i for i in range(8) if i not in val_idx.tolist()]
    samples[1] = data[train_idx[0]]
    write_pngs(tmp_path / "samples", samples)
    args = ["nearest", tmp_path / "samples", "--data", tmp_path / "data",
            "--sheet", tmp_path / "nn.png"]
    assert fid.main(args) == 0
    out = capsys.readouterr().out
    assert f"sprite_001.png  0.0000  sprite_{train_idx[0]:03d}.png" in out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["closer_than_held_out"] == 0.5 and line["n_train"] + line["n_held_out"] == 8
    with Image.open(tmp_path / "nn.png") as sheet:
        assert sheet.size == (4 * 128, 128)


def test_fid_reads_only_the_sprites_of_a_sample_folder(tmp_path):
    """A folder written by `spriteflow.py sample` also holds grid.png, sheet.png and native/: the
    measures must see the sprites only, or every sheet would count as one more (junk) sample."""
    sprites = torch.from_numpy(blocky_sprites(3, seed=21))
    sprites = sprites.permute(0, 3, 1, 2)
    sprites = torch.nn.functional.pad(sprites, (48, 48, 48, 48)).permute(0, 2, 3, 1).contiguous()
    sprites[sprites[..., 3] == 0] = 0  # the loader clears the colour of invisible pixels
    out = tmp_path / "samples"
    out.mkdir()
    sf.write_sprites(out, sprites, native=2)
    images, names, _ = fid.load_sprites(out, "samples")
    assert names == ["sprite_000.png", "sprite_001.png", "sprite_002.png"]
    assert torch.equal(images, sprites)


@pytest.mark.parametrize("case", ["missing samples", "empty samples", "missing data",
                                  "samples is a file", "a second path", "--sheet with measure",
                                  "--n-data with nearest", "no samples"])
def test_cli_sprite_measures_bad_input_is_one_sentence(tmp_path, capsys, case):
    """Bad input to measure/nearest, including flags or paths the subcommand does not take,
    exits with status 2 and one `error: ...` line, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    good = write_pngs(tmp_path / "good", blocky_sprites(2, seed=18))
    (tmp_path / "file.png").write_bytes(b"x")
    args = {"missing samples": ["measure", tmp_path / "nope", "--data", good],
            "empty samples": ["nearest", empty, "--data", good],
            "missing data": ["measure", good, "--data", tmp_path / "nope"],
            "samples is a file": ["nearest", tmp_path / "file.png", "--data", good],
            "a second path": ["measure", good, good, "--data", good],
            "--sheet with measure": ["measure", good, "--sheet", tmp_path / "s.png"],
            "--n-data with nearest": ["nearest", good, "--data", good, "--n-data", 4],
            "no samples": ["measure", "--data", good]}[case]
    assert fid.main(args) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")
    assert captured.out == ""


@pytest.mark.parametrize("side", ["samples", "data"])
def test_cli_empty_folder_error_names_its_side(tmp_path, capsys, side):
    """An empty samples folder is reported as "the samples folder ... holds no ... images", never
    as a "data folder"; an empty data folder as the data folder. Same for measure and nearest."""
    empty = tmp_path / "empty"
    empty.mkdir()
    good = write_pngs(tmp_path / "good", blocky_sprites(2, seed=19))
    samples, data = (empty, good) if side == "samples" else (good, empty)
    for command in ("measure", "nearest"):
        assert fid.main([command, samples, "--data", data]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: The {side} folder {empty} holds no ")
        other = "data" if side == "samples" else "samples"
        assert f"{other} folder" not in err


def test_cli_help_lists_the_subcommands_and_each_its_own_flags(capsys):
    """`fid.py --help` shows the three forms and how to pass a folder named measure;
    `fid.py measure --help` and `fid.py nearest --help` list their own flags, not FID's."""
    helps = {}
    for argv in (["--help"], ["measure", "--help"], ["nearest", "--help"]):
        with pytest.raises(SystemExit) as info:
            fid.main(argv)
        assert info.value.code == 0
        helps[argv[0]] = capsys.readouterr().out
    assert "fid.py measure SAMPLES" in helps["--help"]
    assert "fid.py nearest SAMPLES" in helps["--help"]
    assert "./measure" in helps["--help"] and "--save-stats" in helps["--help"]
    assert "usage: fid.py measure" in helps["measure"] and "--n-data" in helps["measure"]
    assert "usage: fid.py nearest" in helps["nearest"] and "--sheet" in helps["nearest"]
    assert "--save-stats" not in helps["measure"] + helps["nearest"]
    assert "--sheet" not in helps["measure"] and "--n-data" not in helps["nearest"]


def test_cli_first_word_dispatches_to_the_subcommand(monkeypatch):
    """Only an exact first word "measure" or "nearest" runs that subcommand, with its own
    arguments parsed; anything else, "./measure" included, is PATH_A of the FID command."""
    called = []
    for name in ("run_fid", "run_measure", "run_nearest"):
        monkeypatch.setattr(fid, name, lambda args, name=name: called.append((name, args)))
    assert fid.main(["measure", "s", "--n-data", "5", "--seed", "3"]) == 0
    assert fid.main(["nearest", "s", "--sheet", "nn.png", "--json"]) == 0
    assert fid.main(["./measure", "nearest"]) == 0
    assert [name for name, _ in called] == ["run_measure", "run_nearest", "run_fid"]
    measure, nearest, fid_args = (args for _, args in called)
    assert (measure.samples, measure.n_data, measure.seed, measure.json) == ("s", 5, 3, False)
    assert (nearest.samples, nearest.sheet, nearest.json) == ("s", "nn.png", True)
    assert (fid_args.path_a, fid_args.path_b) == ("./measure", "nearest")


def test_cli_folder_named_measure_is_a_path_as_dot_slash(tmp_path, monkeypatch, weights_path,
                                                         capsys):
    """A folder literally named "measure" is scored as PATH_A when written ./measure (its
    statistics are saved), while the bare word is the subcommand, which has no --save-stats."""
    write_pngs(tmp_path / "measure", random_sprites(2, size=16, seed=20))
    monkeypatch.chdir(tmp_path)
    args = ["--save-stats", "m.npz", "--weights", weights_path]
    assert fid.main(["./measure", *args]) == 0
    with np.load(tmp_path / "m.npz") as stats:
        assert stats["mu"].shape == (fid.FEATURE_DIM,)
    assert "saved statistics of ./measure" in capsys.readouterr().out
    assert fid.main(["measure", *args]) == 2
    assert "unrecognized arguments: --save-stats" in capsys.readouterr().err


def test_cli_unknown_flag_is_one_error_line(tmp_path):
    """A flag the command does not know (here --measure, now a subcommand, and --bogus after a
    subcommand) ends the process with status 2 and one `error: ...` line: no usage block, no
    traceback, nothing on stdout."""
    samples = write_pngs(tmp_path / "samples", blocky_sprites(2, seed=22))
    for argv in (["--measure", samples, "--data", samples], ["nearest", samples, "--bogus"]):
        result = run_fid_cli(*argv)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: unrecognized arguments: ")
        unknown = "--bogus" if argv[-1] == "--bogus" else "--measure"
        assert unknown in lines[0]
        assert result.stdout == ""


def test_checkpoint_sampling_defaults_come_from_spriteflow(monkeypatch, capsys):
    """Without --sampler and --steps, sample_checkpoint passes spriteflow.DEFAULT_SAMPLER and
    spriteflow.DEFAULT_STEPS (and sample's default guidance) to spriteflow.generate; the flags,
    when given, win. Those constants are also the defaults of `spriteflow.py sample` itself."""
    calls = []

    def fake_generate(model, noise, labels, guidance, guide, solver, grid, bf16):
        calls.append({"sampler": solver.method, "steps": solver.steps, "seed": solver.seed,
                      "guidance": guidance, "grid": grid, "noise": noise})
        return torch.zeros(len(noise), 128, 128, 4, dtype=torch.uint8)

    ckpt = {"classes": [], "class_counts": [], "grid": 4, "bf16": False}
    single = torch.nn.Identity()
    single.views = 1  # a checkpoint of single sprites
    monkeypatch.setattr(sf, "load_models", lambda path, device: (single, None, ckpt))
    monkeypatch.setattr(sf, "generate", fake_generate)
    monkeypatch.setattr(sf, "DEFAULT_SAMPLER", "euler")
    monkeypatch.setattr(sf, "DEFAULT_STEPS", 3)
    args = fid.fid_parser().parse_args(["data", "run.pt", "--num-samples", "2", "--seed", "7"])
    assert args.sampler is None and args.steps is None  # no defaults of fid.py's own
    images = fid.sample_checkpoint("run.pt", args, "cpu")
    assert images.shape == (2, 128, 128, 4) and images.dtype == np.uint8
    assert (calls[0]["sampler"], calls[0]["steps"], calls[0]["seed"]) == ("euler", 3, 7)
    assert calls[0]["guidance"] == sf.default_guidance(ckpt, None) and calls[0]["grid"] == 4
    assert torch.equal(calls[0]["noise"], sf.gaussian_noise(2, 7))
    assert "(euler, 3 steps, guidance 1, bf16 " in capsys.readouterr().err
    args.sampler, args.steps = "heun", 5
    fid.sample_checkpoint("run.pt", args, "cpu")
    assert (calls[1]["sampler"], calls[1]["steps"]) == ("heun", 5)
    monkeypatch.undo()
    sample = sf.build_parser().parse_args(["sample"])
    assert (sample.sampler, sample.steps) == (sf.DEFAULT_SAMPLER, sf.DEFAULT_STEPS)


def test_view_consistency_is_0_for_views_of_one_palette_and_1_for_disjoint_palettes():
    """D(a, b) = 1/2 sum |h_a - h_b| over 8-level colour histograms of opaque pixels: views
    that rearrange one character's colours are at distance 0 whatever their shapes, and
    characters with no colour in common are strangers at distance 1; transparent pixels
    do not count."""
    rng = np.random.default_rng(0)
    chars = np.zeros((3, 4, 16, 16, 4), np.uint8)
    for i in range(3):
        base = np.full((16, 16, 4), 255, np.uint8)
        base[:8, :, :3] = (64 * i, 0, 0)
        base[8:, :, :3] = (64 * i, 255, 0)
        for k in range(4):
            chars[i, k] = rng.permutation(base.reshape(-1, 4)).reshape(16, 16, 4)
    chars[0, 1, 0, :, 3] = 0  # a transparent row does not count,
    chars[0, 1, 1:9, :, :3] = 0  # and half of view 1 turns to the character's first colour
    result = fid.view_consistency(chars)
    assert result["strangers"] == 1.0 and result["empty_views"] == 0
    assert result["pairs"]["2-3"] == [0.0, 1.0]
    assert result["own_per_character"][1] == 0.0 and result["own_per_character"][0] > 0


def test_fid_views_reads_character_folders_and_views_sample_folders(tmp_path, capsys):
    """`fid.py views` takes character folders (V from their file count) and the folder that
    `sample` writes for a views checkpoint (characters and views from sheet.json), one JSON
    line each; a folder of single sprites is one sentence."""
    write_characters(tmp_path / "chars", 3, 2)
    sprites = torch.from_numpy(np.stack([sf.load_rgba(p) for p in
                                         sorted((tmp_path / "chars").rglob("*.png"))]))
    (tmp_path / "s").mkdir()
    sf.write_sprites(tmp_path / "s", sprites, views=2)
    assert fid.main(["views", tmp_path / "chars", tmp_path / "s", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["n_characters"] for r in lines] == [3, 3] and lines[0]["views"] == 2
    assert lines[0]["own"] == lines[1]["own"] and lines[0]["strangers"] == lines[1]["strangers"]
    (tmp_path / "single").mkdir()
    sf.write_sprites(tmp_path / "single", sprites)
    assert fid.main(["views", tmp_path / "single"]) == 2
    assert "names no views" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Docs: every link in the front page and the lab record resolves, no figure is orphaned

DOCS = ("README.md", "data/figures/README.md")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def heading_anchors(path):
    """GitHub's anchors: lowercase, punctuation but '-' and '_' dropped, spaces to '-',
    a repeated heading numbered -1, -2, ..."""
    anchors, seen = set(), {}
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def doc_links(doc):
    """(target file, anchor) for every relative Markdown link or image outside code blocks."""
    path = ROOT / doc
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not ours to check
            continue
        file, _, anchor = target.partition("#")
        yield (Path(os.path.normpath(path.parent / file)) if file else path), anchor


def test_doc_links_resolve_and_no_figure_is_orphaned():
    """Every relative link and image in the front page and the lab record names an existing
    file (and, for a .md with #anchor, a heading with that anchor); every file in data/figures/
    is linked from one of them; the lab record stays within 900 lines."""
    linked, broken, anchors = set(), [], {}
    for doc in DOCS:
        for target, anchor in doc_links(doc):
            linked.add(target)
            if not target.exists():
                broken.append(f"{doc}: {target.name}")
            elif anchor and target.suffix == ".md":
                if target not in anchors:
                    anchors[target] = heading_anchors(target)
                if anchor not in anchors[target]:
                    broken.append(f"{doc}: {target.name}#{anchor}")
    assert broken == []
    figures = ROOT / "data" / "figures"
    orphans = [f.name for f in figures.iterdir() if f.name != "README.md" and f not in linked]
    assert orphans == []
    assert len((figures / "README.md").read_text(encoding="utf-8").splitlines()) <= 900
