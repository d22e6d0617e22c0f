"""fid.py: FID and KID for SpriteFlow, written out in plain torch, numpy and scipy.

How good are the sprites a model draws? Looking at them is the best test, but a
number helps to compare runs. The usual numbers compare two *sets* of images
(real sprites and generated ones) through the eyes of a fixed image network,
Inception-v3, trained on ImageNet in 2015. Every image becomes a 2048-number
feature vector (the network's last pooling layer); the two sets become two
clouds of points in 2048-d space, and we measure how far apart the clouds are.

    python fid.py data/images samples/                  # two folders of images
    python fid.py data/images runs/20261126-150000/last.pt   # sample 1000 sprites, score them
    python fid.py data/images --save-stats real.npz     # cache the real set's statistics
    python fid.py real.npz samples/ --background black  # FID against cached statistics

A checkpoint (the trainer writes runs/<date-time>/last.pt and best.pt) is
sampled with the sampler, step count and guidance weight that `spriteflow.py
sample` uses by default; --sampler and --steps override the first two.

Weight-free sprite measures (section 6; nothing to download, seconds on a CPU):

    python fid.py measure samples/ --data data/images   # pixel-art, saturation, random-feature FD
    python fid.py nearest samples/ --data data/images --sheet nn.png   # memorisation check
    python fid.py views data/turnarounds samples/        # do one character's views agree?

FID, the Frechet Inception Distance (Heusel et al., 2017), fits a Gaussian to
each cloud (mean mu, covariance sigma) and takes the Frechet (2-Wasserstein)
distance between the two Gaussians:

    FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

0 means identical statistics; lower is better. FID is biased: with few images
it comes out too high, and a 2048x2048 covariance estimated from fewer than
2048 images is singular. Compare FIDs only at the same number of images.

KID, the Kernel Inception Distance (Binkowski et al., 2018), is the squared
maximum mean discrepancy (MMD^2) between the clouds with the polynomial
kernel k(x, y) = (x.y / d + 1)^3, d = 2048:

    KID = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)

over pairs of distinct real images x, x', distinct generated images y, y'
and all real/generated pairs. This estimate is unbiased, so KID is the better
number for a few hundred images. We average it over random subsets and
report mean +- standard deviation.

The numbers match pytorch-fid (https://github.com/mseitzer/pytorch-fid) for
RGB images: the same network, the same weights file, the same preprocessing
and the same FID formula. Two differences, both documented where they
happen: RGBA sprites are first flattened onto a background (white unless
--background says otherwise; pytorch-fid would drop the alpha channel),
and with fewer images than 2048 we evaluate the FID formula through a small
matrix (frechet_distance_low_rank), which gives the same value to about
1e-6 in seconds instead of minutes.

From Python, on in-memory sprites:

    import fid
    inception = fid.load_inception(device="cuda", allow_download=False)  # FIDError if no weights
    scores = fid.fid_kid(real_uint8, fake_uint8, inception)  # (N, 128, 128, 4) uint8 arrays
    scores["fid"], scores["kid_mean"], scores["kid_std"]
"""

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageColor
from scipy import linalg

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
RELEASES = "https://github.com/mseitzer/pytorch-fid/releases/download"
WEIGHTS_URL = f"{RELEASES}/fid_weights/{WEIGHTS_NAME}"
FEATURE_DIM = 2048
INCEPTION_SIZE = 299
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
NO_DOWNLOAD_ENV = "SPRITEFLOW_FID_NO_DOWNLOAD"  # set to 1 to forbid the download


class FIDError(Exception):
    """Bad input (a missing file, an empty folder, no weights...): the command
    line prints the message as one sentence, without a traceback."""


# -----------------------------------------------------------------------------
# 1. The network: Inception-v3 as the FID weights expect it
#
# The FID weights were converted from the 2015 TensorFlow graph. That graph
# differs from torchvision's Inception-v3 in a few pooling layers, so
# pytorch-fid defines "FID" variants of three block types. We write the whole
# network out here (no torchvision). Attribute names must match the keys of
# the weights file exactly ("Mixed_5b.branch1x1.conv.weight", ...), so that
# load_state_dict(strict=True) accepts it.
#
# The blocks all follow one pattern: several parallel branches of
# convolutions look at the same input, and their outputs are concatenated
# along the channel axis.


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> BatchNorm (eps 0.001, as TensorFlow had) -> ReLU."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    """3x3 average pool, stride 1, that keeps the size. count_include_pad=False:
    at the border, average only the real pixels, not the zero padding. This is
    the main 'FID' difference from torchvision's blocks (which count the zeros)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35x35 -> 17x17 reduction: stride-2 3x3 | 1x1->3x3->3x3 (stride 2) | maxpool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e (17x17). A 7x7 convolution is factored into a 1x7 and a 7x1
    one, which is cheaper: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool->1x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(bd)))
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17x17 -> 8x8 reduction, three branches concatenated:
    1x1->3x3 (stride 2) | 1x1->1x7->7x1->3x3 (stride 2) | maxpool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class FIDInceptionE(nn.Module):
    """Mixed_7b and Mixed_7c (8x8). The 3x3 branches split in two at the end: a
    1x3 and a 3x1 convolution both read the same input, and both outputs are
    kept. 1x1 | 1x1->(1x3, 3x1) | 1x1->3x3->(1x3, 3x1) | pool->1x1.

    The pool differs between the two FID blocks, a quirk of the TensorFlow
    graph: Mixed_7b ("E_1") average-pools without counting the padding,
    Mixed_7c ("E_2") max-pools (3x3, stride 1, padding 1)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool  # "avg" or "max"
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


def resize_for_inception(x):
    """Step 1 of the preprocessing: bilinear resize of [0, 1] images to 299x299.

    Exactly pytorch-fid's call: align_corners=False and no antialiasing (so a
    big image is subsampled, not blurred first). A 128x128 sprite is scaled up
    by 299/128, which blurs its hard pixel edges a little; the network was
    trained on photos, so this is what it expects to see anyway. Resizing a
    299x299 image to 299x299 returns it unchanged."""
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to its 2048-d pool features, as pytorch-fid uses it.

    forward(x): x is a float tensor (N, 3, H, W) of RGB images in [0, 1], any
    H and W. Returns (N, 2048) float32 features. Call .eval() first (load_inception
    does): in eval mode BatchNorm uses its stored statistics, so an image's
    features do not depend on the other images in its batch."""

    def __init__(self):
        super().__init__()
        # Stem: 299x299x3 -> 35x35x192.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)  # -> 149x149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)  # -> 147x147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        # (max-pool 3x3 stride 2 -> 73x73)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)  # -> 71x71
        # (max-pool 3x3 stride 2 -> 35x35)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)  # -> 256 channels
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)  # -> 288
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)  # -> 288
        self.Mixed_6a = InceptionB(288)  # -> 17x17x768
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)  # -> 8x8x1280
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")  # -> 8x8x2048
        self.Mixed_7c = FIDInceptionE(2048, pool="max")  # -> 8x8x2048
        # The ImageNet classifier (1008 classes in the 2015 graph). It is in
        # the weights file, so it must exist for a strict load, but FID never
        # uses it: the features are taken before it.
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x):
        x = resize_for_inception(x.float())  # step 1: [0, 1] image at 299x299
        x = 2 * x - 1  # step 2: [0, 1] -> [-1, 1], the range the network was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        x = F.adaptive_avg_pool2d(x, output_size=(1, 1))  # 8x8x2048 -> 1x1x2048
        return x.flatten(1)


