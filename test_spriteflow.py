"""Tests for SpriteFlow, to be read as a second lesson.

Part 1 checks the mathematics with property tests: each docstring names the
identity it checks. Part 2 drives the samplers with a vector field we know in
closed form. Part 3 checks what a user relies on: the loader, the network,
training, checkpoints and the command line. Part 4 (further down) covers fid.py.

Run with:  python -m pytest -q
"""

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

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
    z, eps = tensors(seed, (2, *shape), torch.float32), tensors(seed + 1, (2, *shape), torch.float32)
    assert torch.equal(sf.sample_path(z, torch.zeros(2), eps, name), eps)
    assert torch.equal(sf.sample_path(z, torch.ones(2), eps, name), z)


@given(schedules, times, seeds, shapes)
def test_conditional_vector_field_is_time_derivative_of_path(name, t0, seed, shape):
    """u_t(x_t | z) = d/dt x_t for fixed (z, eps), with the derivative from forward-mode autograd."""
    z, eps = tensors(seed, (3, *shape)), tensors(seed + 1, (3, *shape))
    t = torch.full((3,), t0, dtype=torch.float64)
    _, dx_dt = torch.func.jvp(lambda s: sf.sample_path(z, s, eps, name), (t,), (torch.ones_like(t),))
    assert torch.allclose(sf.conditional_vector_field(z, t, eps, name), dx_dt, atol=1e-10)


@given(schedules, inner_times, seeds, shapes)
def test_conditional_score_is_gradient_of_log_density(name, t0, seed, shape):
    """grad_x log N(x; alpha_t z, beta_t^2 I) from autograd equals -(x - alpha_t z) / beta_t^2."""
    z = tensors(seed, (2, *shape))
    x = tensors(seed + 1, (2, *shape)).requires_grad_(True)
    t = torch.full((2,), t0, dtype=torch.float64)
    alpha, beta, _, _ = sf.schedule(name, sf.expand(t, x))
    d = x[0].numel()
    log_p = (-((x - alpha * z) ** 2) / (2 * beta**2)).flatten(1).sum(1) - d * torch.log(beta.flatten()) - d / 2 * math.log(2 * math.pi)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    assert torch.allclose(sf.conditional_score(x.detach(), z, t, name), grad, rtol=1e-9, atol=1e-9)


@given(schedules, inner_times, seeds, shapes)
def test_vector_field_to_score_recovers_conditional_score(name, t0, seed, shape):
    """score_from_vector_field(u_t(x | z), x) = grad log p_t(x | z) at points x on the path."""
    z, eps = tensors(seed, (2, *shape)), tensors(seed + 1, (2, *shape))
    t = torch.full((2,), t0, dtype=torch.float64)
    x = sf.sample_path(z, t, eps, name)
    u = sf.conditional_vector_field(z, t, eps, name)
    assert torch.allclose(sf.score_from_vector_field(u, x, t, name), sf.conditional_score(x, z, t, name), rtol=1e-8, atol=1e-8)


@given(schedules, st.floats(0.0, 0.94), seeds, shapes)
def test_data_prediction_maps_to_the_conditional_vector_field(name, t0, seed, shape):
    """velocity_from_data(z, x_t) = d_alpha z + d_beta eps wherever beta_t >= BETA_MIN, so a
    perfect x-prediction is a perfect velocity."""
    z, eps = tensors(seed, (2, *shape)), tensors(seed + 1, (2, *shape))
    t = torch.full((2,), t0, dtype=torch.float64)
    if sf.schedule(name, t)[1][0] < sf.BETA_MIN:
        return
    x = sf.sample_path(z, t, eps, name)
    assert torch.allclose(sf.velocity_from_data(z, x, t, name), sf.conditional_vector_field(z, t, eps, name), atol=1e-9)


# -----------------------------------------------------------------------------
# Part 2: samplers against a closed-form Gaussian
#
# If the data are z ~ N(mu, s^2 I), then x_t = alpha z + beta eps is Gaussian
# with mean alpha mu and variance v_t = alpha^2 s^2 + beta^2, and the marginal
# vector field (the flow-matching minimiser) is known exactly:
#     u_t(x) = d_alpha mu + (alpha d_alpha s^2 + beta d_beta) / v_t (x - alpha mu)
# Its flow maps X_0 = xi to exactly X_1 = mu + s xi. The marginal score is
# -(x - alpha mu) / v_t.
# -----------------------------------------------------------------------------

MU, S = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.5


def gaussian_velocity(name):
    def u(x, t):
        alpha, beta, d_alpha, d_beta = sf.schedule(name, sf.expand(t.double(), x))
        v = alpha**2 * S**2 + beta**2
        return d_alpha * MU + (alpha * d_alpha * S**2 + beta * d_beta) / v * (x - alpha * MU)
    return u


