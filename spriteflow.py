"""SpriteFlow: flow matching for 128x128 RGBA pixel-art characters, in one file.

Read it top to bottom: data -> noise schedules -> Gaussian probability path ->
U-Net -> samplers and guidance -> EMA and LR schedule -> trainer -> what an
invertible flow can do -> command line. Time runs from t=0 (pure noise) to
t=1 (data) everywhere. The measurements behind every default are in the lab
record, data/figures/README.md.

    python spriteflow.py train --data data/images      # 30 minutes by default
    python spriteflow.py sample                        # newest run, 16 sprites
"""

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

try:
    import fcntl  # one writer per run folder (POSIX); elsewhere the lock is skipped
except ImportError:
    fcntl = None


class UserError(Exception):
    """Bad input from the user: printed as one sentence, never as a traceback."""


# -----------------------------------------------------------------------------
# 1. Data
#
# A sprite is a 128x128 RGBA image. The whole set is decoded once into a uint8
# tensor (N, 4, 128, 128): 2,000 sprites take 130 MB, so a training step is a
# random index into memory, not a PNG decode. Per batch,
#
#     x = byte / 127.5 - 1        so every channel, alpha too, lies in [-1, 1].
#
# Pixel art must stay on its pixel grid, so resizing is nearest-neighbour only
# (bilinear filtering invents colours no sprite has), and non-square images
# are padded with transparent pixels, never stretched. Where alpha is 0 the
# RGB is set to 0: an invisible pixel's colour is junk the model should not
# learn. Images in subfolders are labelled by the top-level subfolder's name
# (torchvision's ImageFolder convention); a flat folder has no classes.
#
# Pixel art is drawn on a coarse grid: the built-in sprites are 32x32 art shown
# at 4x, so every 4x4 block is one colour. detect_grid finds that block size k
# in the data; snap_to_grid puts samples on it (each block gets the mean colour
# of its opaque pixels, the least-squares choice for a small symmetric jitter).
# -----------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".gif", ".webp", ".bmp"}


def load_rgba(path, size=128):
    """Decode one image file into a (size, size, 4) uint8 array (see above)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as img:
            img.seek(0)  # first frame of an animated GIF/WebP
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: scale, don't clip
                a = np.asarray(img, np.float64)
                a = (a * 255 if a.max() <= 1 else a) if img.mode == "F" else a / 257
                img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
            img = img.convert("RGBA")  # honours a palette's or grey/RGB image's transparency key
    for w in caught:  # e.g. Pillow's decompression-bomb warning, which does not name the file
        warnings.warn(f"{path}: {w.message}")
    side = max(img.size)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    arr = np.array(canvas.resize((size, size), Image.NEAREST), dtype=np.uint8)  # (size, size, 4)
    arr[arr[..., 3] == 0, :3] = 0
    return arr


def load_folder(folder, size=128, labels=True):
    """Every readable image under `folder` -> (uint8 (N, 4, size, size), names, classes, y).

    names are paths relative to the folder. With labels, and every image in a
    subfolder (two or more of them), classes are the sorted subfolder names and
    y (N,) the class of each image; otherwise classes is [] and y None.
    """
    folder, skipped, arrays, names = Path(folder), {}, [], []
    if not folder.is_dir():
        raise UserError(f"data folder '{folder}' does not exist or is not a folder")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)]
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.setdefault(p.suffix.lower() or "(no suffix)", []).append(p)
            continue
        try:
            arrays.append(load_rgba(p, size))
            names.append(p.relative_to(folder).as_posix())
        except Exception as e:  # PIL raises many types for broken files
            warnings.warn(f"skipping unreadable image {p}: {e}")
    for suffix, paths in skipped.items():
        hint = "; JPEG blurs pixel art, export PNG instead" if suffix in (".jpg", ".jpeg") else ""
        warnings.warn(f"skipped {len(paths)} {suffix} file(s) such as {paths[0]}: only PNG, GIF, WebP and BMP are read{hint}")
    if not arrays:
        n = len(files) - sum(map(len, skipped.values()))
        raise UserError(f"none of the {n} images in '{folder}' could be read" if n else f"data folder '{folder}' contains no PNG, GIF, WebP or BMP images")
    empty = [n for n, a in zip(names, arrays) if (a[..., 3] > 0).mean() < 0.01]
    if empty:
        warnings.warn(f"{len(empty)} image(s) such as {folder / empty[0]} are nearly empty (under 1% opaque) after "
                      f"loading; a very wide or tall image shrinks to a sliver when padded to a square")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 4, size, size)
    tops = [n.split("/")[0] if "/" in n else None for n in names]
    classes = sorted(set(tops) - {None})
    if None in tops and classes and labels:
        warnings.warn(f"{tops.count(None)} images sit directly in '{folder}', outside the class folders; training without classes")
    if not labels or len(classes) < 2 or None in tops:
        return x, names, [], None
    return x, names, classes, torch.tensor([classes.index(c) for c in tops])


def split_train_val(names, val_fraction):
    """Hold out a file when the hash of its name, read as a number in [0, 1), is below
    val_fraction: unlike a seeded shuffle, every sprite keeps its side of the split
    when files are added later. Tiny folders still hold out one (the smallest hash)."""
    u = [zlib.crc32(name.encode()) / 2**32 for name in names]
    val = [i for i in range(len(names)) if u[i] < val_fraction]
    if not val and len(names) > 1 and val_fraction > 0:
        val = [min(range(len(names)), key=u.__getitem__)]
    train = sorted(set(range(len(names))) - set(val))
    return torch.tensor(train or val, dtype=torch.long), torch.tensor(val or train, dtype=torch.long)


def detect_grid(x_uint8, share=0.99):
    """The largest k in 8, 4, 2 for which `share` of the images (N, 4, H, W) are made
    of k x k blocks of one colour; 1 if there is none."""
    for k in (8, 4, 2):
        corner = x_uint8[:, :, ::k, ::k].repeat_interleave(k, 2).repeat_interleave(k, 3)
        if (x_uint8 == corner).flatten(1).all(1).float().mean() >= share:
            return k
    return 1


def snap_to_grid(x, k):
    """float (B, 4, H, W) -> the same, constant on every k x k block: opaque where the
    block's mean alpha is >= 0, coloured with the mean of its opaque pixels."""
    if k == 1:
        return x
    opaque = (x[:, 3:] >= 0).float()  # (B, 1, H, W)
    rgb = F.avg_pool2d(x[:, :3] * opaque, k) / F.avg_pool2d(opaque, k).clamp(min=1e-6)
    alpha = torch.where(F.avg_pool2d(x[:, 3:], k) >= 0, 1.0, -1.0)
    return F.interpolate(torch.cat([rgb, alpha], 1), scale_factor=k, mode="nearest")


def to_float(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]: data on the same scale as the N(0, I) noise."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x, binary_alpha=True):
    """float (B, 4, H, W) in about [-1, 1] -> uint8 (B, H, W, 4), ready for PNG. Pixel art
    has binary alpha, so alpha snaps to 0 or 255 and transparent pixels get RGB 0."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()
    if binary_alpha:
        x[..., 3] = torch.where(x[..., 3] >= 128, 255, 0).to(torch.uint8)
        x[..., :3] *= (x[..., 3:] > 0).to(torch.uint8)
    return x  # (B, H, W, 4)


# -----------------------------------------------------------------------------
# 2. Noise schedules
#
# A schedule is a pair of scalar functions of time with
#
#     alpha_0 = 0, alpha_1 = 1        (how much data is in x_t)
#     beta_0  = 1, beta_1  = 0        (how much noise is in x_t)
#
# and we need their exact time derivatives d_alpha, d_beta for the vector
# field in section 3. Two classics:
#
#     linear:  alpha = t,            beta = 1 - t            (rectified flow)
#     cosine:  alpha = sin(pi t/2),  beta = cos(pi t/2)      (alpha^2 + beta^2 = 1)
#
# The original project's cosine schedule missed these boundary values, so its
# path did not start at pure noise or end at pure data; a property test pins
# the four boundary values and the derivatives against autograd.
# -----------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine")


def schedule(name, t):
    """(alpha, beta, d_alpha, d_beta) at time t (a tensor of any shape)."""
    if name == "linear":
        one = torch.ones_like(t)
        return t, 1 - t, one, -one
    if name == "cosine":
        # beta is written as sin(pi (1-t)/2) (= cos(pi t/2)) so that both
        # endpoints come out exact in floating point: sin(0) is exactly 0.
        half_pi = math.pi / 2
        alpha, beta = torch.sin(half_pi * t), torch.sin(half_pi * (1 - t))
        return alpha, beta, half_pi * beta, -half_pi * alpha
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")


# -----------------------------------------------------------------------------
# 3. The Gaussian conditional probability path
#
# Fix one data point z (a sprite). The conditional path blends noise into it:
#
#     x_t = alpha_t z + beta_t eps,   eps ~ N(0, I)
#     p_t(x | z) = N(x; alpha_t z, beta_t^2 I)
#
# so x_0 = eps is pure noise and x_1 = z is the sprite. Differentiating x_t in
# t for fixed (z, eps) gives the conditional vector field that moves along it,
#
#     u_t(x | z) = d_alpha z + d_beta eps = d_alpha z + (d_beta / beta)(x - alpha z)
#
# and the conditional score is the gradient of the Gaussian's log-density,
#
#     grad log p_t(x | z) = -(x - alpha z) / beta^2.
#
# Flow matching trains a network u_theta(x, t) to regress u_t(x_t | z) over
# random (z, t, eps). The minimiser is the marginal vector field u_t(x) =
# E[u_t(x | z) | x_t = x], whose ODE carries N(0, I) to the data distribution.
#
# Vector field <-> score. Both are linear in (x, z) for a Gaussian path, so we
# can eliminate z. From the score, z = (x + beta^2 score) / alpha; put that into
# u_t and solve for the score:
#
#     score = (alpha u - d_alpha x) / (beta (beta d_alpha - alpha d_beta))
#
# The same identity holds for the marginals (both sides are conditional
# expectations given x), so a trained vector field gives the SDE sampler its
# score for free. The denominator vanishes as beta -> 0 (t -> 1), where the
# data's score is undefined; the SDE scales its noise with beta (section 5).
# -----------------------------------------------------------------------------


def expand(t, x):
    """Broadcast per-sample times (B,) against images (B, C, H, W)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def sample_path(z, t, eps, sched):
    """x_t = alpha_t z + beta_t eps."""
    alpha, beta, _, _ = schedule(sched, expand(t, z))
    return alpha * z + beta * eps