# -----------------------------------------------------------------------------
# 2. The weights (91 MiB): --weights PATH, else the torch hub cache, else download once


def cached_weights_path():
    """Where torch hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints,
    by default ~/.cache/torch/hub/checkpoints. pytorch-fid caches the same
    file there, so one download serves both."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _missing_weights_message(reason):
    return (f"The FID Inception weights are not available ({reason}): download {WEIGHTS_URL} "
            f"and put it at {cached_weights_path()}, or pass --weights PATH.")


def download_weights(dest):
    """Download the weights file to dest, with its progress on stderr.

    Checking the file: its name ends in 6726825d, which (the convention of
    torch hub) is the start of the SHA-256 hash of its bytes. We hash what we
    downloaded and keep it only if the hash starts with those 8 hex digits,
    so a broken or tampered download is never used."""
    expected = WEIGHTS_NAME.rsplit("-", 1)[1].split(".")[0]  # "6726825d"
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file next to dest, rename at the end: an interrupted
    # download never leaves a half file under the real name.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    sha = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(WEIGHTS_URL, timeout=30) as web:
            total = int(web.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = web.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                of_total = f" of {total / 2**20:.1f}" if total else ""
                # "\r" returns to the start of the line, so the line redraws in place.
                shown = f"\rdownloading {WEIGHTS_NAME}: {done / 2**20:.1f}{of_total} MiB"
                print(shown, end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        digest = sha.hexdigest()
        if not digest.startswith(expected):
            raise FIDError(f"The downloaded weights have SHA-256 {digest[:8]}..., not "
                           f"{expected}..., so they were not kept; try again or fetch "
                           f"{WEIGHTS_URL} by hand.")
        os.replace(tmp, dest)
    except OSError as e:  # no network, HTTP error, disk full...
        raise FIDError(_missing_weights_message(f"the download failed: {e}")) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_inception(weights=None, device="cpu", allow_download=True):
    """The FID Inception network with its real weights, in eval mode on device.

    weights: a path to the .pth file; None looks in the torch hub cache and,
    if allow_download (and the environment variable SPRITEFLOW_FID_NO_DOWNLOAD
    is not set), downloads it there once. Raises FIDError with a clear
    message when there are no weights. It never falls back to random weights:
    FID from an untrained network would be a meaningless number."""
    path = cached_weights_path() if weights is None else Path(weights)
    if weights is not None and not path.is_file():
        raise FIDError(f"The weights file {path} does not exist.")
    if not path.is_file():
        if not allow_download or os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
            raise FIDError(_missing_weights_message("downloading is switched off"))
        download_weights(path)
    try:
        # weights_only=True: unpickle tensors only, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise FIDError(f"Could not read the weights file {path} ({reason}).") from None
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise FIDError(f"{path} is not the FID Inception weights file (it holds no state dict).")
    # Say in one line what is wrong before load_state_dict would say it in hundreds. A key
    # is wrong when its shapes differ: None on the side that lacks it, so missing and
    # unexpected keys count too.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    wrong = sorted(k for k in shapes.keys() | found.keys() if shapes.get(k) != found.get(k))
    if wrong:
        raise FIDError(f"{path} is not the FID Inception weights file ({len(wrong)} keys are "
                       f"missing, unexpected or of the wrong shape, such as {wrong[0]}).")
    model.load_state_dict(state, strict=True)  # every key, every shape, or fail
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# 3. Images: load, flatten RGBA onto a background, turn into [0, 1] tensors


def parse_background(spec):
    """'white', 'black', any colour name PIL knows, '#rrggbb' or 'R,G,B' -> (r, g, b) in 0..255."""
    text = str(spec).strip()
    try:
        if "," in text and not text.lower().startswith("rgb"):
            rgb = tuple(int(v) for v in text.split(","))
        else:
            rgb = tuple(ImageColor.getrgb(text)[:3])
    except ValueError:
        message = f"Cannot read the background colour {spec!r}: use white, black or R,G,B."
        raise FIDError(message) from None
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise FIDError(f"The background colour {spec!r} needs three values between 0 and 255.")
    return rgb


def to_rgb_uint8(image, background=(255, 255, 255)):
    """Any image (a PIL image or an (H, W), (H, W, 1|2|3|4) uint8 array) -> (H, W, 3) uint8 RGB.

    Grayscale becomes three equal channels, palette images are looked up,
    and anything with transparency (RGBA, LA, or a palette image with a
    transparent colour) is flattened onto the background by standard "over"
    compositing: out = a * rgb + (1 - a) * bg per pixel, with a = alpha / 255,
    in integers, rounded. A transparent pixel becomes exactly the background
    colour, an opaque one keeps its own: the sprite as drawn on that colour."""
    if isinstance(image, Image.Image):
        alpha_modes = ("RGBA", "LA", "PA", "RGBa", "La")
        has_alpha = image.mode in alpha_modes or "transparency" in image.info
        image = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise FIDError(f"Images must be uint8 arrays, got {array.dtype}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise FIDError(f"Cannot read an image array of shape {array.shape} as (H, W, channels).")
    if array.shape[-1] < 3:  # gray (and alpha): the gray value three times (then the alpha)
        array = np.concatenate([array[..., :1]] * 3 + [array[..., 1:]], axis=-1)
    if array.shape[-1] == 3:
        return np.ascontiguousarray(array)
    rgb = array[..., :3].astype(np.int32)
    a = array[..., 3:4].astype(np.int32)
    bg = np.asarray(background, dtype=np.int32)
    out = (rgb * a + bg * (255 - a) + 127) // 255  # +127: round half up, not down
    return out.astype(np.uint8)


def to_inception_input(rgb_uint8):
    """(H, W, 3) uint8 -> (1, 3, 299, 299) float32 tensor, exactly like pytorch-fid.

    pytorch-fid reads each file with PIL, converts it with ToTensor (uint8 /
    255 -> float32 in [0, 1], channels first) and resizes inside the network.
    We resize here, one image at a time, so that a folder of mixed sizes can
    be stacked into one batch. Bilinear resizing treats every image on its
    own, so this gives the very same numbers; the network's own resize is
    then a no-op on a 299x299 input."""
    # torch.tensor copies: PIL's arrays are read-only.
    x = torch.tensor(rgb_uint8).permute(2, 0, 1).float().div(255)[None]
    return resize_for_inception(x)


def load_image_file(path, background=(255, 255, 255)):
    """One image file -> (H, W, 3) uint8 RGB. The first frame of an animated GIF or WebP."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_uint8(image, background)
    except Exception as e:  # PIL raises many types for broken files
        reason = f"{type(e).__name__}: {e}"
        raise FIDError(f"Could not read the image {path} ({reason}).") from None


# -----------------------------------------------------------------------------
# 4. Features and their statistics