def noise(n=20000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sf.SCHEDULES)
@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_samplers_carry_noise_to_the_gaussian(name, sampler):
    """Driven by the exact marginal field, each sampler maps N(0, I) to N(mu, s^2 I)."""
    u, x0 = gaussian_velocity(name), noise()
    if sampler == "euler":
        x1 = sf.sample_euler(u, x0, 200)
    elif sampler == "heun":
        x1 = sf.sample_heun(u, x0, 50)
    else:
        x1 = sf.sample_sde(u, x0, 400, name, sigma=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x1.mean(0), MU, atol=0.02)
    assert torch.allclose(x1.var(0), torch.full((2,), S**2, dtype=torch.float64), rtol=0.06)


def test_sde_with_exact_score_matches_sde_with_converted_score():
    """The SDE driven by the true marginal score -(x - alpha mu)/v_t and the one driven by the
    score converted from the vector field take identical steps."""
    u = gaussian_velocity("linear")

    def true_score(x, t):
        alpha, beta, _, _ = sf.schedule("linear", sf.expand(t.double(), x))
        return -(x - alpha * MU) / (alpha**2 * S**2 + beta**2)

    a = sf.sample_sde(u, noise(100), 50, "linear", generator=torch.Generator().manual_seed(3))
    b = sf.sample_sde(u, noise(100), 50, "linear", score=true_score, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-10)


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


def test_sde_draws_gaussian_noise_once_per_step():
    """With zero drift and zero score, Var[X_1] = sum_i sigma_{t_i}^2 h, which tends to
    integral_0^1 sigma_t^2 dt = sigma^2/3 for sigma_t = sigma (1 - t). Noise drawn twice per
    step would double it. One step's increment is Gaussian: kurtosis 3 (uniform noise has 1.8)."""
    zero = lambda x, t: torch.zeros_like(x)
    n, steps, sigma = 40000, 200, 1.5
    x = sf.sample_sde(zero, torch.zeros(n, 1, dtype=torch.float64), steps, "linear", sigma=sigma,
                      score=zero, generator=torch.Generator().manual_seed(0))
    riemann = sigma**2 * sum((1 - i / steps) ** 2 for i in range(steps)) / steps
    assert abs(x.var().item() - riemann) / riemann < 0.04
    assert abs(riemann - sigma**2 / 3) / (sigma**2 / 3) < 0.01
    one = sf.sample_sde(zero, torch.zeros(n, 1, dtype=torch.float64), 1, "linear", sigma=1.0,
                        score=zero, generator=torch.Generator().manual_seed(1))
    kurtosis = ((one - one.mean()) ** 4).mean() / one.var() ** 2
    assert abs(kurtosis.item() - 3.0) < 0.15


@pytest.mark.parametrize("name", sf.SCHEDULES)
def test_sde_stays_finite_near_the_data_end(name):
    """Near t = 1 the score of a nearly deterministic target grows like 1/beta; sigma_t =
    sigma beta_t keeps the drift finite even with 2,000 steps and a data spread of 1e-3."""
    global S
    old, S = S, 1e-3
    try:
        x = sf.sample_sde(gaussian_velocity(name), noise(500), 2000, name, generator=torch.Generator().manual_seed(0))
    finally:
        S = old
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), MU, atol=1e-2)


# -----------------------------------------------------------------------------
# Part 3: training helpers, data, network, trainer, command line
# -----------------------------------------------------------------------------


def test_ema_decay_warms_up_and_update_is_exact():
    """d_k = min(d, (1 + k)/(10 + k)); theta_ema <- d theta_ema + (1 - d) theta."""
    assert sf.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert sf.ema_decay(90, 0.999) == pytest.approx(91 / 100)
    assert sf.ema_decay(10**6, 0.999) == 0.999
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    d = sf.ema_update(ema, model, 5, 0.999)
    assert d == pytest.approx(6 / 15)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, d * b + (1 - d) * p)


@given(st.integers(1, 500), st.integers(501, 5000), st.floats(1e-5, 1e-2))
def test_lr_schedule_warmup_then_cosine(warmup, max_steps, base):
    """LR rises linearly to the peak over `warmup` steps, then decays monotonically by a
    cosine to 10% of the peak at max_steps."""
    lrs = [sf.lr_at(k, base, warmup, max_steps) for k in range(max_steps + 1)]
    assert lrs[0] == pytest.approx(base / warmup)
    assert lrs[warmup - 1] == pytest.approx(base)
    assert lrs[max_steps] == pytest.approx(0.1 * base)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))
    mid = warmup + (max_steps - warmup) // 2
    assert lrs[mid] == pytest.approx(base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (max_steps - warmup)))))


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
    assert np.array_equal(rgba, checker_rgba().repeat(4, 0).repeat(4, 1) * (checker_rgba()[..., 3:] > 0).repeat(4, 0).repeat(4, 1))


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
        x, names = sf.load_folder(tmp_path / "d")
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