def conditional_vector_field(z, t, eps, sched):
    """u_t(x_t | z) = d_alpha z + d_beta eps, which is d/dt x_t for fixed (z, eps)."""
    _, _, d_alpha, d_beta = schedule(sched, expand(t, z))
    return d_alpha * z + d_beta * eps


def conditional_score(x, z, t, sched):
    """grad_x log N(x; alpha_t z, beta_t^2 I) = -(x - alpha_t z) / beta_t^2."""
    alpha, beta, _, _ = schedule(sched, expand(t, x))
    return -(x - alpha * z) / beta**2


def score_from_vector_field(u, x, t, sched):
    """score = (alpha u - d_alpha x) / (beta (beta d_alpha - alpha d_beta)); needs beta > 0."""
    alpha, beta, d_alpha, d_beta = schedule(sched, expand(t, x))
    return (alpha * u - d_alpha * x) / (beta * (beta * d_alpha - alpha * d_beta))


# What the network predicts. The obvious target is the velocity u itself. But
# the U-Net works on pixel-unshuffled patches (section 4): at 1/4 resolution
# each position holds a 4x4x4 = 64-number patch. A sprite's patch is nearly
# constant, while the noise part of the velocity, d_beta eps, is a full
# 64-dimensional Gaussian the network must reproduce exactly; its failures
# show up as colour speckle. Predicting the clean sprite instead ("data" or
# x-prediction) asks only for the low-dimensional part, and we turn it back
# into a velocity by putting eps = (x - alpha z_hat) / beta into u_t(x | z):
#
#     u = a z_hat + b x,   a = d_alpha - d_beta alpha / beta,   b = d_beta / beta
#
# with beta clamped at BETA_MIN so t -> 1 stays finite. The loss is always
# measured on velocities, so both targets optimise the same objective.

TARGETS = ("velocity", "data")
BETA_MIN = 0.05

# Where along the path is a sprite decided? On the linear path the noise-to-
# signal ratio is beta/alpha = (1-t)/t. But a 4x4 block of one colour averages
# 16 independent noise draws, so at block scale the ratio is only (1-t)/(4t):
# silhouette and colours are settled at small t. The time shift
#
#     t -> t / (t + s (1 - t))        (0 -> 0, 1 -> 1, monotone)
#
# multiplies the ratio (1-t)/t by s; s = 4 shows the network the block-level
# noise levels a native 32-px sprite would see. We warp the training times with
# it: the path and its ODE are unchanged, only where training effort goes moves.


def shift_time(t, s):
    """t -> t / (t + s (1 - t)): multiplies the noise-to-signal ratio (1-t)/t by s."""
    return t / (t + s * (1 - t))


def data_coefficients(t, sched, like):
    """(a, b) with u = a z_hat + b x (see above), beta clamped at BETA_MIN."""
    alpha, beta, d_alpha, d_beta = schedule(sched, expand(t, like))
    beta = beta.clamp(min=BETA_MIN)
    return d_alpha - d_beta * alpha / beta, d_beta / beta


def velocity_from_data(z_hat, x, t, sched):
    """Turn a predicted clean sprite into a velocity: u = a z_hat + b x."""
    a, b = data_coefficients(t, sched, x)
    return a * z_hat + b * x


def data_from_velocity(u, x, t, sched):
    """The inverse of velocity_from_data: the sprite that velocity u points at."""
    a, b = data_coefficients(t, sched, x)
    return (u - b * x) / a


# -----------------------------------------------------------------------------
# 4. Time- and class-conditioned U-Net
#
# u_theta(x, t, c): an image-to-image network told the time t and, optionally,
# the class c of the sprite to draw.
#
# * Time embedding: sinusoids sin(1000 t w_k), cos(1000 t w_k) with geometric
#   frequencies w_k, then an MLP. A class adds a learned vector to it; class
#   index n_classes means "no class", so one network is both the conditional
#   and the unconditional model (classifier-free guidance, section 5). Every
#   residual block turns the embedding into a per-channel scale and shift.
# * GroupNorm, not BatchNorm (the original's choice): BatchNorm mixes the
#   statistics of a batch, so one sprite's output would depend on the others
#   and training would differ from sampling. 8 groups rather than the usual 32:
#   at 32 channels, 32 groups resets every feature map to mean 0, variance 1,
#   losing how much of a feature (a colour, an outline) the sprite holds.
# * Skip connections carry fine detail from each down level to its up level;
#   self-attention runs at the smallest feature map (8x8), where it is cheap
#   and lets the whole character coordinate (both arms, both eyes).
# * The output layer starts at zero, so early training is stable.
# * Pixel-unshuffle stem: a 128x128x4 image is rearranged losslessly into a
#   32x32x64 tensor (factor 4) before the first convolution, and pixel-shuffle
#   undoes it at the end. Convolutions touch 16x fewer positions, which makes
#   CPU training practical; a 4x4 block of one colour becomes one position.
# -----------------------------------------------------------------------------


def group_norm(channels, groups):
    """GroupNorm with up to `groups` groups: statistics over channel groups of one sample."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, 4 dim). t is scaled by 1000 so that the slowest frequency
    10000^(-k/half) still turns through a useful angle as t goes from 0 to 1."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]  # (B, dim/2)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, 4 dim)


class ResBlock(nn.Module):
    """x + F(x, emb). The embedding enters as a per-channel scale and shift of the
    normalised features, h -> h (1 + scale) + shift."""

    def __init__(self, c_in, c_out, t_dim, groups):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, 2 * c_out)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V per head over all positions, Q, K, V from 1x1 convs."""

    def __init__(self, channels, groups, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """The network for x (B, 4, 128, 128), t (B,) and class labels c (B,) or None.

    With the CPU defaults (widths 32, 64, 128; 2 blocks; unshuffle 4):

        x (B, 4, 128, 128) --unshuffle--> (B, 64, 32, 32) --conv--> (B, 32, 32, 32)
        down  32x32: 2 ResBlocks (32 ch)  -> stride-2 conv -> 16x16
              16x16: 2 ResBlocks (64 ch)  -> stride-2 conv ->  8x8
               8x8:  2 ResBlocks (128 ch)
        mid    8x8:  ResBlock, SelfAttention over the 64 positions, ResBlock
        up     8x8:  3 ResBlocks, each fed the matching down output (skip) -> upsample
              16x16: 3 ResBlocks with skips -> upsample
              32x32: 3 ResBlocks with skips
        head (B, 32, 32, 32) --conv--> (B, 64, 32, 32) --shuffle--> (B, 4, 128, 128)

    `target` and `schedule` say what the raw output means (section 3).
    """

    def __init__(self, channels=(32, 64, 128), blocks=2, unshuffle=4, target="data", schedule="linear", groups=8, n_classes=0):
        super().__init__()
        self.target, self.schedule, self.n_classes = target, schedule, n_classes
        c0, t_dim = channels[0], 4 * channels[0]
        patch = 4 * unshuffle * unshuffle  # channels after pixel-unshuffle
        self.time_embedding = TimeEmbedding(c0)
        if n_classes:
            self.class_embedding = nn.Embedding(n_classes + 1, t_dim)  # row n_classes: "no class"
            nn.init.zeros_(self.class_embedding.weight)
        self.stem = nn.Sequential(nn.PixelUnshuffle(unshuffle), nn.Conv2d(patch, c0, 3, padding=1))
        self.down, skip_channels, ch = nn.ModuleList(), [c0], c0
        for level, c in enumerate(channels):
            for _ in range(blocks):
                self.down.append(ResBlock(ch, c, t_dim, groups))
                ch = c
                skip_channels.append(ch)
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve H, W
                skip_channels.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim, groups), SelfAttention(ch, groups), ResBlock(ch, ch, t_dim, groups)])
        self.up = nn.ModuleList()
        for level, c in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(ch + skip_channels.pop(), c, t_dim, groups))
                ch = c
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.head = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, patch, 3, padding=1), nn.PixelShuffle(unshuffle))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x, t, c=None):
        emb = self.time_embedding(t)
        if self.n_classes:
            emb = emb + self.class_embedding(torch.full_like(t, self.n_classes, dtype=torch.long) if c is None else c)
        # `skips` collects the stem's and every down layer's output; the up path
        # consumes them in reverse, so each level meets its own resolution.
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.head(h)  # (B, 4, 128, 128)

    def velocity(self, x, t, c=None):
        """u_theta(x, t, c), whatever the network's raw output means."""
        out = self(x, t, c)
        return out if self.target == "velocity" else velocity_from_data(out, x, t, self.schedule)

    def clean(self, x, t, c=None):
        """z_hat(x, t, c): the sprite the flow is heading for, as the network sees it at t."""
        out = self(x, t, c)
        return out if self.target == "data" else data_from_velocity(out, x, t, self.schedule)