@torch.no_grad()
def inception_features(items, to_rgb, model, batch_size=50, name=None):
    """Inception features of a sequence of images -> (N, 2048) float64.

    to_rgb turns one item (a file, an array) into (H, W, 3) uint8 RGB. It is
    called a batch at a time, so only one batch of images is ever decoded in
    memory. With a name, a terminal shows a running count of the images done."""
    device = next(model.parameters()).device
    model.eval()  # BatchNorm with stored statistics: features independent of the batch
    show = name is not None and sys.stderr.isatty()
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.cat([to_inception_input(to_rgb(item)) for item in chunk])
        out.append(model(x.to(device)).double().cpu().numpy())  # float64 for the statistics
        if show:
            print(f"\r{name}: {start + len(chunk)} images", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(out)


def features_from_uint8(images, model, batch_size=50, background="white"):
    """In-memory uint8 images, channels last: an (N, H, W, 4) RGBA (or RGB, or gray) array
    or tensor, or a list of (H, W[, C]) arrays of any sizes -> (N, 2048) float64."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    bg = parse_background(background)
    return inception_features(images, lambda im: to_rgb_uint8(im, bg), model, batch_size)


def features_from_folder(folder, model, batch_size=50, background="white"):
    """Features of every image under folder (recursively) -> (N, 2048) float64."""
    paths = sorted(Path(folder).rglob("*"))  # recursively, sorted for a stable order
    files = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:  # an empty folder, or no folder at all
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FIDError(f"{folder} is not a folder of images (looked for {extensions}).")
    bg = parse_background(background)
    return inception_features(files, lambda f: load_image_file(f, bg), model, batch_size, folder)


def statistics(feats):
    """Mean and covariance of (N, d) features: mu = the mean over rows, sigma = np.cov
    (which divides by N - 1)."""
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n < 2:
        raise FIDError(f"FID needs at least 2 images, got {n}.")
    if n < d:
        warnings.warn(f"Only {n} images for {d}-d features: the covariance is singular and "
                      f"FID is biased upward at this size; KID is the better metric for small n.",
                      stacklevel=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


# -----------------------------------------------------------------------------
# 5. The two distances


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))

    sqrtm is the matrix square root. sigma1 sigma2 is not symmetric, so its
    square root may come out with tiny imaginary parts from rounding; those
    are dropped. Follows pytorch-fid's calculate_frechet_distance."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64), np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64))
    square = (mu1.size, mu1.size)
    if mu1.shape != mu2.shape or sigma1.shape != square or sigma2.shape != square:
        raise ValueError(f"Means of shapes {mu1.shape} and {mu2.shape} and covariances of "
                         f"shapes {sigma1.shape} and {sigma2.shape} do not fit together.")
    diff = mu1 - mu2

    # SciPy >= 1.16 deprecates sqrtm(..., disp=False), which used to return an
    # error estimate. We call it plainly and check the result ourselves. With
    # singular covariances (fewer images than dimensions) it can fail and
    # return inf or nan: then nudge both covariances by eps * I, which makes
    # them non-singular, and try again. Like pytorch-fid, the nudge is used
    # only inside the square root; the traces below use the original matrices.
    with warnings.catch_warnings():
        # "Matrix is singular": the result is checked below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: the matrix square root is not finite (singular covariances); "
                          f"adding {eps} * I to both covariances.", stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # A complex result: small imaginary parts are rounding noise, large ones
    # mean the inputs were not valid covariances (pytorch-fid's tolerance).
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(np.diagonal(covmean).imag))
            raise ValueError(f"The matrix square root has an imaginary component of {worst:.3g} "
                             f"on its diagonal.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats1, feats2, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3.

    Computed on num_subsets random subsets of subset_size rows from each set
    (drawn without replacement, from a generator seeded with seed) and
    returned as (mean, std) over the subsets. A subset larger than a set is
    shrunk to the smaller set's size."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two (N, d) feature arrays of equal d, got {f1.shape} "
                         f"and {f2.shape}.")
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    if m < subset_size:
        warnings.warn(f"KID: subset size {subset_size} is larger than the {m} samples "
                      f"available; using {m}.", stacklevel=2)
    if m < 2:
        raise FIDError(f"KID needs at least 2 images on each side, got {len(f1)} and {len(f2)}.")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: within a set, leave out the diagonal k(x_i, x_i), so the
        # mean runs over the m (m - 1) pairs of distinct images.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2 * k_xy.mean()
    return float(values.mean()), float(values.std())


def frechet_distance_low_rank(mu1, sigma1, mu2, feats2):
    """The same number as frechet_distance(mu1, sigma1, *statistics(feats2)), but
    computed exactly through a small matrix, which is much faster when feats2
    has fewer rows n than columns d (say 1000 sprites, d = 2048).

    Why it works: write sigma2 = A^T A with A = (feats2 - mu2) / sqrt(n - 1),
    an (n, d) matrix. The trace of a matrix square root is the sum of the
    square roots of the eigenvalues, and sigma1 A^T A has the same nonzero
    eigenvalues as A sigma1 A^T, which is only (n, n), symmetric and positive
    semi-definite. So

        Tr sqrtm(sigma1 sigma2) = sum_i sqrt(eigenvalue_i(A sigma1 A^T))

    An (n, n) symmetric eigenproblem instead of a (2048, 2048) general matrix
    square root: about 1 second instead of a minute on a CPU, and no
    rounding into complex numbers. It agrees with the sqrtm route to about
    1e-6 (checked in the tests)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, feats2 = np.asarray(sigma1, np.float64), np.asarray(feats2, np.float64)
    a = (feats2 - mu2) / np.sqrt(len(feats2) - 1)  # sigma2 = a.T @ a, exactly np.cov
    eigenvalues = np.linalg.eigvalsh(a @ sigma1 @ a.T)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()  # tiny negatives are rounding
    diff = mu1 - mu2
    trace_sigma2 = (a * a).sum()  # Tr(A^T A) = sum of squares of A
    return float(diff @ diff + np.trace(sigma1) + trace_sigma2 - 2 * tr_covmean)


def fid_between(stats_a, stats_b, feats_a=None, feats_b=None):
    """FID between two sides, each given as (mu, sigma) and, when known, its features.

    If one side has features with fewer rows than dimensions, use the fast
    exact route (frechet_distance_low_rank); otherwise the general one,
    frechet_distance, exactly as pytorch-fid computes it."""
    sides = [(stats_a, feats_a, stats_b), (stats_b, feats_b, stats_a)]
    sides = [side for side in sides if side[1] is not None and len(side[1]) < side[1].shape[1]]
    if not sides:
        return frechet_distance(*stats_a, *stats_b)
    # FID is symmetric, so either side may play "feats2"; the smaller is faster.
    (mu, _), feats, (mu_other, sigma_other) = min(sides, key=lambda side: len(side[1]))
    return frechet_distance_low_rank(mu_other, sigma_other, mu, feats)


def frechet_distance_of_features(feats_a, feats_b):
    """Frechet distance between two (N, d) sets of features, by the fastest exact route."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer images than dimensions": expected here
        return fid_between(statistics(feats_a), statistics(feats_b), feats_a, feats_b)


def fid_kid(images_a, images_b, model, batch_size=50, background="white"):
    """FID and KID (over kid's default subsets) between two sets of in-memory uint8
    images, e.g. real and generated sprites, (N, 128, 128, 4) RGBA. Returns a dict with
    the keys fid, kid_mean and kid_std."""
    fa = features_from_uint8(images_a, model, batch_size, background)
    fb = features_from_uint8(images_b, model, batch_size, background)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "subset larger than the samples": expected here too
        kid_mean, kid_std = kid(fa, fb)
    return {"fid": frechet_distance_of_features(fa, fb), "kid_mean": kid_mean, "kid_std": kid_std}


# -----------------------------------------------------------------------------
# 6. Sprite-level measures: numbers that need no downloaded network
#
# FID sees sprites through a network trained on photos, after flattening them
# onto a background and blurring them up to 299x299; it needs a 91 MiB file
# and minutes of CPU. The measures below need only the sprites, take seconds,
# and each answers one narrower question:
#
#   pixel_art_stats          is it drawn like pixel art: flat blocks, few colours?
#   saturation_stats         are the colours as vivid as the data's? A flat sprite of
#                            few colours can still be garish or muddy.
#   random_feature_distance  section 5's Frechet distance, in the features of a small
#                            random network instead of Inception's.
#   memorisation_report      does a sample copy a training sprite?
#
# Compare a model's sprites with the data, both measured the same way and at
# the same number of sprites. These numbers rank runs against each other;
# none of them is an absolute score.
#
# All functions take uint8 RGBA sprites with channels last, (N, H, W, 4), as
# a tensor or an array, like the rest of this file. A pixel counts as opaque
# when its alpha is above 127.


def _uint8_tensor(images):
    """uint8 images as a tensor or an array -> a uint8 CPU tensor (a copy of an array)."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images))  # np.array copies: PIL's arrays are read-only
    if images.dtype != torch.uint8:
        raise FIDError(f"Sprites must be uint8, got {images.dtype}.")
    return images.detach().cpu()


def pixel_art_stats(images, block=4):
    """Two weight-free quality proxies for sprites drawn in `block`-pixel blocks, from uint8
    (N, H, W, 4): flatness, the share of side-by-side opaque blocks whose colours differ
    by at most 24 in every channel (clean colour regions score high, speckle low), and
    colours, the mean number of distinct colours per sprite at 8 levels per channel."""
    images = _uint8_tensor(images)
    g = images[:, block // 2::block, block // 2::block].long()  # (N, H/block, W/block, 4)
    same = pairs = 0
    for cells in (g, g.transpose(1, 2)):  # neighbours one above the other, then side by side
        both = (cells[:, 1:, :, 3] > 127) & (cells[:, :-1, :, 3] > 127)
        close = (cells[:, 1:, :, :3] - cells[:, :-1, :, :3]).abs().amax(-1) <= 24
        pairs += both.sum().item()
        same += (close & both).sum().item()
    opaque, levels = g[..., 3] > 127, g[..., :3] // 32  # 8 levels per channel
    colours = [len(torch.unique(levels[k][opaque[k]], dim=0)) for k in range(len(g))]
    flatness = same / max(pairs, 1)
    return {"flatness": round(flatness, 3), "colours": round(sum(colours) / len(colours), 1)}


def saturation_stats(images):
    """How vivid the colours are, from uint8 (N, H, W, 4) sprites.

    HSV saturation of a pixel is s = (max - min) / max of its R, G, B: 0 for
    grey, white and black (max = 0 counts as grey), 1 for a pure hue such as
    (255, 0, 0). Each sprite gets the mean s over its opaque pixels; we return
    the mean and the standard deviation (over sprites, dividing by N) of that,
    as {"saturation", "saturation_std"}. Sprites without an opaque pixel are
    left out; with none at all both values are nan."""
    x = _uint8_tensor(images).double()
    opaque = x[..., 3] > 127
    hi, lo = x[..., :3].amax(-1), x[..., :3].amin(-1)
    s = (hi - lo) / hi.clamp(min=1)  # hi = 0 means lo = 0 too, so s = 0
    count = opaque.sum((1, 2))
    per_sprite = ((s * opaque).sum((1, 2)) / count.clamp(min=1))[count > 0]
    if len(per_sprite) == 0:
        return {"saturation": float("nan"), "saturation_std": float("nan")}
    spread = per_sprite.std(correction=0)
    return {"saturation": per_sprite.mean().item(), "saturation_std": spread.item()}


# A Frechet distance in random features.
#
# The Frechet distance of section 5 compares the mean and covariance of a
# feature map phi(x) over two sets. Nothing in the formula needs phi to be
# trained: for ANY fixed phi it is 0 exactly when the two sets have the same
# feature mean and covariance, and grows as they drift apart. Training only
# decides which differences phi notices. A random convolutional network with
# ReLUs is still a rich nonlinear map (random features, Rahimi and Recht,
# 2007: a random map, drawn once and then fixed, can tell distributions
# apart), and unlike Inception it sees the sprite at its own 128x128
# resolution, hard edges unblurred, alpha included, so a wrong silhouette
# counts as much as a wrong colour.
#
# The network (random_features):
#   input   the RGBA sprite in [-1, 1] (spriteflow.to_float's scale), so a
#           transparent pixel is (-1, -1, -1, -1).
#   layers  4 convolutions, 3x3, stride 2, padding 1, no bias, each followed by
#           ReLU: 128 -> 64 -> 32 -> 16 -> 8 pixels, widths 64, 128, 256, 512.
#           Each output sees a 3, 7, 15 and 31 pixel window: from the edges of
#           one pixel-art block up to whole body parts.
#   weights He-scaled normal, std sqrt(2 / fan_in), fan_in = 9 * channels in:
#           with ReLU the activations keep about the same mean square at every
#           layer, so no layer's features vanish or dominate. Seeded on the
#           CPU: the same numbers on every machine. A different seed is a
#           different (equally good) ruler; never compare across seeds.
#   features per layer and channel, the mean over positions (how much of a
#           pattern there is) and the standard deviation (how unevenly it is
#           spread), each layer's block divided by sqrt(width) so that the four
#           scales weigh the same: 2 * (64 + 128 + 256 + 512) = 1920 numbers.
#
# No BatchNorm: a sprite's features do not depend on its batch (up to float32
# rounding). Like FID the distance is biased upward at small N: compare
# numbers at the same N only. A useful scale is the distance between two
# disjoint random sets of data sprites of that N (the CLI prints it): a model
# cannot be expected to come closer to the data than the data comes to itself.

RANDOM_WIDTHS = (64, 128, 256, 512)


@torch.no_grad()
def random_features(images, seed=0, batch_size=64):
    """uint8 (N, H, W, 4) RGBA sprites -> (N, 2 * sum(RANDOM_WIDTHS)) float64 random features."""
    images = _uint8_tensor(images)
    if images.ndim != 4 or images.shape[-1] != 4:
        raise FIDError(f"Expected RGBA sprites of shape (N, H, W, 4), got {tuple(images.shape)}.")
    g = torch.Generator().manual_seed(seed)
    weights, c_in = [], 4  # one (out, in, 3, 3) He-scaled weight per layer
    for c_out in RANDOM_WIDTHS:
        weights.append(torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in)))
        c_in = c_out
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].permute(0, 3, 1, 2).float() / 127.5 - 1
        feats = []
        for w in weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))
            scale = 1 / math.sqrt(len(w))
            feats += [x.mean((2, 3)) * scale, x.std((2, 3), correction=0) * scale]
        out.append(torch.cat(feats, dim=1).double())
    return torch.cat(out).numpy() if out else np.zeros((0, 2 * sum(RANDOM_WIDTHS)))


