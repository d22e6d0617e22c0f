"""fid.py: FID and KID for SpriteFlow, written out in plain torch, numpy and scipy.

How good are the sprites a model draws? Looking at them is the best test, but a
number helps to compare runs. The usual numbers compare two *sets* of images
(real sprites and generated ones) through the eyes of a fixed image network,
Inception-v3, trained on ImageNet in 2015. Every image becomes a 2048-number
feature vector (the network's last pooling layer); the two sets become two
clouds of points in 2048-d space, and we measure how far apart the clouds are.

    python fid.py data/images samples/                  # two folders of images
    python fid.py data/images runs/latest/ckpt.pt       # sample 1000 sprites, score them
    python fid.py data/images --save-stats real.npz     # cache the real set's statistics
    python fid.py real.npz samples/                     # FID against cached statistics
    python fid.py data/images samples/ --background black --batch-size 20

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

From Python (e.g. the trainer, on in-memory sprites):

    import fid
    inception = fid.load_inception(device="cuda", allow_download=False)  # FIDError if no weights
    scores = fid.fid_kid(real_uint8, fake_uint8, inception)  # (N, 128, 128, 4) uint8 arrays
    scores["fid"], scores["kid_mean"], scores["kid_std"]

The Inception weights (91 MiB) come from --weights PATH, else from the torch
hub cache ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints),
else they are downloaded there once.
"""

import argparse
import hashlib
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
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
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
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17x17 -> 8x8 reduction: 1x1->3x3 (stride 2) | 1x1->1x7->7x1->3x3 (stride 2) | maxpool."""

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
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
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
        assert pool in ("avg", "max")
        self.pool = pool
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
        if self.pool == "avg":
            pooled = avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


def resize_for_inception(x):
    """Step 1 of the preprocessing: bilinear resize of [0, 1] images to 299x299.

    Exactly pytorch-fid's call: align_corners=False and no antialiasing (so a
    big image is subsampled, not blurred first). A 128x128 sprite is scaled up
    by 299/128, which blurs its hard pixel edges a little; the network was
    trained on photos, so this is what it expects to see anyway. Resizing a
    299x299 image to 299x299 returns it unchanged."""
    return F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to its 2048-d pool features, as pytorch-fid uses it.

    forward(x): x is a float tensor (N, 3, H, W) of RGB images in [0, 1], any
    H and W. Returns (N, 2048) float32 features. Call .eval() first (load_inception
    does): in eval mode BatchNorm uses its stored statistics, so an image's
    features do not depend on the other images in its batch.
    """

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
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        x = F.adaptive_avg_pool2d(x, output_size=(1, 1))  # 8x8x2048 -> 1x1x2048
        return x.flatten(1)


# -----------------------------------------------------------------------------
# 2. The weights: --weights PATH, else the torch hub cache, else download once