# -----------------------------------------------------------------------------
# 5. Samplers and guidance
#
# Sampling integrates from noise X_0 ~ N(0, I) at t=0 to a sprite at t=1 on
# the grid t_i = shift_time(i/N, s), step h_i = t_{i+1} - t_i (uniform, s = 1,
# by default: a grid warped like the training times takes big steps near t=1
# and leaves colour regions grainy).
#
# Euler ODE (first order, global error O(h)):
#     X_{i+1} = X_i + h_i u(X_i, t_i)
# Heun ODE (second order, O(h^2); two network calls per step):
#     X'      = X_i + h_i u(X_i, t_i)
#     X_{i+1} = X_i + h_i/2 [u(X_i, t_i) + u(X', t_{i+1})]
# Euler-Maruyama for the Langevin-corrected SDE, which has the same marginals
# p_t as the ODE for any noise level sigma_t:
#     dX = [u_t(X) + 1/2 sigma_t^2 score_t(X)] dt + sigma_t dW
#     X_{i+1} = X_i + h_i [u + 1/2 sigma_t^2 score] + sigma_t sqrt(h_i) xi,  xi ~ N(0, I)
# The step ADDS the drift and draws Gaussian noise, once per step (the
# original multiplied and drew uniform noise). sigma_t = sigma beta_t: the
# score grows like 1/beta near t=1, so sigma_t^2 score -> 0 and the last steps
# stay finite. Heun with 20 steps is the default: halving h cuts its error
# about 4x, and it beat Euler with 100 steps (lab record, "Sampling").
#
# Guidance. A model trained with labels knows two fields: u(x, t, c) for class
# c and u(x, t, -) with no class, the average over classes. Classifier-free
# guidance extrapolates from the second towards the first:
#
#     u_w = u(x, t, -) + w (u(x, t, c) - u(x, t, -))
#
# w = 1 is the plain conditional flow (and costs one call); w > 1 pushes each
# sprite further towards what sets its class apart, trading variety for clean,
# typical sprites. Autoguidance (Karras et al. 2024) needs no labels: the weaker
# field comes from a worse version of the same model, here the run's own EMA
# snapshot from early in training. Its errors are the main model's errors, only
# larger, so extrapolating away from it removes some of them:
#
#     u_w = u_guide + w (u_main - u_guide)
#
# but only in luminance and alpha. The guide's colours are not the main model's
# colours with a larger error; they are duller, so guiding chroma drives every
# hue to a saturated primary. Shape, outline and shading live in luminance and
# alpha (lab record, "Autoguidance"), so the chroma comes from u_main alone.
#
# Guiding the clean-sprite guess z_hat is the same as guiding u: u = a z_hat
# + b x is affine in z_hat with coefficients that do not depend on the network,
# so (1 - w) u_0 + w u_1 = a ((1 - w) z_0 + w z_1) + b x. We guide z_hat because
# there the result can be clamped to [-1, 1], the range of every sprite:
# clamping moves each coordinate towards any valid z, so it only removes error.
#
# What guidance costs: a second field at every call. For classifier-free
# guidance both fields come from one network, so x is sent through once as a
# batch of 2B (class c, then "no class"); autoguidance calls a second network.
# Either way a guided sprite costs about twice an unguided one, and w = 1 skips
# the weak field. Guidance is a sampling-time choice: the same checkpoint gives
# plain and guided sprites, so w can be tuned after training.
# -----------------------------------------------------------------------------

SAMPLERS = ("euler", "heun", "sde")
GUIDE_INTERVAL = (0.0, 1.0)  # guidance acts for t in this interval


def time_grid(steps, shift=1.0):
    """t_0 = 0 < t_1 < ... < t_N = 1: uniform steps, warped by shift_time (section 3)."""
    return shift_time(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift).tolist()