def random_feature_distance(images_a, images_b, seed=0, batch_size=64):
    """Frechet distance between two sets of uint8 (N, H, W, 4) sprites in the random
    features of random_features(seed). 0 for identical sets; lower is closer."""
    feats_a = random_features(images_a, seed, batch_size)
    return frechet_distance_of_features(feats_a, random_features(images_b, seed, batch_size))


# Memorisation: does a sample copy a training sprite?
#
# A model that reproduces its training sprites scores well on every measure
# above, so we also look for each sample's nearest training sprite in plain
# pixel space, with the RMS distance over all 4 * 128 * 128 values in [-1, 1]:
#
#     d(x, y) = sqrt(mean((x - y)^2))     0: identical; 2: every value opposite
#
# All pairs at once: |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, so the cross terms of
# a chunk of queries against a chunk of references are one matrix product.
# We multiply the byte values 0..255 in float64: every product and partial
# sum is then an integer below 2^53 (at most 65,536 * 255^2 ~ 4e9), so the
# result is exact and a copy comes out at exactly 0, not at rounding noise.
# Chunking keeps the memory to a few hundred MB whatever the set sizes.
#
# How close is too close? Sprites of one style are close to each other
# anyway, so the yardstick is the data itself: the held-out validation
# sprites were never trained on, and their distances to the nearest training
# sprite show how close a genuinely new sprite gets. A sample nearer to a
# training sprite than even the nearest held-out sprite is suspicious.
# Pixel distance misses a copy that is shifted by a pixel or recoloured, so
# also look at the sheet of samples beside their nearest training sprites.