def cached_weights_path():
    """Where torch hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints,
    by default ~/.cache/torch/hub/checkpoints. pytorch-fid caches the same
    file there, so one download serves both."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _missing_weights_message(reason):
    return (f"The FID Inception weights are not available ({reason}): download {WEIGHTS_URL} "
            f"and put it at {cached_weights_path()}, or pass --weights PATH.")


def download_weights(dest, progress=True):
    """Download the weights file to dest, with a progress bar on stderr.

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
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(WEIGHTS_URL, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if progress:  # "\r" returns to the start of the line, so the bar redraws in place
                    size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
                    bar = f"[{'#' * int(30 * done / total):<30}] " if total else ""
                    print(f"\rdownloading {WEIGHTS_NAME} {bar}{size}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        digest = sha.hexdigest()
        if not digest.startswith(expected):
            raise FIDError(f"The downloaded weights have SHA-256 {digest[:8]}..., not {expected}..., "
                           f"so they were not kept; try again or fetch {WEIGHTS_URL} by hand.")
        os.replace(tmp, dest)
    except OSError as e:  # no network, HTTP error, disk full...
        raise FIDError(_missing_weights_message(f"the download failed: {e}")) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_inception(weights=None, device="cpu", allow_download=True, progress=True):
    """The FID Inception network with its real weights, in eval mode on device.

    weights: a path to the .pth file; None looks in the torch hub cache and,
    if allow_download (and the environment variable SPRITEFLOW_FID_NO_DOWNLOAD
    is not set), downloads it there once. Raises FIDError with a clear
    message when there are no weights. It never falls back to random weights:
    FID from an untrained network would be a meaningless number."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FIDError(f"The weights file {path} does not exist.")
    else:
        path = cached_weights_path()
        if not path.is_file():
            if not allow_download or os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
                raise FIDError(_missing_weights_message("downloading is switched off"))
            path = download_weights(path, progress=progress)
    try:
        # weights_only=True: unpickle tensors only, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(f"Could not read the weights file {path} ({type(e).__name__}: {e}).") from None
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise FIDError(f"{path} is not the FID Inception weights file (it holds no state dict).")
    # Say in one line what is wrong before load_state_dict would say it in hundreds.
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != expected[k].shape]
    if missing or unexpected or misshapen:
        problems = [f"{len(keys)} {what} such as {keys[0]}" for keys, what in
                    ((missing, "missing keys"), (unexpected, "unexpected keys"), (misshapen, "wrong shapes")) if keys]
        raise FIDError(f"{path} is not the FID Inception weights file ({'; '.join(problems)}).")
    model.load_state_dict(state, strict=True)  # every key, every shape, or fail
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# 3. Images: load, flatten RGBA onto a background, turn into [0, 1] tensors


def parse_background(spec):
    """'white', 'black', any colour name PIL knows, '#rrggbb' or 'R,G,B' -> (r, g, b) in 0..255."""
    if isinstance(spec, (tuple, list)):
        rgb = tuple(int(v) for v in spec)
    else:
        text = str(spec).strip()
        try:
            if "," in text and not text.lower().startswith("rgb"):
                rgb = tuple(int(v) for v in text.split(","))
            else:
                rgb = tuple(ImageColor.getrgb(text)[:3])
        except ValueError:
            raise FIDError(f"Cannot read the background colour {spec!r}: use white, black or R,G,B.") from None
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise FIDError(f"The background colour {spec!r} needs three values between 0 and 255.")
    return rgb


def composite_rgba(rgba, background=(255, 255, 255)):
    """Flatten an (..., H, W, 4) uint8 RGBA array onto a solid background.

    Standard "over" compositing, per pixel: out = a * rgb + (1 - a) * bg with
    a = alpha / 255, computed in integers and rounded to the nearest uint8.
    So a fully transparent pixel becomes exactly the background colour and an
    opaque pixel keeps its colour: the result is the RGB image you would
    see if the sprite were drawn on a page of that colour."""
    rgba = np.asarray(rgba)
    rgb = rgba[..., :3].astype(np.int32)
    a = rgba[..., 3:4].astype(np.int32)
    bg = np.asarray(background, dtype=np.int32)
    out = (rgb * a + bg * (255 - a) + 127) // 255  # +127: round half up, not down
    return out.astype(np.uint8)


def to_rgb_uint8(image, background=(255, 255, 255)):
    """Any image (a PIL image or an (H, W), (H, W, 1|2|3|4) uint8 array) -> (H, W, 3) uint8 RGB.

    Grayscale becomes three equal channels, palette images are looked up,
    and anything with transparency (RGBA, LA, or a palette image with a
    transparent colour) is composited onto the background."""
    if isinstance(image, Image.Image):
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
        image = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise FIDError(f"Images must be uint8 arrays, got {array.dtype}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise FIDError(f"Cannot read an image array of shape {array.shape} as (H, W, channels).")
    channels = array.shape[-1]
    if channels == 2:  # gray + alpha -> RGBA
        array = np.concatenate([array[..., :1]] * 3 + [array[..., 1:]], axis=-1)
    elif channels == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        array = composite_rgba(array, background)
    return np.ascontiguousarray(array)


def to_inception_input(rgb_uint8):
    """(H, W, 3) uint8 -> (1, 3, 299, 299) float32 tensor, exactly like pytorch-fid.

    pytorch-fid reads each file with PIL, converts it with ToTensor (uint8 /
    255 -> float32 in [0, 1], channels first) and resizes inside the network.
    We resize here, one image at a time, so that a folder of mixed sizes can
    be stacked into one batch. Bilinear resizing treats every image on its
    own, so this gives the very same numbers; the network's own resize is
    then a no-op on a 299x299 input."""
    x = torch.tensor(rgb_uint8).permute(2, 0, 1).float().div(255)[None]  # a copy: PIL's arrays are read-only
    return resize_for_inception(x)


def list_images(folder):
    """All image files under folder, recursively, sorted for a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_image_file(path, background=(255, 255, 255)):
    """One image file -> (H, W, 3) uint8 RGB. The first frame of an animated GIF or WebP."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_uint8(image, background)
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f"Could not read the image {path} ({type(e).__name__}: {e}).") from None


# -----------------------------------------------------------------------------
# 4. Features and their statistics


@torch.no_grad()
def features_from_rgb(rgb_images, model, batch_size=50, device=None, progress=None):
    """Inception features of a sequence of (H, W, 3) uint8 RGB images -> (N, 2048) float64.

    rgb_images may be any iterable (a lazy one keeps only a batch in memory).
    progress, if given, is called with the number of images done so far."""
    if device is None:
        device = next(model.parameters()).device
    model.eval()  # BatchNorm with stored statistics: features independent of the batch
    out, batch, done = [], [], 0

    def flush():
        nonlocal done
        x = torch.cat(batch).to(device)
        out.append(model(x).double().cpu().numpy())  # float32 network, float64 statistics
        done += len(batch)
        batch.clear()
        if progress:
            progress(done)

    for rgb in rgb_images:
        batch.append(to_inception_input(rgb))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(out)


def _as_image_list(images):
    """uint8 images as an (N, H, W, C) array/tensor or a list of (H, W[, C]) ones -> a list of arrays."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise FIDError(f"Expected images of shape (N, H, W, C), got {images.shape}.")
        return list(images)
    return [im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else im for im in images]


def features_from_uint8(images, model, batch_size=50, device=None, background=(255, 255, 255)):
    """In-memory uint8 images (N, H, W, 4) RGBA (or RGB, or gray; channels last) -> (N, 2048) float64."""
    bg = parse_background(background)
    return features_from_rgb((to_rgb_uint8(im, bg) for im in _as_image_list(images)), model, batch_size, device)


def features_from_folder(folder, model, batch_size=50, device=None, background=(255, 255, 255), progress=None):
    """Features of every image under folder (recursively) -> (N, 2048) float64."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder.")
    files = list_images(folder)
    if not files:
        raise FIDError(f"{folder} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    bg = parse_background(background)
    return features_from_rgb((load_image_file(f, bg) for f in files), model, batch_size, device, progress)


def statistics(feats):
    """Mean and covariance of (N, d) features: mu = mean over rows, sigma = np.cov (divides by N - 1)."""
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n < 2:
        raise FIDError(f"FID needs at least 2 images, got {n}.")
    if n < d:
        warnings.warn(f"Only {n} images for {d}-d features: the covariance is singular and FID is "
                      f"biased upward at this size; KID is the better metric for small n.", stacklevel=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def feature_stats_from_uint8(images, model, batch_size=50, device=None, background=(255, 255, 255)):
    """In-memory uint8 images -> (mu, sigma) for FID. See features_from_uint8."""
    return statistics(features_from_uint8(images, model, batch_size, device, background))


# -----------------------------------------------------------------------------
# 5. The two distances


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))

    sqrtm is the matrix square root. sigma1 sigma2 is not symmetric, so its
    square root may come out with tiny imaginary parts from rounding; those
    are dropped. Follows pytorch-fid's calculate_frechet_distance."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"The means have different shapes: {mu1.shape} and {mu2.shape}.")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Covariances of shapes {sigma1.shape} and {sigma2.shape} "
                         f"do not fit means of size {mu1.size}.")
    diff = mu1 - mu2

    # SciPy >= 1.16 deprecates sqrtm(..., disp=False), which used to return an
    # error estimate. We call it plainly and check the result ourselves. With
    # singular covariances (fewer images than dimensions) it can fail and
    # return inf or nan: then nudge both covariances by eps * I, which makes
    # them non-singular, and try again. Like pytorch-fid, the nudge is used
    # only inside the square root; the traces below use the original matrices.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # "matrix is singular": we check below
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
            raise ValueError(f"The matrix square root has an imaginary component of {worst:.3g} on its diagonal.")
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
        raise ValueError(f"KID needs two (N, d) feature arrays of equal d, got {f1.shape} and {f2.shape}.")
    d = f1.shape[1]
    m = min(len(f1), len(f2))
    if subset_size > m:
        warnings.warn(f"KID: subset size {subset_size} is larger than the {m} samples available; using {m}.",
                      stacklevel=2)
        subset_size = m
    if subset_size < 2:
        raise FIDError(f"KID needs at least 2 images on each side, got {len(f1)} and {len(f2)}.")
    m = subset_size
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
    n = len(feats2)
    a = (feats2 - mu2) / np.sqrt(n - 1)  # sigma2 = a.T @ a, exactly np.cov
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
    candidates = []  # (rows, the other side's (mu, sigma), this side's mu, this side's features)
    if feats_a is not None and len(feats_a) < feats_a.shape[1]:
        candidates.append((len(feats_a), stats_b, stats_a[0], feats_a))
    if feats_b is not None and len(feats_b) < feats_b.shape[1]:
        candidates.append((len(feats_b), stats_a, stats_b[0], feats_b))
    if not candidates:
        return frechet_distance(*stats_a, *stats_b)
    # FID is symmetric, so either side may play "feats2"; the smaller is faster.
    _, (mu_other, sigma_other), mu_f, feats = min(candidates, key=lambda c: c[0])
    return frechet_distance_low_rank(mu_other, sigma_other, mu_f, feats)


def fid_kid(images_a, images_b, model, batch_size=50, device=None, background=(255, 255, 255),
            num_subsets=100, subset_size=1000, seed=0):
    """FID and KID between two sets of in-memory uint8 images (e.g. real and
    generated sprites, (N, 128, 128, 4) RGBA). Returns a dict with the keys
    fid, kid_mean and kid_std. For the trainer's validation."""
    fa = features_from_uint8(images_a, model, batch_size, device, background)
    fb = features_from_uint8(images_b, model, batch_size, device, background)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-n warnings are expected here, every epoch
        fid = fid_between(statistics(fa), statistics(fb), fa, fb)
        kid_mean, kid_std = kid(fa, fb, num_subsets, subset_size, seed)
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}


# -----------------------------------------------------------------------------
# 6. Command line


def load_stats_file(path):
    """A pytorch-fid style .npz with 'mu' (d,) and 'sigma' (d, d) -> (mu, sigma)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                held = ", ".join(data.files) or "nothing"
                raise FIDError(f"{path} has no 'mu' and 'sigma' arrays (it holds: {held}).")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f"Could not read the statistics file {path} ({type(e).__name__}: {e}).") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise FIDError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
                       f"expected (d,) and (d, d).")
    return mu, sigma


def sample_checkpoint(path, args, device):
    """Draw args.num_samples sprites from a SpriteFlow checkpoint -> (N, 128, 128, 4) uint8."""
    try:
        import spriteflow  # lazily: only this path needs it
    except ImportError as e:
        raise FIDError(f"Scoring a checkpoint needs spriteflow.py next to fid.py ({e}).") from None
    if not hasattr(spriteflow, "load_model_from_checkpoint"):
        raise FIDError("This spriteflow.py has no load_model_from_checkpoint(), so fid.py cannot sample from it.")
    try:
        model = spriteflow.load_model_from_checkpoint(str(path), device)
    except spriteflow.UserError as e:
        raise FIDError(str(e).rstrip(".") + ".") from None
    print(f"sampling {args.num_samples} sprites from {path} ({args.sampler}, {args.steps} steps)", file=sys.stderr)
    images = spriteflow.generate(model, args.num_samples, steps=args.steps, sampler=args.sampler,
                                 seed=args.seed, device=device)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # leave the GPU memory to Inception
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 4, images.shape
    return images


def load_side(path, args, device, get_model):
    """One command-line path -> (mu, sigma, features), features None for a .npz of statistics."""
    path = Path(path)
    if not path.exists():
        raise FIDError(f"{path} does not exist.")
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_stats_file(path) + (None,)
    if path.is_file() and path.suffix.lower() == ".pt":
        feats = features_from_uint8(sample_checkpoint(path, args, device), get_model(),
                                    args.batch_size, device, args.background)
    elif path.is_dir():
        progress = None
        if sys.stderr.isatty():
            def progress(done):
                print(f"\r{path}: {done} images", end="", file=sys.stderr, flush=True)
        feats = features_from_folder(path, get_model(), args.batch_size, device, args.background, progress)
        if progress:
            print(file=sys.stderr)
    else:
        raise FIDError(f"{path} is neither a folder of images, a .npz of statistics nor a .pt checkpoint.")
    return statistics(feats) + (feats,)


def build_parser():
    p = argparse.ArgumentParser(
        description="FID and KID between two sets of images (folders, .npz statistics, or a SpriteFlow checkpoint).")
    p.add_argument("path_a", metavar="PATH_A", help="folder of images, or .npz with mu and sigma")
    p.add_argument("path_b", metavar="PATH_B", nargs="?",
                   help="folder of images, .npz with mu and sigma, or a SpriteFlow checkpoint (.pt)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write mu and sigma of PATH_A to this file")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-samples", type=int, default=1000, help="sprites to sample from a checkpoint")
    p.add_argument("--weights", help=f"path to {WEIGHTS_NAME} (default: torch hub cache, else download)")
    p.add_argument("--no-download", action="store_true", help="never download the weights")
    p.add_argument("--background", default="white", help="colour behind transparent pixels: white, black or R,G,B")
    p.add_argument("--sampler", choices=["euler", "heun", "sde"], default="heun")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings on the command line: one plain line, no source location."""
    print(f"warning: {message}", file=sys.stderr)


def run(args):
    if args.path_b is None and not args.save_stats:
        raise FIDError("Give two paths to compare, or one path and --save-stats OUT.npz.")
    if args.batch_size < 1 or args.num_samples < 2 or args.steps < 1:
        raise FIDError("--batch-size and --steps must be at least 1, --num-samples at least 2.")
    parse_background(args.background)  # fail early on a bad colour
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise FIDError(f"Unknown device {args.device!r}: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FIDError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")

    model = None

    def get_model():  # load Inception only when a side needs features
        nonlocal model
        if model is None:
            model = load_inception(args.weights, device, allow_download=not args.no_download)
        return model

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
    if args.path_b is None:
        return
    mu_b, sigma_b, feats_b = load_side(args.path_b, args, device, get_model)
    if mu_a.shape != mu_b.shape:
        raise FIDError(f"The two sides have features of different sizes ({mu_a.size} and {mu_b.size}).")
    try:
        fid = fid_between((mu_a, sigma_a), (mu_b, sigma_b), feats_a, feats_b)
    except ValueError as e:  # e.g. a .npz whose sigma is not a covariance matrix
        raise FIDError(f"Cannot compute FID: {e}") from None
    print(f"FID: {fid:.4f}")
    if feats_a is None or feats_b is None:
        print("KID: not available (KID needs images on both sides, and a .npz holds statistics only)")
    else:
        kid_mean, kid_std = kid(feats_a, feats_b)
        pm = "\u00b1"
        try:
            pm.encode(sys.stdout.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            pm = "+/-"  # a terminal that cannot show the plus-minus sign
        print(f"KID: {kid_mean:.6f} {pm} {kid_std:.6f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        run(args)
    except FIDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous  # main() may be called from Python, e.g. by the tests
    return 0


if __name__ == "__main__":
    sys.exit(main())
