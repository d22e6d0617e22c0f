"""Tests for fid.py. Random Inception weights only: nothing is downloaded.

The real network at 299x299 is slow on a CPU, so every test that runs it uses
a handful of images and one thread."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import linalg

import fid

HERE = Path(__file__).resolve().parent
SHAPES_JSON = HERE.parent / "shared" / "fid" / "pt_inception-2015-12-05_state_dict.json"

torch.set_num_threads(1)  # on a small shared CPU, one thread is the fastest for these tiny batches


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
    """n random RGBA uint8 sprites (n, size, size, 4) with a transparent border, like real sprites."""
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
    """A .pth with exactly the listed keys/shapes loads through load_inception(weights=...) with strict=True."""
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
    """No --weights, an empty torch hub cache and no download: FIDError naming where the file goes."""
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
    """The download keeps the file only when its SHA-256 starts with the 8 hex digits in its name."""
    import hashlib
    payload = b"not really inception weights"
    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload))
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
    symmetric = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sqrt(linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(direct, rel=1e-9)
    assert got == pytest.approx(symmetric, rel=1e-8)


def test_frechet_pytorch_fid_test_vector():
    """pytorch-fid's check: mu1 = 0, mu2 = 1, sigma1 = sigma2 = I in 2048-d gives exactly 2048."""
    d = fid.FEATURE_DIM
    assert fid.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(2048.0, abs=1e-6)


def test_frechet_singular_covariances_stay_finite(monkeypatch):
    """Singular covariances give a finite FID; when sqrtm is not finite, the eps * I retry runs and warns."""
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
    """A square root with imaginary diagonal parts above 1e-3 (here: sqrtm(-I) = iI) raises ValueError."""
    d = 5
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), -np.eye(d))


@settings(max_examples=10, deadline=None)
@given(n1=st.integers(3, 12), n2=st.integers(3, 60), seed=st.integers(0, 2**32 - 1))
def test_low_rank_route_matches_sqrtm_route(n1, n2, seed):
    """The fast route used for small sample counts gives the same FID as frechet_distance (sqrtm)."""
    rng = np.random.default_rng(seed)
    d = 24
    f1, f2 = rng.normal(size=(n1, d)), rng.gamma(2.0, size=(n2, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1, s2 = fid.statistics(f1), fid.statistics(f2)
        reference = fid.frechet_distance(*s1, *s2)
        assert fid.frechet_distance_low_rank(*s1, s2[0], f2) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        assert fid.fid_between(s1, s2, f1, f2) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        assert fid.fid_between(s1, s2, None, f2) == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_small_sample_warning():
    """Fewer samples than feature dimensions warns (pointing to KID) but still returns statistics."""
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
    assert fid.load_image_file(tmp_path / "gray.png").tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]

    Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA").save(tmp_path / "gray_alpha.png")
    assert fid.load_image_file(tmp_path / "gray_alpha.png", (0, 0, 0)).tolist() == [[[0, 0, 0], [50, 50, 50]]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "palette.png")
    assert fid.load_image_file(tmp_path / "palette.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]
    palette.save(tmp_path / "palette.gif", transparency=1)  # colour 1 is transparent
    assert fid.load_image_file(tmp_path / "palette.gif", (0, 255, 0)).tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_features_do_not_depend_on_batch_size(model):
    """Six images give the same features in batches of 2 as in one batch of 6 (eval-mode BatchNorm)."""
    images = random_sprites(6, size=64, seed=8)
    one_batch = fid.features_from_uint8(images, model, batch_size=6)
    three_batches = fid.features_from_uint8(images, model, batch_size=2)
    assert one_batch.shape == (6, fid.FEATURE_DIM) and one_batch.dtype == np.float64
    np.testing.assert_allclose(three_batches, one_batch, rtol=1e-5, atol=1e-5)
    assert np.abs(one_batch[0] - one_batch[1]).max() > 1e-4  # different images, different features


def test_mixed_sizes_folder_matches_pytorch_fid_path(tmp_path, model):
    """A folder of mixed sizes and kinds works, and each image's features equal the pytorch-fid path:
    ToTensor of the RGB image, then the network (bilinear resize to 299, 2x - 1)."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    rgb = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(128, 128, 3), (40, 72, 3), (300, 310, 3)]]
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
        mu, sigma = fid.feature_stats_from_uint8(torch.from_numpy(images), model)  # a tensor works too
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


# -----------------------------------------------------------------------------
# Command line


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "fid.py"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, weights_path):
    """One real command-line run on two folders of 6 random 128x128 RGBA PNGs, with --save-stats."""
    tmp = tmp_path_factory.mktemp("cli")
    a = write_pngs(tmp / "a", random_sprites(6, seed=11))
    b = write_pngs(tmp / "b", random_sprites(6, seed=12))
    stats = tmp / "a_stats.npz"
    result = run_cli(a, b, "--weights", weights_path, "--batch-size", 3, "--save-stats", stats)
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
    result = run_cli(a, a, "--no-download", env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fid.WEIGHTS_NAME in lines[0]


@pytest.mark.parametrize("case", ["missing path", "empty folder", "bad npz", "npz without mu", "broken image"])
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