@torch.no_grad()
def nearest_neighbours(queries, references, chunk=256):
    """For each query, its nearest reference: uint8 sprites of one shape (any layout, the
    same for both) -> (distances float64 (Q,), indices long (Q,)), the RMS distance over
    all values in [-1, 1]. Ties go to the lowest index. chunk sprites at a time on each
    side: 128x128 RGBA sprites take about 4 * chunk / 256 * 128 MB at once."""
    q, r = _uint8_tensor(queries), _uint8_tensor(references)
    if len(r) == 0 or q.shape[1:] != r.shape[1:]:
        raise FIDError(f"Cannot match {tuple(q.shape)} queries against {tuple(r.shape)} "
                       f"references.")
    q, r = q.flatten(1), r.flatten(1)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)  # squared distances in bytes^2
    index = torch.zeros(len(q), dtype=torch.long)
    for q0 in range(0, len(q), chunk):
        qc = q[q0:q0 + chunk].double()
        q_sq = (qc * qc).sum(1, keepdim=True)
        # Views: what is written into best_c and index_c lands in best and index.
        best_c, index_c = best[q0:q0 + chunk], index[q0:q0 + chunk]
        for r0 in range(0, len(r), chunk):
            rc = r[r0:r0 + chunk].double()
            d2 = q_sq + (rc * rc).sum(1) - 2 * qc @ rc.T  # exact integers
            d2_min, i_min = d2.min(1)
            better = d2_min < best_c  # strict: on a tie the earlier chunk keeps it
            best_c[better] = d2_min[better]
            index_c[better] = i_min[better] + r0
    # The mean over the values, then bytes -> the [-1, 1] scale.
    return (best / q.shape[1]).sqrt() / 127.5, index


def summarise_distances(d):
    """min, 5th percentile, median and mean of a set of distances."""
    d = np.asarray(d, dtype=np.float64)
    return {"min": float(d.min()), "p5": float(np.percentile(d, 5)),
            "median": float(np.median(d)), "mean": float(d.mean())}


def memorisation_report(samples, train, val):
    """Nearest training sprite of every sample, against the same for held-out sprites.

    Returns a dict: samples and held_out, the summaries (min, p5, median,
    mean) of the two sets of nearest-training distances; threshold, the
    smallest held-out distance; closer_than_held_out, the share of samples
    nearer to a training sprite than that; distances and indices, each
    sample's distance and nearest training sprite (for nearest_sheet)."""
    if len(samples) == 0 or len(val) == 0:
        raise FIDError("The memorisation check needs at least one sample and one held-out sprite.")
    d_samples, indices = nearest_neighbours(samples, train)
    d_val, _ = nearest_neighbours(val, train)
    threshold = d_val.min().item()
    closer = (d_samples < threshold).double().mean().item()
    return {"samples": summarise_distances(d_samples), "held_out": summarise_distances(d_val),
            "threshold": threshold, "closer_than_held_out": closer,
            "distances": d_samples, "indices": indices}


def nearest_sheet(samples, train, indices, pairs_per_row=8):
    """A PIL image: each sample (left) beside its nearest training sprite train[indices[i]]
    (right), pairs_per_row pairs to a row, on spriteflow's checkerboard."""
    spriteflow = _spriteflow()  # the lazy import of section 7
    samples, train = _uint8_tensor(samples), _uint8_tensor(train)
    neighbours = train[torch.as_tensor(indices)]
    pairs = torch.stack([samples, neighbours], dim=1).flatten(0, 1)  # s0, t0, s1, t1...
    return spriteflow.sprite_sheet(pairs, cols=2 * max(1, min(pairs_per_row, len(samples))))


# Do the views of one character agree? (spriteflow.py train --views draws characters of
# V views.) A character keeps its palette in every direction: the coat is the same blue
# from the front and from the back, even where the shapes differ completely. So we
# compare colours and ignore where they are: each view becomes the histogram of its
# opaque pixels' colours, 8 levels per channel (512 cells, summing to 1), and two views
# are as far apart as the total-variation distance of their histograms,
#
#     D(a, b) = 1/2 sum_c |h_a(c) - h_b(c)|     0: the same colours in the same shares,
#                                                1: no colour in common.
#
# "own" averages D over every pair of views (k, l) of the same character; "strangers"
# averages D between view k of one character and view l of another (each character is
# paired with the one half the set further on: far apart in the folder's order, so not
# another frame of the same sheet character). Views drawn for one character
# should score near the data's own value, far below its strangers; views sampled
# independently score like strangers. Only the colours are compared: a model that
# draws the same front four times scores 0 on this measure, so look at the views too.

VIEW_LEVELS = 8


def colour_histograms(images, levels=VIEW_LEVELS):
    """uint8 (N, H, W, 4) -> float (N, levels^3): the share of each colour cell among the
    opaque pixels of each sprite (all zeros for an empty sprite)."""
    images = _uint8_tensor(images)
    rgb = images[..., :3].long() * levels // 256  # (N, H, W, 3), levels per channel
    cell = (rgb[..., 0] * levels + rgb[..., 1]) * levels + rgb[..., 2]  # (N, H, W)
    opaque = (images[..., 3] > 127).double()
    hist = torch.zeros(len(images), levels ** 3, dtype=torch.float64)
    hist.scatter_add_(1, cell.flatten(1), opaque.flatten(1))
    return hist / hist.sum(1, keepdim=True).clamp(min=1)