def at(x, t):
    """The scalar time t for every sample in the batch, shape (B,)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_euler(velocity, x, steps, frames=None, shift=1.0):
    """Euler's method from t=0 to t=1 in `steps` steps; frames collects each state."""
    ts = time_grid(steps, shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, at(x, t))
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def sample_heun(velocity, x, steps, frames=None, shift=1.0, ts=None):
    """Heun's method: an Euler predictor, then the average of the slopes at both ends.
    `ts` overrides the grid; a decreasing grid integrates backwards (section 8)."""
    ts = time_grid(steps, shift) if ts is None else ts
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        u = velocity(x, at(x, t))
        x_euler = x + h * u
        x = x + 0.5 * h * (u + velocity(x_euler, at(x, t_next)))
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def sample_sde(velocity, x, steps, sched, sigma=1.0, score=None, generator=None, frames=None, shift=1.0):
    """Euler-Maruyama; `score` defaults to the one implied by `velocity` (section 3).
    A larger sigma injects more noise and pulls harder towards high density; any
    sigma leaves the marginals p_t unchanged in exact arithmetic."""
    ts = time_grid(steps, shift)
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        h, t = t_next - t_now, at(x, t_now)
        u = velocity(x, t)
        s = score(x, t) if score is not None else score_from_vector_field(u, x, t, sched)
        sigma_t = sigma * expand(schedule(sched, t)[1], x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + h * (u + 0.5 * sigma_t**2 * s) + sigma_t * math.sqrt(h) * noise
        if frames is not None:
            frames.append(x)
    return x


def autocast(device, bf16):
    """bf16 autocast when asked for (section 7 decides where it pays); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16) and device.type in ("cuda", "cpu"))


def guided_clean(model, c=None, w=1.0, guide=None, interval=GUIDE_INTERVAL, bf16=False):
    """z_w(x, t): the clean-sprite guess for labels c (B,) or None, guided as above by
    classifier-free guidance (a model with classes) or by the guide (luminance and alpha)."""
    weak = (model.n_classes > 0 and c is not None) or guide is not None

    def clean(x, t):
        with autocast(x.device, bf16):
            if w == 1 or not weak or not interval[0] <= t[0].item() <= interval[1]:
                return model.clean(x, t, c).float()
            if guide is None:  # one batched call: conditional and unconditional halves
                none = torch.full_like(c, model.n_classes)
                z_main, z_weak = model.clean(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, none])).float().chunk(2)
            else:
                z_main, z_weak = model.clean(x, t, c).float(), guide.clean(x, t).float()
                rgb = (z_main - z_weak)[:, :3].mean(1, keepdim=True)  # the grey part of the RGB difference
                z_weak = torch.cat([z_main[:, :3] - rgb, z_weak[:, 3:]], 1)  # z_main's chroma, guide's grey and alpha
        return (z_weak + w * (z_main - z_weak)).clamp(-1, 1)

    return clean


def velocity_of(clean, sched):
    """The velocity field u = a z_hat + b x of a clean-sprite guess (section 3)."""
    return lambda x, t: velocity_from_data(clean(x, t), x, t, sched)


@torch.no_grad()
def generate(model, n, steps=20, sampler="heun", seed=0, device="cpu", labels=None, guidance=1.0, guide=None,
             grid=1, bf16=False, batch_size=64, sigma=1.0, frames=None, grid_shift=1.0, noise=None):
    """n sprites as uint8 (n, 128, 128, 4), snapped to a k = grid pixel grid. Noise
    comes from a CPU generator seeded with `seed` (or is given as `noise`), so the
    same seed gives the same sprites on any device."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn(b, 4, 128, 128, generator=gen) if noise is None else noise[start:start + b]  # (b, 4, 128, 128), t=0
        x = x.to(device)
        c = None if labels is None else labels[start:start + b].to(device)
        velocity = velocity_of(guided_clean(model, c, guidance, guide, bf16=bf16), model.schedule)
        keep = frames if start == 0 else None  # frames[i]: the first batch after i steps
        if keep is not None:
            keep.append(x)
        if sampler == "sde":
            noise_gen = torch.Generator(device).manual_seed(seed + 1 + start)
            x = sample_sde(velocity, x, steps, model.schedule, sigma, generator=noise_gen, frames=keep, shift=grid_shift)
        else:
            x = {"euler": sample_euler, "heun": sample_heun}[sampler](velocity, x, steps, keep, grid_shift)
        out.append(to_uint8(snap_to_grid(x, grid)))
    return torch.cat(out)


def class_plan(n, classes, counts, wanted=None):
    """Labels (n,) for n samples, sorted by class: spread over `wanted` class names
    evenly, or over all classes in proportion to their training counts."""
    if wanted:
        unknown = [w for w in wanted if w not in classes]
        if unknown:
            raise UserError(f"unknown class '{unknown[0]}'; this checkpoint knows {', '.join(classes)}")
        counts = [1 if c in wanted else 0 for c in classes]
    share = [n * k / sum(counts) for k in counts]
    alloc = [int(s) for s in share]
    for i in sorted(range(len(share)), key=lambda i: alloc[i] - share[i])[: n - sum(alloc)]:
        alloc[i] += 1  # largest remainders first
    return torch.tensor([i for i, k in enumerate(alloc) for _ in range(k)], dtype=torch.long)


# -----------------------------------------------------------------------------
# 6. Training helpers: EMA, learning-rate schedule
#
# EMA. Sampling uses an average of the weights over the late part of training,
# which cancels much of SGD's step-to-step noise. A classic EMA with a fixed
# decay d = 0.999 averages over the last ~1/(1-d) = 1,000 steps whatever the
# run's length: in a 2,000-step run that is half the run, young weights
# included; in a 100,000-step run it is a sliver. The power-function EMA of
# EDM2 (Karras et al. 2024) averages with weights proportional to tau^gamma
# over every step tau so far, which it does with the per-step decay
#
#     theta_ema <- beta_t theta_ema + (1 - beta_t) theta,   beta_t = (1 - 1/t)^(gamma + 1)
#
# so its length is always the same share of the run. That share is sigma_rel,
# the relative standard deviation of the weights tau^gamma on [0, t]:
#
#     sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))
#
# sigma_rel = 0.10 gives gamma = 6.94. We keep a few lengths in the checkpoint
# (--ema-lengths) and `sample --ema` picks one; the first is the default.
#
# LR. A linear warm-up (Adam's moment estimates are poor at first), then a
# cosine from the peak down to 10% of it as the run's progress p goes 0 -> 1.
# p is the larger of step / max_steps and minutes / max_minutes, so a run given
# a time budget anneals exactly when its time runs out, on any machine. The
# training time so far is saved in the checkpoint, so a resumed run continues
# the schedule where it left off.
#
# Why anneal at all: at a constant LR, Adam keeps the weights jittering about a
# minimum at a scale set by the LR; lowering it at the end lets them settle.
# The EMA averages that jitter away too, which is why both are sized by the
# run's progress p, not by a fixed number of steps.
# -----------------------------------------------------------------------------


def ema_gamma(sigma_rel):
    """The exponent gamma whose power-function EMA has relative length sigma_rel:
    the real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = sigma_rel^-2."""
    s = sigma_rel ** -2
    return float(max(np.roots([1, 7, 16 - s, 12 - s]).real))


@torch.no_grad()
def ema_update(ema_models, model, step, gammas):
    """One power-function EMA step for each (average, gamma); `step` counts from 1."""
    params = [p.detach() for p in model.parameters()]
    for ema, gamma in zip(ema_models, gammas):
        torch._foreach_lerp_(list(ema.parameters()), params, 1 - (1 - 1 / step) ** (gamma + 1))


def lr_at(step, progress, base_lr, warmup, floor=0.1):
    """Warm-up over `warmup` steps times a cosine from 1 to `floor` as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup)
    return base_lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_progress(step, seconds, cfg):
    """How much of its budget (steps, minutes or both) the run has used: 0 -> 1."""
    by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
    by_time = seconds / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
    return min(1.0, max(by_steps, by_time))


# -----------------------------------------------------------------------------
# 7. Trainer
#
# One training step, for a batch of sprites z with classes c:
#     t   ~ uniform, then shift_time (section 3)
#     eps ~ N(0, I)
#     c   -> "no class" with probability label_dropout (so guidance has u(x, t, -))
#     x_t = alpha_t z + beta_t eps
#     L   = || u_theta(x_t, t, c) - u_t(x_t | z) ||^2
#
# With x-prediction the velocity loss is an x-loss in disguise:
#     || u(z_hat) - u(z) ||^2 = w(t) || z_hat - z ||^2,  w(t) = a(t)^2  (= 1/(1-t)^2, linear path)
# w is 1 at t=0 and 400 at the BETA_MIN clamp: the nearly trivial end of the
# path would dominate the gradient. Training caps w at weight_cap, so the
# middle of the path, where colours are decided, learns much faster.
#
# Validation: the uncapped loss of the default EMA on held-out sprites at fixed
# seeds for t and eps, so it changes only when the weights do; it picks best.pt.
#
# Autoguidance's guide (section 5) is a frozen copy of the default EMA taken when
# guide_fraction of the budget is spent: the same network, trained 8x less.
#
# bf16 halves the memory traffic of convolutions. On a GPU it is always on.
# CPUs with bf16 dot-product instructions (avx512_bf16, amx_bf16, ARM bf16) can
# be faster in bf16 than in fp32; CPUs without them emulate it, ~50x slower.
# We read the flags, then time a small training step each way: the flags say
# whether bf16 can be fast, the probe whether it is on this machine and build
# of PyTorch. bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss
# scaling; autocast keeps the weights, the optimizer and the loss in fp32.
#
# Nothing is lost, nothing is silent:
# * Why skip, then stop: one non-finite step is often a fluke (one extreme
#   batch at a high LR); skipping it costs one step. Several in a row mean
#   the weights themselves have gone bad, and more steps will not mend them.
# * A step whose gradient is not finite is skipped (weights and EMA stay as
#   they were) and counted; MAX_BAD_STEPS in a row, or a non-finite validation
#   loss, means the run diverged: it stops without saving, so the last good
#   checkpoint survives. (This reads the gradient norm on the host each step.)
# * Ctrl-C, SIGTERM and SIGHUP (schedulers, `timeout`, shutdowns) ask the loop
#   to stop; it saves last.pt and exits cleanly. A second Ctrl-C stops at once.
# * A lock file (flock, which the OS releases when a process dies, so a killed
#   run leaves no stale lock) lets one process at a time write a run folder.
# * Checkpoints go to a temporary file that is renamed over the old one, and
#   hold only tensors, numbers and strings (torch.load(weights_only=True)).
# * A checkpoint remembers its data folder and a fingerprint of its file list;
#   --resume refuses other data unless --allow-new-data says it is meant.
# -----------------------------------------------------------------------------

DEFAULT_MINUTES, MAX_BAD_STEPS, T_BUCKETS = 30.0, 5, 5
DEVICES = ("auto", "cpu", "cuda", "mps")


def option(default, help, choices=None):
    """A config field that also carries its --help text (and allowed values) for argparse."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    # Where and how long.
    data: str = option("", "folder of sprites, searched recursively; subfolders are classes (default: data/images, or the resumed run's folder)")
    run_dir: str = option("", "output folder (default: a new folder under runs/)")
    resume: bool = option(False, "continue the run in --run-dir from its last.pt")
    allow_new_data: bool = option(False, "let --resume go on with a different data folder or file set")
    max_minutes: float = option(0.0, f"time budget in minutes, counted across resumes; the LR anneals to it (with neither budget: {DEFAULT_MINUTES:g})")
    max_steps: int = option(0, "budget in optimizer steps; 0 = none")
    # The optimisation recipe.
    batch_size: int = option(32, "sprites per step (per process under torchrun)")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup: int = option(200, "linear LR warm-up steps")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    ema_lengths: str = option("0.1,0.05,0.2", "power-EMA lengths sigma_rel kept in the checkpoint; the first is sampled by default")
    # The flow and the network.
    schedule: str = option("linear", "noise schedule (alpha_t, beta_t)", SCHEDULES)
    target: str = option("data", "what the network predicts: the clean sprite or the velocity", TARGETS)
    t_dist: str = option("uniform", "training time distribution", ("uniform", "logit-normal"))
    t_mean: float = option(0.0, "logit-normal location m in t = sigmoid(m + s n)")
    t_std: float = option(1.0, "logit-normal scale s")
    t_shift: float = option(4.0, "time shift s of the training t: t -> t / (t + s (1 - t)); above 1 favours noisier t")
    weight_cap: float = option(3.0, "cap on the x-prediction loss weight w(t) = 1/(1-t)^2; 0 = no cap")
    channels: str = option("32,64,128", "U-Net widths per level, comma-separated")
    blocks: int = option(2, "residual blocks per level")
    norm_groups: int = option(8, "GroupNorm groups per normalisation layer (fewer if the width is not divisible)")
    unshuffle: int = option(0, "pixel-unshuffle factor; 0 = 4 on CPU, 2 on GPU", (0, 1, 2, 4))
    flip: bool = option(True, "random horizontal flips")
    labels: bool = option(True, "classes from subfolders; --no-labels trains one unconditional model")
    label_dropout: float = option(0.1, "share of steps trained without the class, for classifier-free guidance")
    guide: str = option("auto", "keep an early EMA snapshot for autoguidance (auto: when there are no classes)", ("auto", "on", "off"))
    guide_fraction: float = option(0.125, "share of the budget after which the guide snapshot is taken")
    grid: str = option("auto", "pixel-art block size of the data that samples snap to", ("auto", "1", "2", "4", "8"))
    # Bookkeeping.
    val_fraction: float = option(0.05, "share of sprites held out for validation")
    log_every: int = option(25, "steps between CSV rows")
    val_every: int = option(250, "steps between validation + checkpoint")
    sample_every: int = option(500, "steps between sample grids")
    sample_steps: int = option(20, "Heun steps for the sample grids")
    seed: int = option(0, "random seed (runs are reproducible)")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", DEVICES)
    bf16: bool = option(None, "bf16 autocast (default: on for CUDA, and on a CPU where a probe finds it faster)")
    compile: bool = option(False, "torch.compile the model")


POSITIVE = {"batch_size", "lr", "grad_clip", "t_std", "t_shift", "blocks", "norm_groups", "log_every", "val_every",
            "sample_every", "sample_steps", "warmup", "guide_fraction"}


def check_config(cfg):
    """Reject bad values with one sentence each, before any work starts."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
        if f.type in (int, float) and (not math.isfinite(value) or (value < 0 and f.name != "t_mean") or (value == 0 and f.name in POSITIVE)):
            raise UserError(f"{flag} must be a {'positive' if f.name in POSITIVE else 'non-negative'} finite number, got {value}")
    if max(cfg.val_fraction, cfg.label_dropout) >= 1 or cfg.guide_fraction > 1:
        raise UserError("--val-fraction and --label-dropout must be below 1, --guide-fraction at most 1")
    if cfg.resume and not cfg.run_dir:
        raise UserError("--resume needs --run-dir to say which run to continue")
    try:
        widths, lengths = numbers(cfg.channels, int), numbers(cfg.ema_lengths)
    except ValueError:
        raise UserError(f"--channels and --ema-lengths must be comma-separated numbers, got {cfg.channels!r}, {cfg.ema_lengths!r}")
    if any(c <= 0 or c % 8 for c in widths) or len(widths) > 4 or not all(0 < s <= 0.28 for s in lengths):
        raise UserError("--channels needs at most 4 widths, each a positive multiple of 8; --ema-lengths values lie in (0, 0.28]")


def numbers(text, kind=float):
    """'32,64,128' -> (32, 64, 128)."""
    return tuple(kind(c) for c in text.split(","))


def pick_device(name):
    """'auto' takes the fastest device present (cuda, then mps, then cpu); an explicit name must exist."""
    mps = getattr(torch.backends, "mps", None)
    present = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in present.items() if ok))
    if not present[name]:
        raise UserError(f"--device {name} was asked for but no {name.upper()} device is available")
    return torch.device(name)


def build_model(cfg, device, n_classes=0):
    """The U-Net a config describes. On a GPU the default working resolution is 64x64:
    there is compute to spare for finer positions."""
    unshuffle = cfg.unshuffle or (4 if device.type == "cpu" else 2)
    return UNet(numbers(cfg.channels, int), cfg.blocks, unshuffle, cfg.target, cfg.schedule, cfg.norm_groups, n_classes)


def sample_t(n, cfg, generator, device):
    """Training times: uniform, or logit-normal t = sigmoid(m + s n) (peaked near sigmoid(m)), then shifted."""
    if cfg.t_dist == "uniform":
        return shift_time(torch.rand(n, generator=generator, device=device), cfg.t_shift)
    return shift_time(torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator, device=device)), cfg.t_shift)


def drop_labels(c, p, n_classes, generator):
    """Each label (B,) becomes n_classes, "no class", with probability p."""
    return torch.where(torch.rand(c.shape, generator=generator, device=c.device) < p, n_classes, c)


def flow_matching_loss(model, z, t, eps, c, target, sched, weight_cap=None):
    """Per-sample loss (B,): || u_theta(x_t, t, c) - u_t(x_t | z) ||^2, averaged over pixels.
    For x-prediction this is w(t) || z_hat - z ||^2, w capped at `weight_cap` when given
    (training; validation leaves it uncapped). `model` may be a DDP wrapper, so it is called."""
    x_t = sample_path(z, t, eps, sched)
    out = model(x_t, t, c).float()
    if target == "velocity":
        return (out - conditional_vector_field(z, t, eps, sched)).pow(2).flatten(1).mean(1)
    w = data_coefficients(t, sched, t)[0] ** 2  # (B,): u(z_hat) - u(z) = a (z_hat - z)
    return (w.clamp(max=weight_cap) if weight_cap else w) * (out - z).pow(2).flatten(1).mean(1)


@torch.no_grad()
def validation_loss(model, val_x, val_y, cfg, device, bf16, batch_size=64):
    """Mean flow-matching loss on held-out sprites at fixed seeds (see above)."""
    model.eval()
    gen, total = torch.Generator().manual_seed(1234), 0.0
    for i in range(0, len(val_x), batch_size):
        z = to_float(val_x[i:i + batch_size]).to(device)
        t, eps = torch.rand(len(z), generator=gen).to(device), torch.randn(z.shape, generator=gen).to(device)
        with autocast(device, bf16):
            total += flow_matching_loss(model, z, t, eps, None if val_y is None else val_y[i:i + batch_size].to(device),
                                        cfg.target, cfg.schedule).sum().item()
    return total / len(val_x)


BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 and AMX, ARM


def cpu_has_bf16():
    """Does /proc/cpuinfo list bf16 dot-product instructions? (False where there is none.)"""
    try:
        return bool(set(Path("/proc/cpuinfo").read_text().split()) & BF16_FLAGS)
    except OSError:
        return False


def probe_step_ms(model, device, bf16, batch=8):
    """Milliseconds of one forward and backward pass on a small batch (best of two, after one)."""
    x, t, times = torch.randn(batch, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to(device), torch.full((batch,), 0.5, device=device), []
    for _ in range(3):
        start = time.perf_counter()
        with autocast(device, bf16):
            model(x, t).float().square().mean().backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return 1000 * min(times[1:])


def decide_bf16(asked, device, model):
    """(use bf16?, why): --bf16/--no-bf16 if given; on CUDA yes; on a CPU by its flags and a probe."""
    if asked is not None:
        return asked, "as asked"
    if device.type != "cpu" or not cpu_has_bf16():
        return device.type == "cuda", device.type if device.type != "cpu" else "this CPU lists no bf16 instructions"
    fp32, bf16 = probe_step_ms(model, device, False), probe_step_ms(model, device, True)
    return bf16 < 0.9 * fp32, f"a probe step took {bf16:.0f} ms in bf16, {fp32:.0f} ms in fp32"


def assert_finite(path, *state_dicts):
    """Refuse weights that are not finite: a diverged run must not be saved or sampled."""
    if not all(torch.isfinite(v).all() for sd in state_dicts for v in sd.values() if v.is_floating_point()):
        raise UserError(f"'{path}' would hold non-finite weights (the run diverged); use an earlier checkpoint or a lower --lr")


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: the old file survives any crash."""
    assert_finite(path, state["model"], *state["ema"].values())
    try:
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        raise UserError(f"cannot write checkpoint '{path}': {e.strerror or e}")


def read_checkpoint(path):
    """Load and check a checkpoint; any failure becomes one sentence. Older checkpoints
    load too: 32 norm groups, one classic EMA "0.999", no classes, grid 1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' is a folder; give a file such as '{path / 'last.pt'}'" if path.is_dir() else f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        ckpt["config"] = {"norm_groups": 32, **{k: v for k, v in ckpt["config"].items() if k in known}}
        if all(torch.is_tensor(v) for v in ckpt["ema"].values()):
            ckpt["ema"] = {"0.999": ckpt["ema"]}  # a classic EMA, from before power EMAs
        TrainConfig(**ckpt["config"]), ckpt["model"], ckpt["step"], ckpt["unshuffle"]
    except Exception:
        raise UserError(f"checkpoint '{path}' is corrupt or not a SpriteFlow checkpoint")
    return {"classes": [], "class_counts": [], "grid": 1, "seconds": 0.0, "skipped": 0, **ckpt}


def load_models(path, device="cpu", ema=None):
    """(model, guide or None, checkpoint) ready to sample: the EMA of length `ema`
    (default: the first kept) and the autoguidance guide if the run trained one."""
    ckpt = read_checkpoint(path)
    cfg = dataclasses.replace(TrainConfig(**ckpt["config"]), unshuffle=ckpt["unshuffle"])
    key = ema or next(iter(ckpt["ema"]))
    if key not in ckpt["ema"]:
        raise UserError(f"checkpoint '{path}' keeps no EMA of length {key}; it has {', '.join(ckpt['ema'])}")
    nets = [(build_model(cfg, device, len(ckpt["classes"])), ckpt["ema"][key])]
    nets += [(build_model(cfg, device, len(ckpt["classes"])), ckpt["guide"])] if "guide" in ckpt else []
    for net, weights in nets:
        assert_finite(path, weights)
        try:
            net.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f"checkpoint '{path}' does not match the model its config describes")
        net.to(device).eval()
    return nets[0][0], nets[1][0] if len(nets) > 1 else None, ckpt


def claim_run_dir(cfg):
    """The run folder (a new dated one by default) and its lock: run_dir/lock holds the
    PID of the one process allowed to write there. Returns (folder, lock fd, created)."""
    base = Path(cfg.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = base if cfg.run_dir else next(p for p in [base] + [Path(f"{base}-{k}") for k in range(1, 1000)] if not p.exists())
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.run_dir))  # without exist_ok, mkdir claims atomically
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create or write the run folder '{run_dir}': {e.strerror or e}")
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"'{run_dir}' is being written by another training process (pid {pid}); wait for it or pick another --run-dir")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    for stale in run_dir.glob("*.tmp"):  # left by a process killed mid-save
        stale.unlink()
    return run_dir, fd, created


def start_run(cfg, rank, world, device):
    """Everything the loop needs, as one namespace `s`: folder and lock, config (the
    checkpoint's on --resume), data on the device, networks and optimizer state."""
    s = argparse.Namespace(rank=rank, is_main=rank == 0, world=world, device=device, lock=None, log_file=None, ckpt=None)
    s.run_dir, s.lock, created = claim_run_dir(cfg) if s.is_main else (Path(cfg.run_dir), None, False)
    try:
        if cfg.resume:
            s.ckpt = read_checkpoint(s.run_dir / "last.pt")
            cfg = resumed_config(cfg, s.ckpt)
        elif (s.run_dir / "last.pt").exists():
            raise UserError(f"'{s.run_dir}' already holds a checkpoint; add --resume to continue it or pick another --run-dir")
        s.default_budget = not (cfg.max_steps or cfg.max_minutes)
        s.cfg = dataclasses.replace(cfg, max_minutes=DEFAULT_MINUTES) if s.default_budget else cfg
        load_data(s)
        build_networks(s)
        if s.is_main:
            open_log(s)
    except BaseException:
        if s.lock is not None:
            os.close(s.lock)  # releases the flock
            if created and [p.name for p in s.run_dir.iterdir()] == ["lock"]:  # leave no empty run behind
                (s.run_dir / "lock").unlink()
                s.run_dir.rmdir()
        raise
    return s


def resumed_config(cfg, ckpt):
    """The recipe comes from the checkpoint; the budget, and other data when
    --allow-new-data says so, from this command line."""
    old, data = TrainConfig(**ckpt["config"]), cfg.data or ckpt.get("data", "")
    if cfg.data and "data" in ckpt and Path(cfg.data).resolve() != Path(ckpt["data"]) and not cfg.allow_new_data:
        raise UserError(f"this run trained on '{ckpt['data']}', not '{cfg.data}'; leave out --data, or add --allow-new-data")
    budget = {"max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes} if cfg.max_steps or cfg.max_minutes else {}
    return dataclasses.replace(old, resume=True, run_dir=cfg.run_dir, data=data, allow_new_data=cfg.allow_new_data, bf16=cfg.bf16, **budget)


def load_data(s):
    """Sprites and labels onto the device; under torchrun each rank keeps every world-th training sprite."""
    cfg, ckpt = s.cfg, s.ckpt
    s.data_path = str(Path(cfg.data or "data/images").resolve())
    data, s.names, s.classes, y = load_folder(s.data_path, labels=cfg.labels)
    s.fingerprint = hashlib.sha256("\n".join(s.names).encode()).hexdigest()[:16]
    if ckpt and ckpt.get("fingerprint", s.fingerprint) != s.fingerprint and not cfg.allow_new_data:
        raise UserError(f"the files in '{s.data_path}' changed since this run started; add --allow-new-data to go on with them")
    if ckpt and s.classes != ckpt["classes"]:
        raise UserError(f"this run has the classes [{', '.join(ckpt['classes'])}] but the data has [{', '.join(s.classes)}]")
    s.class_counts = [int((y == k).sum()) for k in range(len(s.classes))]
    s.grid = ckpt["grid"] if ckpt else (detect_grid(data) if cfg.grid == "auto" else int(cfg.grid))
    s.train_idx, val_idx = split_train_val(s.names, cfg.val_fraction)
    shard = s.train_idx[s.rank::s.world]
    s.train_x = data[shard].to(s.device)  # (N_train / world, 4, 128, 128) uint8
    s.train_y = None if y is None else y[shard].to(s.device)  # (N_train / world,)
    s.val_x, s.val_y = data[val_idx][:512], None if y is None else y[val_idx][:512]  # enough for a stable number


def build_networks(s):
    """Model, EMAs, AdamW, the training RNG and, for autoguidance, the guide; a checkpoint's
    state on --resume, so that the run continues exactly."""
    cfg, device, ckpt = s.cfg, s.device, s.ckpt
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    s.model = build_model(cfg, device, len(s.classes)).to(device)
    if device.type == "cuda":  # tensor cores prefer NHWC convolutions
        s.model = s.model.to(memory_format=torch.channels_last)
    s.lengths = numbers(cfg.ema_lengths)
    s.gammas, s.emas = [ema_gamma(k) for k in s.lengths], [copy.deepcopy(s.model).requires_grad_(False) for _ in s.lengths]
    # AdamW: per-parameter step sizes, weight decay applied to the weights directly.
    # beta2 = 0.99 lets the second moment follow the loss scale, which shifts a lot.
    s.opt = torch.optim.AdamW(s.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    # Every random draw of training comes from this one generator, so saving its
    # state makes a resumed run draw exactly what the uninterrupted run would have.
    s.gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + s.rank)
    s.step, s.seconds, s.best_val, s.skipped, s.bad_in_row, s.guide = 0, 0.0, float("inf"), 0, 0, None
    s.wants_guide = cfg.guide == "on" or (cfg.guide == "auto" and not s.classes)
    if ckpt:
        s.model.load_state_dict(ckpt["model"])
        for length, ema in zip(s.lengths, s.emas):
            ema.load_state_dict(ckpt["ema"][str(length)])
        s.opt.load_state_dict(ckpt["optimizer"])
        s.step, s.seconds, s.best_val, s.skipped = ckpt["step"], ckpt["seconds"], ckpt["best_val"], ckpt["skipped"]
        # Only rank 0's stream is saved; other ranks restart theirs from a seed that depends on the step.
        s.gen.set_state(ckpt["rng"]) if s.rank == 0 else s.gen.manual_seed(cfg.seed * 1000 + s.rank + 7919 * s.step)
        if "guide" in ckpt:
            s.guide = copy.deepcopy(s.emas[0])
            s.guide.load_state_dict(ckpt["guide"])
    s.bf16, s.bf16_why = (ckpt["bf16"], "as when the run began") if ckpt and cfg.bf16 is None else decide_bf16(cfg.bf16, device, s.model)
    s.amp = autocast(device, s.bf16)
    # `net` is what the step calls: maybe wrapped by DDP (which all-reduces gradients
    # in backward) and/or torch.compile; `model` is the plain module we average and save.
    s.net = nn.parallel.DistributedDataParallel(s.model, device_ids=[device.index] if device.type == "cuda" else None) if s.world > 1 else s.model
    s.net = torch.compile(s.net) if cfg.compile else s.net


LOG_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "val_loss"] + [f"loss_t{k}" for k in range(T_BUCKETS)] + ["minutes", "skipped"]


def open_log(s):
    """training_log.csv (kept on resume, minus rows past the checkpoint) and the first words."""
    path, rows = s.run_dir / "training_log.csv", []
    if s.ckpt and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= s.step]
    try:
        (s.run_dir / "samples").mkdir(exist_ok=True)
        s.log_file = open(path, "w", newline="")
    except OSError as e:
        raise UserError(f"cannot write to the run folder '{s.run_dir}': {e.strerror or e}")
    s.log = csv.writer(s.log_file)
    s.log.writerows([LOG_COLUMNS] + rows)
    s.stats = torch.zeros(2 * T_BUCKETS + 2, device=s.device)  # per-bucket loss sums and counts, loss, grad norm
    s.window_steps, s.window_start, s.saved_step = 0, time.time(), s.step
    if s.default_budget:
        print(f"training for {DEFAULT_MINUTES:g} minutes, the default budget (set --max-minutes or --max-steps)", file=sys.stderr)
    classes = "; classes " + ", ".join(f"{c} {n}" for c, n in zip(s.classes, s.class_counts)) if s.classes else ", no classes"
    params = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
    print(f"{len(s.names)} sprites ({len(s.train_idx)} train, {len(s.val_x)} val) from {s.data_path}{classes}; pixel grid {s.grid}; "
          f"{params(s.model)} parameters; device {s.device}"
          f"{' x' + str(s.world) if s.world > 1 else ''}; bf16 {'on' if s.bf16 else 'off'} ({s.bf16_why}); run folder {s.run_dir}", file=sys.stderr)


def train(cfg, stop_after=None):
    """Train per `cfg` and return the run folder: set up, step until the budget is spent
    or a stop is asked for, save. `stop_after` stops at that step (tests of resuming)."""
    check_config(cfg)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    s, handlers, stop = None, {}, []

    def ask_to_stop(signum, frame):
        if stop and signum == signal.SIGINT == stop[0]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        stop.append(signum)

    try:
        s = start_run(cfg, rank, world, device)
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                handlers[name] = signal.signal(getattr(signal, name), ask_to_stop)
        s.started, s.start_step = time.time(), s.step
        while True:
            progress = run_progress(s.step, s.seconds + time.time() - s.started, s.cfg)
            if any_rank(progress >= 1 or bool(stop) or s.step == stop_after, world, device):
                break
            one_step(s, progress)
        finish(s, "done" if progress >= 1 else "interrupted")
        return s.run_dir
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
        if s and s.log_file:
            s.log_file.close()
        if s and s.lock is not None:
            os.close(s.lock)  # releases the flock
        if world > 1:
            dist.destroy_process_group()


def train_step(net, model, opt, z, t, eps, c, cfg, amp, lr):
    """One optimisation step; returns per-sample losses (B,), the gradient norm, and
    whether the step was taken (not when the gradient is not finite)."""
    for group in opt.param_groups:
        group["lr"] = lr
    with amp:
        per_sample = flow_matching_loss(net, z, t, eps, c, cfg.target, cfg.schedule, cfg.weight_cap)
    opt.zero_grad(set_to_none=True)
    per_sample.mean().backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # spikes are scaled down, not followed
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    return per_sample.detach(), grad_norm, finite


def one_step(s, progress):
    """Draw a batch, take the step, update the EMAs (and take the guide), keep the books."""
    cfg, gen, device, B = s.cfg, s.gen, s.device, s.cfg.batch_size
    s.model.train()
    s.lr = lr_at(s.step, progress, cfg.lr, cfg.warmup)
    idx = torch.randint(len(s.train_x), (B,), generator=gen, device=device)  # with replacement: steps, not epochs
    z = to_float(s.train_x[idx])  # (B, 4, 128, 128) in [-1, 1]
    if cfg.flip:
        z = torch.where(expand(torch.rand(B, generator=gen, device=device) < 0.5, z), z.flip(-1), z)
    t = sample_t(B, cfg, gen, device)  # (B,)
    eps = torch.randn(z.shape, generator=gen, device=device)  # (B, 4, 128, 128)
    c = None if s.train_y is None else drop_labels(s.train_y[idx], cfg.label_dropout, len(s.classes), gen)  # (B,)
    per_sample, grad_norm, finite = train_step(s.net, s.model, s.opt, z, t, eps, c, cfg, s.amp, s.lr)
    s.step += 1
    s.bad_in_row, s.skipped = (0, s.skipped) if finite else (s.bad_in_row + 1, s.skipped + 1)
    if finite:
        ema_update(s.emas, s.model, s.step, s.gammas)
    elif s.bad_in_row >= MAX_BAD_STEPS:
        raise UserError(diverged(s, f"the loss was not finite for {MAX_BAD_STEPS} steps in a row"))
    if s.wants_guide and s.guide is None and progress >= cfg.guide_fraction:
        s.guide = copy.deepcopy(s.emas[0])  # autoguidance's guide: the model as it was at this point
    if s.is_main:
        bucket = (t * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)  # per-t losses: where is the flow hard?
        s.stats[:T_BUCKETS].index_add_(0, bucket, per_sample.float())
        s.stats[T_BUCKETS:2 * T_BUCKETS].index_add_(0, bucket, torch.ones_like(t))
        s.stats[-2:] += torch.stack([per_sample.float().mean(), grad_norm.float()])  # stays on the device until a row
        s.window_steps += 1
        if s.step % cfg.val_every == 0 or s.step % cfg.log_every == 0:
            write_row(s, validate=s.step % cfg.val_every == 0)
        if s.step % cfg.sample_every == 0:
            labels = class_plan(16, s.classes, s.class_counts) if s.classes else None
            sprites = generate(s.emas[0], 16, cfg.sample_steps, seed=cfg.seed + 12345, device=device, labels=labels, grid=s.grid)
            sprite_sheet(sprites, cols=4).save(s.run_dir / "samples" / f"step_{s.step:07d}.png")


def diverged(s, what):
    """The sentence a diverged run ends with."""
    last = s.run_dir / "last.pt"
    kept = f"the last good checkpoint is {last} (step {read_checkpoint(last)['step']})" if last.exists() else "no checkpoint was written"
    return f"training diverged at step {s.step}: {what} at lr {s.lr:.2g}; {kept}; try a lower --lr than {s.cfg.lr:g}"


def write_row(s, validate):
    """A CSV row and progress line for the steps since the last row; with `validate`,
    the validation loss, best.pt when it improved, and last.pt."""
    cfg, now = s.cfg, time.time()
    minutes, img_s = (s.seconds + now - s.started) / 60, s.window_steps * cfg.batch_size * s.world / max(now - s.window_start, 1e-9)
    val = validation_loss(s.emas[0], s.val_x, s.val_y, cfg, s.device, s.bf16) if validate else None
    stats = s.stats.tolist()
    loss = stats[-2] / s.window_steps
    s.log.writerow([s.step, f"{s.step * cfg.batch_size * s.world / len(s.train_idx):.3f}", f"{loss:.5f}", f"{s.lr:.3e}",
                    f"{stats[-1] / s.window_steps:.4f}", f"{img_s:.2f}", "" if val is None else f"{val:.5f}"]
                   + [f"{a / n:.5f}" if n else "" for a, n in zip(stats[:T_BUCKETS], stats[T_BUCKETS:2 * T_BUCKETS])] + [f"{minutes:.2f}", s.skipped])
    s.log_file.flush()
    pace = (now - s.started) / 60 / max(s.step - s.start_step, 1)  # this session's minutes per step
    print(f"{progress_text(s.step, minutes, pace, cfg)} loss {loss:.4f} lr {s.lr:.1e} {img_s:.1f} img/s",
          end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)
    if val is not None:
        if not math.isfinite(val):
            raise UserError(diverged(s, "the validation loss was not finite"))
        if val < s.best_val:
            s.best_val = val
            save_checkpoint(s.run_dir / "best.pt", checkpoint_state(s))
        save_checkpoint(s.run_dir / "last.pt", checkpoint_state(s))
        s.saved_step = s.step
    s.stats.zero_()
    s.window_steps, s.window_start = 0, time.time()


def progress_text(step, minutes, pace, cfg):
    """'step S (M min; budget B, eta E min)': the ETA uses this session's pace (minutes
    per step) for a step budget, and never runs past the time budget."""
    etas = [(cfg.max_steps - step) * pace] * bool(cfg.max_steps) + [cfg.max_minutes - minutes] * bool(cfg.max_minutes)
    budget = " and ".join([f"{cfg.max_steps} steps"] * bool(cfg.max_steps) + [f"{cfg.max_minutes:g} min"] * bool(cfg.max_minutes))
    return f"step {step} ({minutes:.1f} min; budget {budget}, eta {max(min(etas), 0):.0f} min)"


def checkpoint_state(s):
    """Everything needed to continue exactly, and to sample: weights, EMAs, optimizer
    moments, step, training time, RNG, config, classes, pixel grid, data identity."""
    state = {"model": s.model.state_dict(), "ema": {str(k): e.state_dict() for k, e in zip(s.lengths, s.emas)},
             "optimizer": s.opt.state_dict(), "step": s.step, "seconds": s.seconds + time.time() - s.started,
             "best_val": s.best_val, "rng": s.gen.get_state().cpu(), "config": dataclasses.asdict(s.cfg),
             "unshuffle": s.model.stem[0].downscale_factor, "classes": s.classes, "class_counts": s.class_counts,
             "grid": s.grid, "bf16": s.bf16, "data": s.data_path, "fingerprint": s.fingerprint, "skipped": s.skipped}
    if s.guide:
        state["guide"] = s.guide.state_dict()
    return state


def finish(s, why):
    """The last row with validation, and the last save (rank 0); the DDP consistency check."""
    if s.world > 1:
        check_ranks_in_sync(s.model, s.rank, s.world)
    if not s.is_main:
        return
    if s.window_steps:
        write_row(s, validate=True)
    elif s.step > s.saved_step or not (s.run_dir / "last.pt").exists():
        save_checkpoint(s.run_dir / "last.pt", checkpoint_state(s))
    if not (s.run_dir / "best.pt").exists():
        save_checkpoint(s.run_dir / "best.pt", checkpoint_state(s))
    print(f"\n{why} at step {s.step} after {(s.seconds + time.time() - s.started) / 60:.1f} min; checkpoints in {s.run_dir} "
          f"(best val loss {s.best_val:.5f}{f'; {s.skipped} steps skipped, loss not finite' if s.skipped else ''})", file=sys.stderr)


def setup_distributed(device):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; each
    process then trains on its own shard and DDP averages the gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def any_rank(flag, world, device):
    """True if `flag` holds on any rank: all ranks must leave the loop at the same step."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_ranks_in_sync(model, rank, world):
    """DDP keeps replicas identical by averaging gradients; verify it: the element-wise
    max and min of the weights over all ranks must coincide."""
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().float()
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"\nweights identical across {world} ranks: {torch.equal(hi, lo)}", file=sys.stderr)


# -----------------------------------------------------------------------------
# 8. What an invertible flow can do
#
# The ODE dX = u(X, t) dt is deterministic, so it can run backwards: integrate
# from a sprite at t=1 down to t=0 and you get the noise x_0 that the forward
# pass carries to that sprite (up to the solver's error). The SDE cannot be
# undone like this: each step adds fresh noise, information the end state no
# longer holds, so many noises lead to one sprite and none is "its" noise.
#
# Interpolation. Noise is N(0, I) in d = 65,536 dimensions, and the norm of
# such a vector concentrates tightly at sqrt(d) = 256. On the straight line
# between two independent noises, |(1-s) a + s b| ~ sqrt((1-s)^2 + s^2) sqrt(d):
# at s = 1/2 that is 0.71 sqrt(d), a point the flow never saw at t=0, and its
# sprites come out faded. Slerp walks the great circle between the directions
# and interpolates the norm linearly, so every point is a typical noise:
#     slerp(a, b, s) = [(1-s)|a| + s|b|] (sin((1-s) th) a^ + sin(s th) b^) / sin th
#
# Editing (inpainting). Given a sprite y and a mask m (1 = repaint), sample
# while holding the known pixels. With x-prediction the network's guess z_hat
# is a whole sprite at every t, so we overwrite its known part with y,
#     z_hat <- m z_hat + (1 - m) y,
# before forming the velocity: the unknown part is drawn towards a sprite that
# agrees with y, and the network solves the seam at every step. (Re-noising the
# known part of x_t along the path, the classic alternative, shows the network
# y only through the noise; lab record, "Editing".) Known pixels are then
# copied from y exactly.
#
# How exact is the round trip? Heun has a global error O(h^2) each way, so
# sprite -> noise -> sprite lands close but not on the sprite, and the error
# shrinks about 4x when --steps doubles. The network's own error does not
# matter here: backwards and forwards integrate the same learned field u, so
# the round trip tests the solver, not the model. Whether the noise is a
# *typical* noise (norm near 256) says how well the model knows the sprite.
# -----------------------------------------------------------------------------


@torch.no_grad()
def invert(velocity, z, steps):
    """x_0 from the sprite z (B, 4, 128, 128): Heun on the time grid run from t=1 to t=0."""
    return sample_heun(velocity, z, steps, ts=time_grid(steps)[::-1])


def slerp(a, b, s):
    """Spherical interpolation between noises a and b (B, ...) at s in [0, 1], norm linear in s."""
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)  # (B,)
    ua, ub = a / expand(na, a), b / expand(nb, b)
    theta = torch.arccos((ua * ub).flatten(1).sum(1).clamp(-1, 1))  # (B,)
    sin = torch.sin(theta).clamp(min=1e-8)
    direction = expand(torch.sin((1 - s) * theta) / sin, a) * ua + expand(torch.sin(s * theta) / sin, a) * ub
    return expand((1 - s) * na + s * nb, a) * direction


@torch.no_grad()
def inpaint(clean, sched, y, m, x, steps, method="z"):
    """Repaint where m = 1 (B, 1, H, W) in the sprite y, from noise x. method "z" overwrites
    the guess z_hat (above); "renoise" puts the known part of x_t back on the path
    alpha_t y + beta_t x_0; "both" does both."""
    ts, x0 = time_grid(steps), x
    held = (lambda x_, t_: m * clean(x_, t_) + (1 - m) * y) if method in ("z", "both") else clean
    for t, t_next in zip(ts[:-1], ts[1:]):
        if method in ("renoise", "both"):
            x = m * x + (1 - m) * sample_path(y, at(x, t), x0, sched)
        x = sample_heun(velocity_of(held, sched), x, 1, ts=[t, t_next])
    return x


def read_sprite(path, device):
    """A sprite file as float (1, 4, 128, 128) in [-1, 1], or one sentence."""
    try:
        return to_float(torch.from_numpy(load_rgba(path)).permute(2, 0, 1)[None]).to(device)
    except Exception as e:
        raise UserError(f"cannot read sprite '{path}': {e}")


def cmd_invert(args, model, ckpt, device, out):
    """invert SPRITE: sprite -> noise -> sprite, its RMS error, and a picture of the three."""
    z, velocity = read_sprite(args.sprite, device), velocity_of(guided_clean(model), model.schedule)
    x0 = invert(velocity, z, args.steps)
    back = sample_heun(velocity, x0, args.steps)
    sprite_sheet(torch.cat([to_uint8(z), to_uint8(x0 / 3, binary_alpha=False), to_uint8(snap_to_grid(back, ckpt["grid"]))]), 3).save(out / "roundtrip.png")
    torch.save(x0.cpu(), out / "noise.pt")
    return (f"round trip of {args.sprite} ({args.steps} Heun steps each way): RMS error {(back - z).pow(2).mean().sqrt().item():.4f} "
            f"in [-1, 1] units; noise norm {x0.norm().item():.0f} (a Gaussian's: {math.sqrt(x0.numel()):.0f}); "
            f"wrote roundtrip.png (sprite, noise, reconstruction) and noise.pt")


def cmd_interpolate(args, model, ckpt, device, out):
    """interpolate A B: sprites along the slerp between two noises (of seeds, or of sprites
    by inversion), as a strip and a GIF that goes there and back."""
    velocity = velocity_of(guided_clean(model), model.schedule)
    ends = [torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(int(p))).to(device) if p.lstrip("-").isdigit()
            else invert(velocity, read_sprite(p, device), args.steps) for p in (args.a, args.b)]
    noise = torch.cat([slerp(*ends, float(s)) for s in torch.linspace(0, 1, max(args.frames, 2))])  # (frames, 4, 128, 128)
    sprites = generate(model, len(noise), args.steps, device=device, grid=ckpt["grid"], noise=noise)
    sprite_sheet(sprites, len(sprites)).save(out / "strip.png")
    frames = [sprite_sheet(sp[None], 1, scale=2) for sp in sprites]
    frames[0].save(out / "morph.gif", save_all=True, append_images=frames[1:] + frames[::-1], duration=120, loop=0)
    return f"wrote strip.png and morph.gif ({len(sprites)} sprites from {args.a} to {args.b})"


def cmd_edit(args, model, guide, ckpt, labels, w, grid, device, out):
    """sample --edit SPRITE --mask MASK: --n variations, repainted under the mask only."""
    y, mask = read_sprite(args.edit, device).expand(args.n, -1, -1, -1), read_sprite(args.mask, device)
    m = ((mask[:, 3:] > 0) & (mask[:, :3].amax(1, keepdim=True) > -0.9)).float()  # (1, 1, 128, 128): opaque, not black
    if not m.any():
        raise UserError(f"mask '{args.mask}' marks no pixels; paint what to repaint in white (any opaque, non-black colour)")
    x = torch.randn(args.n, 4, 128, 128, generator=torch.Generator().manual_seed(args.seed)).to(device)
    z = inpaint(guided_clean(model, None if labels is None else labels.to(device), w, guide), model.schedule, y, m, x, args.steps)
    keep = (m[0, 0] == 0).cpu()[None, :, :, None]  # (1, 128, 128, 1)
    write_sprites(out, torch.cat([to_uint8(y[:1]), torch.where(keep, to_uint8(y), to_uint8(snap_to_grid(z, grid)))]))
    return f"wrote the sprite (sprite_000.png) and {args.n} variations repainted under {args.mask}"


# -----------------------------------------------------------------------------
# 9. Command line: train, sample, invert, interpolate
#
#   train        section 7, with every TrainConfig field as a --flag.
#   sample       integrates dX = u_w(X, t) dt (or the SDE) from X_0 ~ N(0, I) with
#                the EMA weights of a checkpoint (default: the newest .pt under
#                runs/), guided (section 5) and snapped to the data's pixel grid;
#                --edit/--mask repaints part of a sprite (section 8).
#   invert       sprite -> noise -> sprite, and how close the round trip lands.
#   interpolate  a morph between two sprites or seeds along a slerp of their noise.
# Plots of the training log, speed benchmarks and sample statistics live in the
# evaluation script, fid.py. Output folders are never overwritten: a folder that
# holds files gets a sibling OUT-2, OUT-3, ... Every user mistake raises
# UserError, which main() prints as one line ("error: ...") with exit status 2.
#
# Outputs, and why each: grid.png is for looking (a checkerboard shows what is
# transparent, one row per class); sheet.png and sheet.json are for using
# (transparent background, frame size and each frame's place, as game engines
# and sprite editors slice sheets); sprite_NNN.png are the sprites themselves.
#
# Precision: sample decides bf16 exactly as train does (section 7). Sampling
# only reads the network, and the sprites are snapped to 256 levels at the
# end, so bf16's 8-bit mantissa costs nothing measurable here (lab record);
# invert and interpolate stay in fp32, where the round trip's error is the
# point. An edit is steered by --class when given, else by no class at all:
# spreading an edit over every class would turn a knight's new hat orcish.
# -----------------------------------------------------------------------------

DEFAULT_SAMPLER, DEFAULT_STEPS = "heun", 20  # sample's defaults (fid.py samples checkpoints the same way)
CFG_GUIDANCE, AUTO_GUIDANCE = 2.0, 2.0  # default w: the largest that kept the distribution match (lab record)


def default_guidance(conditional, guide):
    """sample's default w: classifier-free with class labels, autoguidance with a guide, else none."""
    return CFG_GUIDANCE if conditional else AUTO_GUIDANCE if guide is not None else 1.0


def sprite_sheet(images, cols=None, scale=1, checker=8):
    """uint8 (N, H, W, 4) -> one RGB image on a grey checkerboard (shows transparency)."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    yy, xx = np.mgrid[: math.ceil(n / cols) * h, : cols * w]
    sheet = Image.fromarray(np.where(((yy // checker) + (xx // checker)) % 2 == 0, 208, 232).astype(np.uint8)).convert("RGB")
    for i, img in enumerate(images.numpy() if torch.is_tensor(images) else images):
        tile = Image.fromarray(img, "RGBA")
        sheet.paste(tile, ((i % cols) * w, (i // cols) * h), tile)
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale > 1 else sheet


def write_sprites(out, sprites, names=None, native=0):
    """sprite_NNN.png; grid.png (checkerboard) and sheet.png + sheet.json (transparent, for
    game engines) with one row per class; with native = k also the sprites at 1/k size."""
    rows = [[i for i, n in enumerate(names) if n == c] for c in dict.fromkeys(names)] if names else [list(range(len(sprites)))]
    cols = max(map(len, rows)) if names else math.ceil(math.sqrt(len(sprites)))
    order = [i for row in rows for j in range(0, len(row), cols) for i in (row[j:j + cols] + [None] * cols)[:cols]]
    tiles = torch.stack([sprites[i] if i is not None else torch.zeros_like(sprites[0]) for i in order])  # (rows * cols, H, W, 4)
    for i, sprite in enumerate(sprites):
        Image.fromarray(sprite.numpy(), "RGBA").save(out / f"sprite_{i:03d}.png")
        if native:
            (out / "native").mkdir(exist_ok=True)
            Image.fromarray(sprite[::native, ::native].numpy(), "RGBA").save(out / "native" / f"sprite_{i:03d}.png")
    sprite_sheet(tiles, cols).save(out / "grid.png")
    n_rows, h, w = len(order) // cols, *sprites.shape[1:3]
    Image.fromarray(tiles.reshape(n_rows, cols, h, w, 4).transpose(1, 2).reshape(n_rows * h, cols * w, 4).numpy(), "RGBA").save(out / "sheet.png")
    frames = [{"x": k % cols * w, "y": k // cols * h, "file": f"sprite_{i:03d}.png", **({"class": names[i]} if names else {})}
              for k, i in enumerate(order) if i is not None]
    (out / "sheet.json").write_text(json.dumps({"image": "sheet.png", "frame_width": w, "frame_height": h, "columns": cols,
                                                "rows": n_rows, "frames": frames}, indent=1))


@torch.no_grad()
def write_trajectory(model, frames, steps, out, count=4, n_frames=9):
    """A GIF and a PNG of the first sprites flowing from noise to data. Each row is one
    time t: on the left the state x_t, on the right the network's guess z_hat(x_t, t) of
    where it is heading, which shows when a sprite's layout and colours are decided."""
    ts, rows = time_grid(steps), []
    for i in sorted({round(k * steps / (n_frames - 1)) for k in range(n_frames)}):
        x = frames[i][:count]
        rows.append(torch.cat([to_uint8(x, binary_alpha=(i == steps)), to_uint8(model.clean(x, at(x, ts[i])).float(), binary_alpha=False)]))
    sheets = [sprite_sheet(row, 2 * count) for row in rows]
    sheets[0].save(out / "trajectory.gif", save_all=True, append_images=sheets[1:] + [sheets[-1]] * 3, duration=300, loop=0)
    sprite_sheet(torch.cat(rows), 2 * count).save(out / "trajectory.png")  # one row per time


def fresh_folder(path):
    """`path`, or path-2, path-3, ... if it already holds files: output never overwrites."""
    out = next(p for p in [Path(path)] + [Path(f"{path}-{k}") for k in range(2, 10000)] if not p.exists() or (p.is_dir() and not any(p.iterdir())))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"cannot write to '{out}': {e.strerror or e}")
    return out