def tiny_unet(unshuffle=4, target="data"):
    torch.manual_seed(0)
    return sf.UNet(channels=(16, 32), blocks=1, unshuffle=unshuffle, target=target)


@pytest.mark.parametrize("unshuffle", [1, 2, 4])
def test_unet_shape_zero_init_and_time_dependence(unshuffle):
    """Output has the input's shape (B, 4, 128, 128); the zero-initialised head outputs exactly
    0; once the zero-initialised layers are perturbed (as training does), changing t changes
    the output."""
    model = tiny_unet(unshuffle).eval()
    x = torch.randn(2, 4, 128, 128)
    with torch.no_grad():
        out = model(x, torch.full((2,), 0.3))
        assert out.shape == x.shape and (out == 0).all()
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        a, b = model(x, torch.full((2,), 0.3)), model(x, torch.full((2,), 0.7))
    assert (a - b).abs().max() > 1e-4


def test_unet_has_no_batchnorm_and_samples_do_not_see_each_other():
    """GroupNorm only: a sprite's output does not depend on the rest of its batch."""
    model = tiny_unet()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(3, 4, 128, 128), torch.rand(3)
    with torch.no_grad():
        assert torch.allclose(model(x, t)[:1], model(x[:1], t[:1]), atol=1e-5)


def test_tiny_model_overfits_a_handful_of_sprites():
    """A small U-Net trained on 4 sprites drives the flow-matching loss, at fixed (t, eps),
    far below its starting value."""
    z = sf.to_float(torch.from_numpy(np.stack([checker_rgba(32, 32, 4, s).repeat(4, 0).repeat(4, 1) for s in range(4)])).permute(0, 3, 1, 2))
    model = tiny_unet(target="data")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t_fix, eps_fix = torch.rand(32, generator=g) * 0.9, torch.randn(32, 4, 128, 128, generator=g)
    z_fix = z.repeat(8, 1, 1, 1)

    def fixed_loss():
        with torch.no_grad():
            return sf.flow_matching_loss(model, z_fix, t_fix, eps_fix, "data", "linear").mean().item()

    start = fixed_loss()
    for _ in range(80):
        t, eps = torch.rand(8, generator=g), torch.randn(8, 4, 128, 128, generator=g)
        loss = sf.flow_matching_loss(model, z.repeat(2, 1, 1, 1), t, eps, "data", "linear").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.2 * start


def tiny_config(data, run_dir, **kw):
    base = dict(data=str(data), run_dir=str(run_dir), max_steps=6, batch_size=4, channels="16,32", blocks=1,
                log_every=2, val_every=3, sample_every=6, sample_steps=2, warmup=2)
    base.update(kw)
    return sf.TrainConfig(**base)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Stop at step 3, resume to step 6: model, EMA and optimizer state equal those of a run
    that went straight to step 6 (RNG, LR schedule and step count are all restored)."""
    data = write_sprites(tmp_path / "d", 6)
    straight = sf.train(tiny_config(data, tmp_path / "a"))
    sf.train(tiny_config(data, tmp_path / "b"), stop_after=3)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    resumed = sf.train(tiny_config(data, tmp_path / "b", resume=True))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    rows = (tmp_path / "b" / "training_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr,grad_norm,img_per_s,val_loss,loss_t0")
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "6"]


def test_seed_makes_runs_reproducible_and_checkpoints_load_safely(tmp_path):
    """Two runs with one seed give identical weights; checkpoints load with weights_only=True
    and hold model, EMA, optimizer, step, RNG state and config."""
    data = write_sprites(tmp_path / "d", 5)
    a = torch.load(sf.train(tiny_config(data, tmp_path / "a", max_steps=3)) / "last.pt", weights_only=True)
    b = torch.load(sf.train(tiny_config(data, tmp_path / "b", max_steps=3)) / "last.pt", weights_only=True)
    assert set(a) >= {"model", "ema", "optimizer", "step", "rng", "config", "best_val"}
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert (tmp_path / "a" / "best.pt").exists() and list((tmp_path / "a" / "samples").glob("*.png")) == []


def run_cli(*args, cwd, timeout=120, **kw):
    env = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "spriteflow.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def test_cli_trains_then_samples_then_plots(tmp_path):
    """`train` writes a log, a sample grid and checkpoints; `sample` with no checkpoint option
    finds the newest under runs/ and writes 128x128 RGBA sprites, a sheet and a trajectory;
    `plot` draws the log."""
    write_sprites(tmp_path / "imgs", 6)
    r = run_cli("train", "--data", "imgs", "--max-steps", "4", "--batch-size", "2", "--channels", "16,32",
                "--blocks", "1", "--log-every", "2", "--val-every", "2", "--sample-every", "4", "--sample-steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = next((tmp_path / "runs").iterdir())
    assert {"last.pt", "best.pt", "training_log.csv", "samples"} <= {p.name for p in run.iterdir()}
    assert (run / "samples" / "step_0000004.png").exists() and "step 4/4" in r.stderr
    r = run_cli("sample", "--n", "3", "--steps", "2", "--out", "out", "--trajectory", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sprites = sorted((tmp_path / "out").glob("sprite_*.png"))
    assert len(sprites) == 3
    with Image.open(sprites[0]) as im:
        assert im.size == (128, 128) and im.mode == "RGBA"
        assert set(np.unique(np.array(im)[..., 3])) <= {0, 255}
    assert (tmp_path / "out" / "grid.png").exists() and (tmp_path / "out" / "trajectory.gif").exists()
    r = run_cli("plot", str(run), cwd=tmp_path)
    assert r.returncode == 0 and (run / "training_log.png").exists(), r.stderr


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "missing checkpoint", "corrupt checkpoint",
                                  "no runs", "bad value", "bad choice", "unknown flag", "existing run"])
def test_bad_input_is_one_clear_sentence(tmp_path, case):
    """Each bad input ends with a non-zero exit and a short message, never a traceback; an
    existing run's checkpoint is left untouched."""
    (tmp_path / "empty").mkdir()
    write_sprites(tmp_path / "imgs", 2)
    (tmp_path / "bad.pt").write_bytes(b"\x00 not a checkpoint")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"precious")
    args = {"missing folder": ["train", "--data", "nope"], "empty folder": ["train", "--data", "empty"],
            "missing checkpoint": ["sample", "--checkpoint", "gone.pt"], "corrupt checkpoint": ["sample", "--checkpoint", "bad.pt"],
            "no runs": ["sample"], "bad value": ["train", "--data", "imgs", "--lr", "-1"],
            "bad choice": ["sample", "--checkpoint", "bad.pt", "--sampler", "rk4"], "unknown flag": ["train", "--wat"],
            "existing run": ["train", "--data", "imgs", "--run-dir", "run"]}[case]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert len(r.stderr.strip().splitlines()) <= 3
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"precious"