def histogram_distance(a, b):
    """Total-variation distance between normalised histograms (..., cells): 0 to 1."""
    return 0.5 * (a - b).abs().sum(-1)


def view_consistency(characters, levels=VIEW_LEVELS):
    """uint8 (N, V, H, W, 4) characters -> {n_characters, views, empty_views, own, strangers,
    ratio, pairs: {"k-l": [own, strangers]}, own_per_character (N,)}: the colour-histogram
    distances above, averaged over characters and view pairs (two empty views count as
    the same, so empty_views says how many there are)."""
    chars = _uint8_tensor(characters)
    n, v = chars.shape[:2]
    if n < 2 or v < 2:
        raise FIDError(f"The view consistency needs 2 or more characters of 2 or more views, "
                       f"got {n} of {v}.")
    hist = colour_histograms(chars.flatten(0, 1), levels).view(n, v, -1)  # (N, V, cells)
    stranger = hist.roll(n // 2, dims=0)  # character i's stranger: character i - n/2
    pairs, own_sum = {}, torch.zeros(n, dtype=torch.float64)
    for k in range(v):
        for l in range(k + 1, v):
            own = histogram_distance(hist[:, k], hist[:, l])  # (N,)
            strangers = histogram_distance(hist[:, k], stranger[:, l])
            own_sum += own
            pairs[f"{k}-{l}"] = [round(own.mean().item(), 4), round(strangers.mean().item(), 4)]
    empty = int((hist.sum(-1) == 0).sum())  # an empty view matches another empty one: say so
    own_mean = sum(o for o, _ in pairs.values()) / len(pairs)
    strangers_mean = sum(s for _, s in pairs.values()) / len(pairs)
    return {"n_characters": n, "views": v, "empty_views": empty, "own": round(own_mean, 4),
            "strangers": round(strangers_mean, 4),
            "ratio": round(own_mean / max(strangers_mean, 1e-12), 3), "pairs": pairs,
            "own_per_character": (own_sum / len(pairs)).tolist()}


def view_distance_to_truth(drawn, truth, skip=(), levels=VIEW_LEVELS):
    """Mean colour-histogram distance between drawn view k and true view k of the same
    characters, uint8 (N, V, H, W, 4) each, over the views not in `skip` (the given one)."""
    drawn, truth = _uint8_tensor(drawn), _uint8_tensor(truth)
    views = [k for k in range(drawn.shape[1]) if k not in skip]
    a = colour_histograms(drawn[:, views].flatten(0, 1), levels)
    b = colour_histograms(truth[:, views].flatten(0, 1), levels)
    return round(histogram_distance(a, b).mean().item(), 4)


# -----------------------------------------------------------------------------
# 7. Command line
#
# argparse's subparsers would claim the first word of every command line, yet
# `python fid.py A B` must work whatever the folders are called. So main()
# looks at the first argument itself: only the exact words "measure", "nearest"
# and "views" pick a subcommand, and a folder of that name is given as ./measure.
# Each command has its own small parser, so its --help lists only its flags.
# measure and nearest load sprites as the trainer does (spriteflow.load_folder)
# and end with one JSON line, for scripts to read.

SHEET_PAIRS = 64
USAGE = """%(prog)s [options] PATH_A [PATH_B]
       %(prog)s [options] PATH_A --save-stats OUT.npz
       %(prog)s measure SAMPLES [--data DATA] [--n-data N] [--seed S] [--json]
       %(prog)s nearest SAMPLES [--data DATA] [--sheet OUT.png] [--json]
       %(prog)s views FOLDER [FOLDER ...] [--json]"""
DESCRIPTION = """FID and KID between two sets of images: folders, .npz statistics or a
SpriteFlow checkpoint to sample from. measure and nearest are weight-free
sprite measures (see fid.py measure --help); a first argument of exactly
"measure" or "nearest" picks one, so pass a folder of that name as ./measure."""


def _spriteflow():
    """The one import of spriteflow.py, done lazily: FID of two folders runs without it."""
    try:
        import spriteflow
    except ImportError as e:
        message = f"Sprite measures and checkpoints need spriteflow.py next to fid.py ({e})."
        raise FIDError(message) from None
    return spriteflow


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake ends as one line, `error: ...`, like any other bad input."""

    def error(self, message):
        raise FIDError(f"{message} (see {self.prog} --help)")


def fid_parser():
    """The parser of `fid.py PATH_A [PATH_B]`: FID and KID, or --save-stats."""
    p = Parser(prog="fid.py", usage=USAGE, description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path_a", metavar="PATH_A", help="folder of images, or .npz with mu and sigma")
    p.add_argument("path_b", metavar="PATH_B", nargs="?",
                   help="folder of images, .npz with mu and sigma, or a SpriteFlow checkpoint .pt")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write mu and sigma of PATH_A here")
    p.add_argument("--batch-size", metavar="N", type=int, default=50, help="default: 50")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-samples", metavar="N", type=int, default=1000,
                   help="sprites to draw from a checkpoint (default: 1000)")
    p.add_argument("--weights", metavar="PATH",
                   help=f"the file {WEIGHTS_NAME} (default: torch hub cache, else download)")
    p.add_argument("--no-download", action="store_true", help="never download the weights")
    p.add_argument("--background", metavar="COLOUR", default="white",
                   help="behind transparent pixels: white (default), black or R,G,B")
    # No defaults here: None means "as `spriteflow.py sample` does" (see sample_checkpoint).
    p.add_argument("--sampler", choices=["heun", "multistep", "euler", "sde"],
                   help="checkpoint sampler (default: that of spriteflow.py sample)")
    p.add_argument("--steps", metavar="N", type=int,
                   help="checkpoint sampling steps (default: those of spriteflow.py sample)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="checkpoint sampling seed (default: 0)")
    return p


def sprite_parser(name):
    """The parser of `fid.py measure` or `fid.py nearest`: SAMPLES, --data, --json, and its own."""
    what = {"measure": "Pixel-art and saturation stats of SAMPLES and DATA, and the "
                       "random-feature Frechet distance between them.",
            "nearest": "Memorisation check: each sample's nearest training sprite of DATA."}
    p = Parser(prog=f"fid.py {name}", description=what[name])
    p.add_argument("samples", metavar="SAMPLES", help="folder of sprites, e.g. from spriteflow.py")
    p.add_argument("--data", default="data/images", help="training sprites (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    if name == "measure":
        p.add_argument("--n-data", metavar="N", type=int,
                       help="data sprites to compare with (default: as many as samples)")
        p.add_argument("--seed", metavar="S", type=int, default=0,
                       help="picks the random subset of the data (default: 0)")
    else:
        p.add_argument("--sheet", metavar="OUT.png",
                       help=f"write the {SHEET_PAIRS} closest samples beside their neighbours")
    return p


def views_parser():
    """The parser of `fid.py views`: folders of characters, --json."""
    p = Parser(prog="fid.py views", description="Colour consistency between the views of one "
               "character, against views of two different characters (section 6).")
    p.add_argument("folders", metavar="FOLDER", nargs="+",
                   help="character folders (spriteflow.py train --views layout), or a "
                        "`spriteflow.py sample` folder of a views checkpoint")
    p.add_argument("--json", action="store_true", help="print only the JSON lines")
    return p


def load_stats_file(path):
    """A pytorch-fid style .npz with 'mu' (d,) and 'sigma' (d, d) -> (mu, sigma)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = dict(data)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise FIDError(f"Could not read the statistics file {path} ({reason}).") from None
    if "mu" not in arrays or "sigma" not in arrays:
        held = ", ".join(arrays) or "nothing"
        raise FIDError(f"{path} has no 'mu' and 'sigma' arrays (it holds: {held}).")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise FIDError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
                       f"expected (d,) and (d, d).")
    return mu, sigma