def cmd_sample(args, model, guide, ckpt, device, out):
    """sample: --n sprites (classes spread as in the training set, or --class), guided
    with the default weight for the checkpoint's kind unless --guidance says otherwise."""
    if args.class_names and not ckpt["classes"]:
        raise UserError("this checkpoint was trained without classes, so --class cannot be used")
    spread = ckpt["classes"] and not (args.edit and not args.class_names)  # an edit is steered by --class, or by no class
    labels = class_plan(args.n, ckpt["classes"], ckpt["class_counts"], args.class_names.split(",") if args.class_names else None) if spread else None
    w = args.guidance if args.guidance is not None else default_guidance(labels is not None, guide)
    grid = 1 if args.no_snap else ckpt["grid"]
    if args.edit:
        return cmd_edit(args, model, guide, ckpt, labels, w, grid, device, out)
    bf16, why = decide_bf16(args.bf16, device, model)  # as for training (section 7): where it is faster
    frames, t0 = [] if args.trajectory else None, time.time()
    sprites = generate(model, args.n, args.steps, args.sampler, args.seed, device, labels, w, guide, grid, bf16,
                       sigma=args.sigma, frames=frames, grid_shift=args.grid_shift)
    write_sprites(out, sprites, None if labels is None else [ckpt["classes"][k] for k in labels], grid if args.native else 0)
    if frames is not None:
        write_trajectory(model, frames, args.steps, out)
    kind = " (classifier-free)" if labels is not None else " (autoguidance)" if guide else ""
    return (f"wrote {len(sprites)} sprites, grid.png, sheet.png{', trajectory.gif' if frames else ''} ({args.sampler}, {args.steps} steps, "
            f"guidance {w:g}{kind}, grid {grid}, bf16 {'on' if bf16 else 'off'} ({why}), {time.time() - t0:.1f} s)")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser():
    """train takes every TrainConfig field as a --flag; the sampling commands share theirs."""
    parser = Parser(prog="spriteflow.py", description="Flow matching for pixel-art sprites.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model")
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), f.type
        p.add_argument(flag, **({"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind, "choices": f.metadata["choices"]}),
                       default=f.default, help=f.metadata["help"] + ("" if "default" in f.metadata["help"] or f.default in ("", None) else f" (default: {f.default})"))
    for name, text in [("sample", "draw sprites from a checkpoint"), ("invert", "sprite -> noise -> sprite: the ODE run both ways"),
                       ("interpolate", "morph between two sprites or seeds")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", default="", help="checkpoint file (default: the newest .pt under runs/)")
        p.add_argument("--ema", default=None, help="which kept EMA length to use (default: the first)")
        p.add_argument("--steps", type=int, default=20, help="Heun steps (default: 20)")
        p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")
        p.add_argument("--out", default="samples" if name == "sample" else name, help="output folder (default: %(default)s; never overwritten)")
    p.add_argument("a", help="sprite file or integer seed")
    p.add_argument("b", help="sprite file or integer seed")
    p.add_argument("--frames", type=int, default=9, help="sprites along the way, ends included (default: 9)")
    sub.choices["invert"].add_argument("sprite", help="sprite image file")
    p = sub.choices["sample"]
    p.add_argument("--n", type=int, default=16, help="number of sprites (default: 16)")
    p.add_argument("--class", dest="class_names", default="", help="class name or comma list (default: all, as many as in training)")
    p.add_argument("--guidance", type=float, default=None, help=f"guidance weight w, 1 = none (default: {CFG_GUIDANCE:g} with classes, {AUTO_GUIDANCE:g} with a guide)")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun", help="ODE (euler, heun) or SDE sampler (default: heun)")
    p.add_argument("--sigma", type=float, default=1.0, help="SDE noise scale: sigma_t = sigma * beta_t; larger: flatter, simpler sprites (default: 1)")
    p.add_argument("--grid-shift", type=float, default=1.0, help="warp s of the time grid, t -> t / (t + s (1 - t)) (default: 1, uniform)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--no-snap", action="store_true", help="do not snap samples to the training data's pixel grid")
    p.add_argument("--native", action="store_true", help="also write each sprite at its art's native size into OUT/native")
    p.add_argument("--trajectory", action="store_true", help="also write trajectory.gif/.png: noise (t=0) to sprite (t=1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: as train decides: on CUDA, and on a CPU where it is faster)")
    p.add_argument("--edit", default="", help="a sprite to repaint in part (needs --mask; --class steers the repaint)")
    p.add_argument("--mask", default="", help="PNG whose opaque, non-black pixels mark what --edit repaints")
    return parser


def main(argv=None):
    """Parse the command line and run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # one line, no source echo
    try:
        if args.command == "train":
            train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
            return 0
        for name in ("n", "steps", "grid_shift", "frames", "sigma", "guidance"):  # finite; positive, or >= 0 for the last two
            value = getattr(args, name, 1)
            if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and name not in ("sigma", "guidance"))):
                raise UserError(f"--{name.replace('_', '-')} must be a {'non-negative' if name in ('sigma', 'guidance') else 'positive'} finite number, got {value}")
        if args.command == "sample" and args.edit and not args.mask:
            raise UserError("--edit needs --mask, an image whose opaque, non-black pixels mark what to repaint")
        device = pick_device(args.device)
        path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
        model, guide, ckpt = load_models(path, device, args.ema)
        out = fresh_folder(args.out)
        command = {"sample": lambda: cmd_sample(args, model, guide, ckpt, device, out), "invert": lambda: cmd_invert(args, model, ckpt, device, out),
                   "interpolate": lambda: cmd_interpolate(args, model, ckpt, device, out)}[args.command]
        print(f"{command()}; in {out}, from {path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped without saving; a run keeps its last checkpoint", file=sys.stderr)
        return 130
    return 0


def newest_checkpoint(root="runs"):
    """The most recently written .pt under root: usually the running or last run's last.pt."""
    found = sorted(Path(root).rglob("*.pt"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
    if not found:
        raise UserError(f"no checkpoint found under '{root}/'; train first (the first checkpoint comes at step 250) or pass --checkpoint")
    return found[-1]


if __name__ == "__main__":
    sys.exit(main())