def test_corrupt_checkpoint_on_resume_is_refused_and_kept(tmp_path):
    """--resume on a corrupt last.pt stops with a message and does not overwrite the file."""
    data = write_sprites(tmp_path / "d", 3)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pt").write_bytes(b"half-written")
    with pytest.raises(sf.UserError, match="corrupt"):
        sf.train(tiny_config(data, tmp_path / "r", resume=True))
    assert (tmp_path / "r" / "last.pt").read_bytes() == b"half-written"


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """SIGINT during training saves last.pt and exits with status 0 and no traceback."""
    write_sprites(tmp_path / "imgs", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "spriteflow.py"), "train", "--data", "imgs", "--run-dir", "r",
                             "--max-steps", "100000", "--batch-size", "2", "--channels", "16,32", "--blocks", "1",
                             "--log-every", "1", "--val-every", "100000", "--sample-every", "100000"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # wait until a few steps have run
        lines.append(line)
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, rest
    assert "interrupted at step" in rest and "Traceback" not in rest
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert ckpt["step"] >= 3


def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    """DDP over gloo: 2 ranks each train on their own shard; gradients are averaged, so both
    end with identical weights (checked in-process by an all-reduce max == min)."""
    write_sprites(tmp_path / "imgs", 8)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        str(ROOT / "spriteflow.py"), "train", "--data", "imgs", "--run-dir", "r", "--max-steps", "3",
                        "--batch-size", "2", "--channels", "16,32", "--blocks", "1", "--log-every", "1", "--val-every", "3",
                        "--sample-every", "100"], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights identical across 2 ranks: True" in r.stderr
    assert "x2" in r.stderr and (tmp_path / "r" / "last.pt").exists()
    assert len((tmp_path / "r" / "training_log.csv").read_text().strip().splitlines()) == 4  # rank 0 alone logs


def test_generate_is_seeded_and_binary_alpha():
    """generate() returns uint8 (N, 128, 128, 4) with alpha in {0, 255}, RGB 0 where
    transparent, and the same sprites for the same seed, for every sampler."""
    model = tiny_unet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for sampler in sf.SAMPLERS:
        a = sf.generate(model, 3, steps=2, sampler=sampler, seed=5)
        b = sf.generate(model, 3, steps=2, sampler=sampler, seed=5)
        assert a.shape == (3, 128, 128, 4) and a.dtype == torch.uint8 and torch.equal(a, b)
        assert set(a[..., 3].unique().tolist()) <= {0, 255}
        assert (a[..., :3][a[..., 3] == 0] == 0).all()