def sample_checkpoint(path, args, device):
    """Draw args.num_samples sprites from a SpriteFlow checkpoint -> (N, 128, 128, 4) uint8,
    with `spriteflow.py sample`'s sampler, steps and guidance unless --sampler/--steps say
    otherwise: the score should be that of the sprites a user gets."""
    spriteflow = _spriteflow()
    try:
        model, guide, ckpt = spriteflow.load_models(str(path), device)
    except spriteflow.UserError as e:
        raise FIDError(str(e).rstrip(".") + ".") from None
    views = getattr(model, "views", 1)
    if views > 1:
        raise FIDError(f"{path} draws characters of {views} views; sample it with "
                       "spriteflow.py and score the folder, or use fid.py views.")
    sampler = args.sampler or spriteflow.DEFAULT_SAMPLER
    steps = args.steps or spriteflow.DEFAULT_STEPS
    classes = ckpt["classes"]
    labels = None
    if classes:  # spread over the classes as in training, as sample does
        labels = spriteflow.class_plan(args.num_samples, classes, ckpt["class_counts"])
    w = spriteflow.default_guidance(ckpt, labels)
    bf16, _ = spriteflow.decide_bf16(None, torch.device(device), ckpt=ckpt)
    print(f"sampling {args.num_samples} sprites from {path} ({sampler}, {steps} steps, "
          f"guidance {w:g}, bf16 {'on' if bf16 else 'off'})", file=sys.stderr)
    noise = spriteflow.gaussian_noise(args.num_samples, args.seed)
    solver = spriteflow.Solver(sampler, steps, seed=args.seed)
    images = spriteflow.generate(model, noise, labels, w, guide, solver, ckpt["grid"], bf16)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # leave the GPU memory to Inception
    return images.cpu().numpy()


def load_side(path, args, device, get_model):
    """One command-line path -> (mu, sigma, features), features None for a .npz of statistics."""
    path = Path(path)
    if not path.exists():
        raise FIDError(f"{path} does not exist.")
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_stats_file(path) + (None,)
    if path.is_file() and path.suffix.lower() == ".pt":
        images = sample_checkpoint(path, args, device)
        feats = features_from_uint8(images, get_model(), args.batch_size, args.background)
    elif path.is_dir():
        feats = features_from_folder(path, get_model(), args.batch_size, args.background)
    else:
        raise FIDError(f"{path} is neither a folder of images, a .npz of statistics "
                       f"nor a .pt checkpoint.")
    return statistics(feats) + (feats,)


def run_fid(args):
    """fid.py PATH_A [PATH_B]: PATH_A's --save-stats, and FID and KID of the two sides."""
    if args.path_b is None and not args.save_stats:
        raise FIDError("Give two paths to compare, or one path and --save-stats OUT.npz.")
    if args.batch_size < 1 or args.num_samples < 2 or (args.steps is not None and args.steps < 1):
        raise FIDError("--batch-size and --steps must be at least 1, --num-samples at least 2.")
    parse_background(args.background)  # fail early on a bad colour, not after minutes of work
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise FIDError(f"Unknown device {args.device!r}: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FIDError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")

    @functools.cache  # Inception is loaded once, and only when a side needs features
    def get_model():
        return load_inception(args.weights, device, allow_download=not args.no_download)

    mu_a, sigma_a, feats_a = load_side(args.path_a, args, device, get_model)
    if args.save_stats:
        out = Path(args.save_stats)
        if out.suffix != ".npz":
            out = out.with_name(out.name + ".npz")  # np.savez would add it anyway
        try:
            np.savez(out, mu=mu_a, sigma=sigma_a)
        except OSError as e:
            raise FIDError(f"Could not write {out} ({e.strerror}).") from None
        print(f"saved statistics of {args.path_a} ({mu_a.size}-d) to {out}")
    if args.path_b is not None:
        print_scores((mu_a, sigma_a, feats_a), load_side(args.path_b, args, device, get_model))


def print_scores(side_a, side_b):
    """FID from the two sides' statistics; KID too where both sides have features."""
    (mu_a, sigma_a, feats_a), (mu_b, sigma_b, feats_b) = side_a, side_b
    if mu_a.shape != mu_b.shape:
        raise FIDError(f"The two sides have features of different sizes "
                       f"({mu_a.size} and {mu_b.size}).")
    try:
        fid = fid_between((mu_a, sigma_a), (mu_b, sigma_b), feats_a, feats_b)
    except ValueError as e:  # e.g. a .npz whose sigma is not a covariance matrix
        raise FIDError(f"Cannot compute FID: {e}") from None
    print(f"FID: {fid:.4f}")
    if feats_a is None or feats_b is None:
        print("KID: not available (KID needs images on both sides, "
              "and a .npz holds statistics only)")
        return
    kid_mean, kid_std = kid(feats_a, feats_b)
    print(f"KID: {kid_mean:.6f} +/- {kid_std:.6f}")  # ASCII: any terminal can show it


def load_sprites(folder, side):
    """A folder of sprites (searched recursively) -> ((N, 128, 128, 4) uint8 tensor, names,
    class labels (N,) as the trainer reads them, or None). side, "samples" or "data", names
    the folder in every error: a user sees which one is wrong."""
    spriteflow, folder = _spriteflow(), Path(folder)
    if not folder.exists():
        raise FIDError(f"The {side} folder {folder} does not exist.")
    if not folder.is_dir():
        raise FIDError(f"The {side} folder {folder} is not a folder.")
    if (folder / "sheet.json").is_file():
        # A `spriteflow.py sample` folder: its sprites, not grid.png, sheet.png or native/.
        paths = sorted(folder.glob("sprite_*.png"))
        if not paths:
            raise FIDError(f"The {side} folder {folder} holds a sheet.json but no sprite_*.png.")
        try:
            images = np.stack([spriteflow.load_rgba(p) for p in paths])
        except Exception as e:  # PIL raises many types for broken files
            raise FIDError(f"Could not read the {side} sprites in {folder} ({e}).") from None
        return torch.from_numpy(images), [p.name for p in paths], None
    # Checked here: load_folder's own message would call even the samples a "data folder".
    if not any(p.suffix.lower() in spriteflow.IMAGE_SUFFIXES for p in folder.rglob("*")):
        raise FIDError(f"The {side} folder {folder} holds no PNG, GIF, WebP or BMP images.")
    try:
        images, names, _, y = spriteflow.load_folder(folder)
    except spriteflow.UserError as e:
        raise FIDError(f"Could not load the {side} folder ({e}).") from None
    return images.permute(0, 2, 3, 1).contiguous(), names, y


def load_views(folder):
    """A folder of characters -> uint8 (N, V, 128, 128, 4): a `spriteflow.py sample` folder
    (sheet.json names each frame's character and view), or character folders of V views."""
    spriteflow, folder = _spriteflow(), Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder.")
    if (folder / "sheet.json").is_file():
        frames = json.loads((folder / "sheet.json").read_text())["frames"]
        if not frames or "view" not in frames[0]:
            raise FIDError(f"{folder} holds single sprites; its sheet.json names no views.")
        n, v = max(f["character"] for f in frames) + 1, max(f["view"] for f in frames) + 1
        images = np.zeros((n, v, 128, 128, 4), np.uint8)
        for f in frames:
            images[f["character"], f["view"]] = spriteflow.load_rgba(folder / f["filename"])
        return torch.from_numpy(images)
    counts = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix.lower() in spriteflow.IMAGE_SUFFIXES:
            counts[p.parent] = counts.get(p.parent, 0) + 1
    if not counts:
        raise FIDError(f"{folder} holds no PNG, GIF, WebP or BMP images.")
    try:
        x = spriteflow.load_examples(folder, views=min(counts.values()), labels=False)[0]
    except spriteflow.UserError as e:
        raise FIDError(f"Could not load the characters in {folder} ({e}).") from None
    return x.unflatten(1, (-1, 4)).permute(0, 1, 3, 4, 2).contiguous()  # (N, V, H, W, 4)


def run_views(args):
    """fid.py views: the view consistency of every folder, one line and one JSON line each."""
    for folder in args.folders:
        result = view_consistency(load_views(folder))
        del result["own_per_character"]
        if not args.json:
            print(f"{folder}: {result['n_characters']} characters of {result['views']} views; "
                  f"colour distance between the views of one character {result['own']:.4f}, "
                  f"of two characters (strangers) {result['strangers']:.4f} "
                  f"(ratio {result['ratio']:.3f})")
        print(json.dumps({"folder": str(folder), **result}))


def run_measure(args):
    """fid.py measure: the sprite measures of the samples and of a random subset of the data,
    and the random-feature Frechet distance between them."""
    if args.n_data is not None and args.n_data < 2:
        raise FIDError("--n-data must be at least 2.")
    samples, _, _ = load_sprites(args.samples, "samples")
    data, _, _ = load_sprites(args.data, "data")
    n_data = min(args.n_data or len(samples), len(data))
    if len(samples) < 2 or n_data < 2:
        raise FIDError(f"fid.py measure needs at least 2 sprites on each side, got "
                       f"{len(samples)} samples and {n_data} data sprites.")
    # A fixed random subset, so that repeated runs compare against the same
    # sprites; and a second, disjoint one of the samples' size, whose distance
    # to the first is the data's own distance at these sizes: the floor.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    reference = data[order[:n_data]]
    rest = order[n_data:n_data + len(samples)]
    feats_reference = random_features(reference)  # the network's seed stays 0: comparable runs
    floor = None
    if len(rest) == len(samples):
        floor = frechet_distance_of_features(random_features(data[rest]), feats_reference)
    distance = frechet_distance_of_features(random_features(samples), feats_reference)
    result = {"n_samples": len(samples), "n_data": n_data, "seed": args.seed,
              "samples": {**pixel_art_stats(samples), **saturation_stats(samples)},
              "data": {**pixel_art_stats(reference), **saturation_stats(reference)},
              "random_fd": distance, "random_fd_data_vs_data": floor}
    if not args.json:
        print(f"{len(samples)} samples from {args.samples} against {n_data} random sprites "
              f"of {args.data} (seed {args.seed})")
        print(f"{'':20}{'samples':>10}{'data':>10}")
        for key in result["samples"]:  # flatness, colours, saturation, saturation_std
            label = key.replace("_", " ")
            print(f"{label:20}{result['samples'][key]:>10.4g}{result['data'][key]:>10.4g}")
        floor_text = f"needs {n_data + len(samples)} data sprites"
        if floor is not None:
            floor_text = f"{floor:.4g}"
        print(f"random-feature Frechet distance: {distance:.4g} (data vs data: {floor_text})")
    print(json.dumps(result))


def run_nearest(args):
    """fid.py nearest: the memorisation report of the samples against the training split."""
    spriteflow = _spriteflow()
    samples, sample_names, _ = load_sprites(args.samples, "samples")
    data, names, y = load_sprites(args.data, "data")
    train_idx, val_idx = spriteflow.split_train_val(names, 0.05, y)  # the trainer's own split
    train = data[train_idx]
    report = memorisation_report(samples, train, data[val_idx])
    distances, indices = report.pop("distances"), report.pop("indices")
    closest = distances.argsort(stable=True)
    flagged = [i for i in closest.tolist() if distances[i] < report["threshold"]]
    if not args.json:
        print(f"nearest training sprite (RMS distance, values in [-1, 1]) of {len(samples)} "
              f"samples from {args.samples} and of {len(val_idx)} held-out sprites, "
              f"among {len(train)} training sprites of {args.data}")
        print(f"{'':12}{'min':>9}{'5%':>9}{'median':>9}{'mean':>9}")
        for key, label in (("samples", "samples"), ("held_out", "held-out")):
            values = [report[key][k] for k in ("min", "p5", "median", "mean")]
            print(f"{label:12}" + "".join(f"{v:>9.4f}" for v in values))
        share = report["closer_than_held_out"]
        print(f"{len(flagged)} of {len(samples)} samples ({share:.1%}) are closer to a training "
              f"sprite than any held-out sprite is ({report['threshold']:.4f})")
        for i in flagged[:10]:
            print(f"  {sample_names[i]}  {distances[i]:.4f}  {names[train_idx[indices[i]]]}")
    if args.sheet:
        shown = closest[:SHEET_PAIRS]
        try:
            nearest_sheet(samples[shown], train, indices[shown]).save(args.sheet)
        except (OSError, ValueError) as e:  # ValueError: an extension PIL does not know
            raise FIDError(f"Could not write {args.sheet} ({e}).") from None
        if not args.json:
            print(f"wrote {args.sheet}: the {len(shown)} closest samples (left), each beside its "
                  f"nearest training sprite (right)")
    print(json.dumps({"n_samples": len(samples), "n_train": len(train),
                      "n_held_out": len(val_idx), **report}))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings on the command line: one plain line, no source location."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    """Parse the command line and run one command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        if argv and argv[0] == "views":
            command, args = run_views, views_parser().parse_args(argv[1:])
        elif argv and argv[0] in ("measure", "nearest"):  # only these exact first words
            command = run_measure if argv[0] == "measure" else run_nearest
            args = sprite_parser(argv[0]).parse_args(argv[1:])
        else:
            command, args = run_fid, fid_parser().parse_args(argv)
        command(args)
    except FIDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # like argparse's usage errors and spriteflow.py
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous  # main() may be called from Python, e.g. by the tests
    return 0


if __name__ == "__main__":
    sys.exit(main())
