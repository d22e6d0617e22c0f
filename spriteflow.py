"""SpriteFlow: flow matching for 128x128 RGBA pixel-art characters, in one file.

Part I is the lesson, in the order of the mathematics: sprites as tensors ->
noise schedules -> the Gaussian probability path -> a time-conditioned U-Net ->
samplers and guidance -> weight averaging and the learning rate -> training ->
what an invertible flow can do. Part II, after its banner, runs all of this
for real: run folders, checkpoints, signals, bf16, several processes, the
benchmark and the command line. A reader who stops at the banner has read the
whole method. Time runs from t=0 (pure noise) to t=1 (data) everywhere. The
measurements behind every default are in the lab record, data/figures/README.md.

    python spriteflow.py train --data data/images      # 30 minutes by default
    python spriteflow.py sample                        # newest run, 16 sprites
"""

import argparse
import contextlib
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
from PIL import Image, ImageDraw, ImageFont

try:
    import fcntl  # one writer per run folder (POSIX); elsewhere the lock is skipped
except ImportError:
    fcntl = None


class UserError(Exception):
    """Bad input from the user: printed as one sentence, never as a traceback."""


# =============================================================================
#                           PART I: THE LESSON
# =============================================================================


# -----------------------------------------------------------------------------
# 1. Sprites as tensors
#
# A sprite is a 128x128 RGBA image. The whole set is decoded once into a uint8
# tensor (N, 4, 128, 128): 2,000 sprites take 130 MB, so a training step is a
# random index into memory, not a PNG decode. Per batch,
#
#     x = byte / 127.5 - 1        so every channel, alpha too, lies in [-1, 1],
#
# the scale of the N(0, I) noise we will mix in. Pixel art must stay on its
# pixel grid, so resizing is nearest-neighbour only (bilinear filtering invents
# colours no sprite has), and by a whole number: an image is padded with
# transparent pixels (centred, never stretched) to the smallest square side
# that divides 128, then scaled up. An 18x20 sprite becomes 32x32, then x4, so
# every art pixel is a 4x4 block; stretched to 128 it would be 6.4 pixels wide,
# some columns 6 and some 7, and no grid would fit it (lab record, "Colour
# drift"). Where alpha is 0 the RGB is set to 0: an invisible pixel's colour is
# junk the model should not learn. Images in subfolders are labelled by the
# top-level subfolder's name (my_sprites/slime/a.png is a slime); a flat folder
# has no classes.
#
# Pixel art is drawn on a coarse grid: the built-in sprites are 32x32 art shown
# at 4x, so every 4x4 block is one colour. detect_grid (Part II) finds that
# block size k in the data; snap_to_grid puts samples on it (each block gets the mean colour
# of its opaque pixels, the least-squares choice for a small symmetric jitter).
#
# A character is more than one sprite: a top-down game needs it facing front,
# left, back and right. With V views, one example is all V sprites of one
# character stacked along the channels, a tensor (4V, 128, 128) in which view k
# holds channels 4k..4k+3. The flow then learns the JOINT distribution
# p(view_0, ..., view_{V-1}) of one character's views: the same palette, gear and
# proportions in each. Sampling the views one by one from a single-view model
# draws from the product of the marginals p(view_0) ... p(view_{V-1}) instead,
# which knows nothing of which front goes with which back: four strangers. The
# views share positions (the head is at the top of every view), so a
# convolution of the stacked tensor sees the same body part in all views at once;
# stacking costs only the wider first and last layers (section 4). V = 1 is the
# plain single sprite. How sheets and folders become such stacks is Part II.
# -----------------------------------------------------------------------------


def load_rgba(path, size=128):
    """One image file -> (size, size, 4) uint8 (square_rgba)."""
    return square_rgba(open_rgba(path), size)  # Part II: Pillow's many modes, as RGBA


def square_rgba(img, size=128):
    """An RGBA image -> (size, size, 4) uint8: padded to a square whose side divides `size`
    (when the image fits), then resized by nearest neighbour, by a whole number if it can."""
    side = max(img.size)
    if side <= size:
        side = next(d for d in range(side, size + 1) if size % d == 0)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    arr = np.array(canvas.resize((size, size), Image.NEAREST), dtype=np.uint8)  # (size, size, 4)
    arr[arr[..., 3] == 0, :3] = 0
    return arr


def load_folder(folder, size=128, labels=True):
    """Every image under `folder` -> (uint8 (N, 4, size, size), names, classes, y).

    names are paths relative to the folder. With labels, and every image in a
    subfolder (two or more of them), classes are the sorted subfolder names and
    y (N,) the class of each image; otherwise classes is [] and y None.
    """
    folder = Path(folder)
    arrays, names = [], []
    for path in image_files(folder):  # Part II: sorted, with a clear error when there are none
        arr = read_or_warn(path, size)  # Part II: None, and a warning, for a broken file
        if arr is not None:
            arrays.append(arr)
            names.append(path.relative_to(folder).as_posix())
    check_loaded(folder, arrays, names)  # Part II: nothing readable, nearly empty images
    return stack_and_label(folder, arrays, names, labels)


def stack_and_label(folder, arrays, names, labels=True, what="images"):
    """(size, size, 4V) arrays named by their paths -> (uint8 (N, 4V, size, size), names,
    classes, y): classes from the top-level folders, as load_folder describes."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 4V, size, size)
    tops = [name.split("/")[0] if "/" in name else None for name in names]
    classes = sorted(set(tops) - {None})
    if None in tops and classes and labels:
        loose = tops.count(None)
        warnings.warn(f"{loose} {what} sit directly in '{folder}', outside the class folders; "
                      "training without classes")
    if not labels or len(classes) < 2 or None in tops:
        return x, names, [], None
    return x, names, classes, torch.tensor([classes.index(c) for c in tops])


def split_views(x):
    """(B, 4V, ...) stacked views -> (B V, 4, ...) single sprites, character by character."""
    return x.reshape(-1, 4, *x.shape[2:])


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
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).cpu().contiguous()  # (B, H, W, 4)
    if binary_alpha:
        x[..., 3] = torch.where(x[..., 3] >= 128, 255, 0).to(torch.uint8)
        x[..., :3] *= (x[..., 3:] > 0).to(torch.uint8)
    return x


# The flow may work in other colours than RGB (train --chroma b). A sprite's
# pixels are rotated onto one luminance axis and two chroma axes, and the chroma
# is scaled down by b:
#
#     y = D R rgb,   R = [ 1/sqrt3   1/sqrt3   1/sqrt3 ]    D = diag(1, b, b)
#                        [ 1/sqrt2      0     -1/sqrt2 ]
#                        [ 1/sqrt6  -2/sqrt6   1/sqrt6 ]
#
# R is orthonormal, so a grey pixel is all luminance and distances are kept. The
# path x_t = alpha_t y + beta_t eps (section 3) mixes the same N(0, I) noise into
# every axis, so the chroma's signal-to-noise ratio at t is b^2 times the
# luminance's: a sprite's light and shade are decided first, its hues later on the
# path, once the regions they fill are there. The loss weighs chroma errors by
# 1/b^2, so it still measures RGB errors. Sampled in RGB, sprites hold 4-8 times
# the art's colours, many in near-miss hues. With b = 0.25 a flat folder of real
# characters (set B) drew 16-22% fewer colours at the same distance to the data,
# and the built-in set 19-25% fewer at -9% and +5%, but labelled real creatures
# (set A) only 3-10% fewer at a 13-36% greater distance (lab record, "Colour
# drift"). So the default stays b = 1, plain RGB, where to_flow is the identity.
CHROMA = 1.0


def colour_axes(chroma):
    """D R (3, 3): the rows are the luminance and two chroma axes, the chroma scaled by b."""
    r = torch.tensor([[1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
                      [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
                      [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)]])
    return r * torch.tensor([1.0, chroma, chroma])[:, None]


def recolour(x, m):
    """(B, 4V, H, W) -> the same with every view's RGB multiplied by the (3, 3) matrix m."""
    v = x.unflatten(1, (-1, 4))  # (B, V, 4, H, W)
    rgb = torch.einsum("ij,bvjhw->bvihw", m.to(x.device, x.dtype), v[:, :, :3])
    return torch.cat([rgb, v[:, :, 3:]], 2).flatten(1, 2)


def to_flow(x, chroma):
    """RGBA (B, 4V, H, W) in [-1, 1] -> the flow's colours: luminance, b x chroma, alpha."""
    return x if chroma == 1 else recolour(x, colour_axes(chroma))


def from_flow(x, chroma):
    """The flow's colours -> RGBA, the inverse of to_flow: R is orthonormal, so
    (D R)^-1 = R^T D^-1, which is the transpose of colour_axes(1 / b)."""
    return x if chroma == 1 else recolour(x, colour_axes(1 / chroma).T)

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
# * Views (section 1): a character of V views is a (4V, 128, 128) image, so only
#   the stem and the head change, to 4V x 16 channels per position. Everything
#   between sees all views of a position together, at no extra cost per step.
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
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H W, C / heads)
        out = F.scaled_dot_product_attention(q, k, v)
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

    `target` and `schedule` say what the raw output means (section 3), `chroma` the
    colours it works in (b, section 1; 1 = RGB). With `views` = V
    the images are V stacked views, x (B, 4V, 128, 128), and the stem takes 64V channels.
    """

    def __init__(self, channels=(32, 64, 128), blocks=2, unshuffle=4, target="data",
                 schedule="linear", n_classes=0, groups=8, views=1, chroma=1.0):
        super().__init__()
        self.target, self.schedule, self.n_classes = target, schedule, n_classes
        self.views, self.chroma = views, chroma
        c0, t_dim = channels[0], 4 * channels[0]
        patch = 4 * views * unshuffle * unshuffle  # channels after pixel-unshuffle
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
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim, groups), SelfAttention(ch, groups),
                                  ResBlock(ch, ch, t_dim, groups)])
        self.up = nn.ModuleList()
        for level, c in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(ch + skip_channels.pop(), c, t_dim, groups))
                ch = c
            if level > 0:
                upsample = nn.Upsample(scale_factor=2, mode="nearest")
                self.up.append(nn.Sequential(upsample, nn.Conv2d(ch, ch, 3, padding=1)))
        out_conv = nn.Conv2d(ch, patch, 3, padding=1)
        norm = group_norm(ch, groups)
        self.head = nn.Sequential(norm, nn.SiLU(), out_conv, nn.PixelShuffle(unshuffle))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x, t, c=None):
        emb = self.time_embedding(t)
        if self.n_classes:
            if c is None:
                c = torch.full_like(t, self.n_classes, dtype=torch.long)  # "no class"
            emb = emb + self.class_embedding(c)
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
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.head(h)  # (B, 4V, 128, 128)

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
# Sampling integrates from noise X_0 ~ N(0, I) at t=0 to a sprite at t=1 on a
# grid t_0 = 0 < t_1 < ... < t_N = 1 with steps h_i = t_{i+1} - t_i. All of it
# runs in the flow's colours (section 1); from_flow turns the sprite into RGB.
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
# stay finite.
#
# A multistep solver on z_hat (one network call per step). Divide x = alpha
# z_hat + beta eps_hat by beta: y = x / beta moves with rho = alpha / beta, the
# signal-to-noise ratio, as dy/drho = z_hat exactly, so over a step t -> t'
#
#     x' = (beta'/beta) x + beta' * integral_rho^rho' z_hat(rho) drho.
#
# The part of the flow that is linear in x is solved in closed form; only the
# network's guess z_hat along the step is approximated. Holding it constant
# gives DDIM, x' = alpha' z_hat + beta' eps_hat: exact when the data is a single
# point (z_hat never changes), first order otherwise. Second order draws a line
# through the last two guesses and integrates that instead. In which variable?
# Along a path z_hat moves like rho near t=0 and like 1/rho^2 near t=1, so
# lines in t or log rho bend at one end; in v = alpha / sqrt(alpha^2 + beta^2)
# it is smooth at both (for Gaussian data, exactly linear). With n = sqrt(
# alpha^2 + beta^2) and integral v drho = sqrt(1 + rho^2), the line z_k + D (v -
# v_k) integrates in closed form:
#
#     x' = (beta'/beta) x + c z_k + (n' - beta' n / beta - v_k c) D,  c = alpha' - beta' alpha/beta
#
# finite at t' = 1, where it lands on the line's value at v = 1. Each call
# z_k = z_hat(x_k, t_k) fixes D = (z_k - z_{k-1}) / (v_k - v_{k-1}), used twice:
# to redo the step just taken (a corrector, interpolating) and to take the next
# (a predictor, extrapolating), as UniPC does (Zhao et al. 2023). Both reuse
# one call. On the closed-form Gaussian of the tests it beats Heun with 20 steps
# (40 calls) from 12 calls on. On a trained network the guesses are rougher:
# at 20 calls it lands as close to a 200-call reference as Heun 20 with half the
# calls, and its sprites measure the same as Heun 20's on the built-in set and
# on real art. With 30 calls it came 3-20 % closer to real game art (sets A
# and B, six checkpoints; a tie with set B's own groups) than with 20, so
# multistep 30 is the default; with 10-15 calls it blurs real game art (lab
# record, "Samplers").
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
# snapshot from early in training, and only luminance and alpha are guided
# (guiding the guide's duller colours drives hues to saturated primaries).
# It is not the default: on real game art its snapshot is too weak a guide and
# every sprite comes out washed-out (lab record, "Guidance on real art").
#
# A folder without classes gets classes of its own (Hu et al. 2023,
# "Self-guided diffusion models"): k-means splits the training sprites into C
# groups by a cheap fixed feature, an 8x8 thumbnail of where each colour sits,
# and the network learns u(x, t, group) as it would for classes. Sampling
# draws each sprite's group in proportion to the groups' sizes, so the groups
# together still draw p(x). What they buy is a simpler field: within one group
# the sprites share a colour layout, and the network need not average over all
# of them. On real set B, 16 groups at w = 1 came 9-17 % closer to the data
# (two seeds); guiding with them (w = 2) pushed sprites 19-27 % away, so the
# groups condition by default but do not guide (lab record, "Colour drift").
# An edit, or the missing views of a given sprite (section 8), is conditioned
# on the sprite's own group: the one whose centre is nearest to it.
#
# Guiding the clean-sprite guess z_hat is the same as guiding u: u = a z_hat
# + b x is affine in z_hat with coefficients that do not depend on the network,
# so (1 - w) u_0 + w u_1 = a ((1 - w) z_0 + w z_1) + b x. We guide z_hat because
# there the result can be clamped to [-1, 1], the range of every sprite:
# clamping moves each coordinate towards any valid z, so it only removes error.
# A guided call costs about twice an unguided one: both fields come from one
# network call on a batch of 2B (class c, then "no class"), or from two networks.
#
# Palettes. A palette is a second constraint on the same guess: a finite set P
# of colours (the training set's, or an artist's palette file). Projecting
# onto it replaces each opaque colour by its nearest member,
#
#     Pi(z) = argmin_{p in P} |lab(z) - lab(p)|,     z_hat <- z_hat + lam (Pi(z_hat) - z_hat)
#
# (lam = 1: hard), with lab the OKLab colour space, where distance tracks what
# the eye sees. Pixel art is coloured block by block, so each k x k block's
# colour (snap_to_grid) is projected and the whole block takes the result.
# Unlike the clamp, the set is not convex and Pi is not continuous: a guess on
# a boundary between two palette colours jumps. Early on z_hat is a blurry
# mean of many sprites, whose nearest palette colour is often the wrong one,
# and the velocity u = a z_hat + b x then points at a guess that moves in
# jumps; the network fights it in the next call. So the projection starts at a
# late time t_p, and the final sprite is projected exactly. Measured on real
# set B, even late was too early: from t_p = 0.7 the random-feature distance to
# the data rose by 10 %, from 0.9 by 7 %, with the projection of the finished
# sprite alone by 6 %, and the flatness fell in the same order. So PALETTE_T
# = 1: the guesses run free and only the sprite is projected; OnPalette keeps
# t_p and the pull lam for experiments.
# -----------------------------------------------------------------------------

SAMPLERS = ("heun", "multistep", "euler", "sde")


@dataclasses.dataclass
class Solver:
    """How to integrate: the method, its steps, for the SDE the noise scale and seed, and a
    palette the guesses are held to (OnPalette, below), or None."""
    method: str = "multistep"
    steps: int = 30
    sigma: float = 1.0
    seed: int = 0
    palette: object = None  # an OnPalette, or None

    def calls(self):
        """Network calls per sprite (a guided call, on two inputs at once, counts as one)."""
        return 2 * self.steps if self.method == "heun" else self.steps


def time_grid(steps, shift=1.0):
    """t_0 = 0 < t_1 < ... < t_N = 1: uniform steps, warped by shift_time (section 3)."""
    return shift_time(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift).tolist()


def at(x, t):
    """The scalar time t for every sample in the batch, shape (B,)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_euler(velocity, x, steps, frames=None):
    """Euler's method from t=0 to t=1 in `steps` steps; frames collects each state."""
    ts = time_grid(steps)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, at(x, t))
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def sample_heun(velocity, x, steps, frames=None, ts=None):
    """Heun's method: an Euler predictor, then the average of the slopes at both ends.
    `ts` overrides the grid; a decreasing grid integrates backwards (section 8)."""
    ts = time_grid(steps) if ts is None else ts
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        u = velocity(x, at(x, t))
        x_euler = x + h * u
        x = x + 0.5 * h * (u + velocity(x_euler, at(x, t_next)))
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def sample_multistep(clean, x, steps, sched, frames=None):
    """The multistep solver above: `steps` calls of clean(x, t), second order."""
    ts = time_grid(steps)
    alpha, beta = schedule(sched, torch.tensor(ts, dtype=torch.float64))[:2]
    alpha, beta = alpha.tolist(), beta.tolist()
    n = [math.hypot(a, b) for a, b in zip(alpha, beta)]
    v = [a / m for a, m in zip(alpha, n)]

    def advance(x, i, z, slope):  # t_i -> t_{i+1} with z_hat(v) = z + slope (v - v_i)
        c = alpha[i + 1] - beta[i + 1] * alpha[i] / beta[i]
        d = n[i + 1] - beta[i + 1] * n[i] / beta[i] - v[i] * c
        return (beta[i + 1] / beta[i]) * x + c * z + d * slope

    x_prev = z_prev = None
    for k in range(steps):
        z = clean(x, at(x, ts[k]))
        slope = 0.0
        if k > 0:
            slope = (z - z_prev) / (v[k] - v[k - 1])
            x = advance(x_prev, k - 1, z_prev, slope)  # corrector: the last step, with the line
        x_prev, z_prev = x, z
        x = advance(x, k, z, slope)  # predictor
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def sample_sde(velocity, x, steps, sched, sigma=1.0, generator=None, frames=None):
    """Euler-Maruyama, with the score implied by `velocity` (section 3). A larger sigma
    injects more noise and pulls harder towards high density; any sigma leaves the
    marginals p_t unchanged in exact arithmetic."""
    ts = time_grid(steps)
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        h, t = t_next - t_now, at(x, t_now)
        u = velocity(x, t)
        score = score_from_vector_field(u, x, t, sched)
        sigma_t = sigma * expand(schedule(sched, t)[1], x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + h * (u + 0.5 * sigma_t**2 * score) + sigma_t * math.sqrt(h) * noise
        if frames is not None:
            frames.append(x)
    return x


def integrate(clean, x, solver, sched, frames=None):
    """Carry the noise x (t=0) to sprites (t=1) through the field of `clean` by `solver`."""
    if solver.palette is not None:
        clean = held_to_palette(clean, solver.palette)
    if solver.method == "multistep":
        return sample_multistep(clean, x, solver.steps, sched, frames)
    velocity = velocity_of(clean, sched)
    if solver.method == "euler":
        return sample_euler(velocity, x, solver.steps, frames)
    if solver.method == "heun":
        return sample_heun(velocity, x, solver.steps, frames)
    generator = torch.Generator(x.device).manual_seed(solver.seed + 1)
    return sample_sde(velocity, x, solver.steps, sched, solver.sigma, generator, frames)


def guided_clean(model, c=None, w=1.0, guide=None, bf16=False):
    """z_w(x, t): the clean-sprite guess for labels c (B,) or None, guided as above by
    classifier-free guidance (a model with classes) or by the guide (luminance and alpha).
    Guesses are combined and clamped in RGB, then returned in the flow's colours."""
    weak = (model.n_classes > 0 and c is not None) or guide is not None

    def clean(x, t):
        with autocast(x.device, bf16):  # Part II: bf16 where it pays
            if w == 1 or not weak:
                return model.clean(x, t, c).float()
            if guide is None:  # one batched call: conditional and unconditional halves
                none = torch.full_like(c, model.n_classes)
                both = model.clean(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, none]))
                z_main, z_weak = from_flow(both.float(), model.chroma).chunk(2)
            else:
                z_main = from_flow(model.clean(x, t, c).float(), model.chroma)
                z_weak = from_flow(guide.clean(x, t).float(), model.chroma)
                z_weak = luminance_guide(z_main, z_weak)
        return to_flow((z_weak + w * (z_main - z_weak)).clamp(-1, 1), model.chroma)

    return clean


def luminance_guide(z_main, z_weak):
    """The weak guess with the main guess's chroma: only luminance and alpha are guided.
    Works view by view on stacked views (B, 4V, H, W)."""
    main, weak = z_main.unflatten(1, (-1, 4)), z_weak.unflatten(1, (-1, 4))  # (B, V, 4, H, W)
    grey = (main - weak)[:, :, :3].mean(2, keepdim=True)  # the grey part of the gap
    return torch.cat([main[:, :, :3] - grey, weak[:, :, 3:]], 2).flatten(1, 2)


def velocity_of(clean, sched):
    """The velocity field u = a z_hat + b x of a clean-sprite guess (section 3)."""
    return lambda x, t: velocity_from_data(clean(x, t), x, t, sched)


PALETTE_T = 1.0  # t_p: 1 = after sampling only, measured best on set B (lab record, "Palettes")
OKLAB_M1 = torch.tensor([[0.4122214708, 0.5363325363, 0.0514459929],  # linear sRGB -> LMS
                         [0.2119034982, 0.6806995451, 0.1073969566],
                         [0.0883024619, 0.2817188376, 0.6299787005]])
OKLAB_M2 = torch.tensor([[0.2104542553, 0.7936177850, -0.0040720468],  # cube-rooted LMS -> Lab
                         [1.9779984951, -2.4285922050, 0.4505937099],
                         [0.0259040371, 0.7827717662, -0.8086757660]])


@dataclasses.dataclass
class OnPalette:
    """The palette constraint: colours uint8 (K, 3), the pixel grid k whose blocks are
    projected, the time t_p it starts at, the pull lam (1 = hard), and the flow's chroma
    scale b (section 1), to read the guess in RGB."""
    colours: torch.Tensor
    grid: int = 1
    t_p: float = PALETTE_T
    lam: float = 1.0
    chroma: float = 1.0


def oklab(rgb):
    """sRGB (..., 3) in [-1, 1] -> OKLab (..., 3): L in [0, 1] and two opponent axes."""
    c = ((rgb.float() + 1) / 2).clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lms = linear @ OKLAB_M1.to(c.device).T
    return lms.clamp(min=0).pow(1 / 3) @ OKLAB_M2.to(c.device).T


def nearest_colour(rgb, colours):
    """rgb (M, 3) in [-1, 1], colours uint8 (K, 3) -> (M,) index of each one's nearest colour
    (in chunks of 65,536 colours, so the distances of a 64-sprite batch fit in memory)."""
    palette = oklab(colours.to(rgb.device).float() / 127.5 - 1)  # (K, 3)
    parts = [torch.cdist(oklab(part), palette).argmin(1) for part in rgb.split(1 << 16)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=rgb.device)


def project_to_palette(z, pal):
    """z_hat (B, 4, H, W) -> each opaque pixel's RGB moved lam of the way to the palette
    colour nearest its k x k block's colour; alpha and transparent pixels unchanged."""
    k = pal.grid
    block = snap_to_grid(z, k)[:, :3, ::k, ::k]  # (B, 3, H/k, W/k): one colour per block
    rgb = block.permute(0, 2, 3, 1).reshape(-1, 3)
    target = pal.colours.to(z.device).float()[nearest_colour(rgb, pal.colours)] / 127.5 - 1
    target = target.reshape(*block.shape[:1], *block.shape[2:], 3).permute(0, 3, 1, 2)
    target = target.repeat_interleave(k, 2).repeat_interleave(k, 3)  # (B, 3, H, W)
    moved = z[:, :3] + pal.lam * (target - z[:, :3])
    return torch.cat([torch.where(z[:, 3:] >= 0, moved, z[:, :3]), z[:, 3:]], 1)


def held_to_palette(clean, pal):
    """The guess of `clean`, projected onto the palette from t_p on (the clamp stays)."""

    def clean_on_palette(x, t):  # t is float32: 0.9 reads 0.8999999762, hence the 1e-6
        z = clean(x, t)
        if t[0].item() < pal.t_p - 1e-6:
            return z
        rgb = split_views(from_flow(z, pal.chroma))  # view by view
        return to_flow(project_to_palette(rgb, pal).reshape(z.shape), pal.chroma)

    return clean_on_palette


def palette_pixels(sprites, colours):
    """uint8 sprites (B, H, W, 4) -> every opaque pixel's RGB replaced by its nearest
    palette colour, exactly; alpha untouched. The last step of sampling with a palette."""
    out = sprites.clone()
    opaque = out[..., 3] > 0  # (B, H, W)
    rgb, which = out[..., :3][opaque].unique(dim=0, return_inverse=True)  # (M, 3) distinct
    nearest = nearest_colour(rgb.float() / 127.5 - 1, colours)
    out[..., :3][opaque] = colours.to(out.device)[nearest][which]
    return out


def gaussian_noise(n, seed, views=1):
    """n noises (n, 4V, 128, 128) from a CPU generator: the same seed, the same sprites, on
    any device."""
    return torch.randn(n, 4 * views, 128, 128, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, noise, labels=None, guidance=1.0, guide=None, solver=None, grid=1, bf16=False):
    """Sprites from noises (n, 4V, 128, 128) as uint8 (n V, 128, 128, 4), snapped to the
    k = grid pixel grid, the V views of each character in a row; labels (n,) or None. Runs
    in batches of 64."""
    solver = solver or Solver()
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(noise), 64):
        x = noise[start:start + 64].to(device)  # (b, 4V, 128, 128) at t=0
        c = None if labels is None else labels[start:start + 64].to(device)
        clean = guided_clean(model, c, guidance, guide, bf16)
        batch_solver = dataclasses.replace(solver, seed=solver.seed + start)  # the SDE's noise
        x = from_flow(integrate(clean, x, batch_solver, model.schedule), model.chroma)
        sprites = to_uint8(snap_to_grid(split_views(x), grid))  # (b V, 128, 128, 4)
        if solver.palette is not None:
            sprites = palette_pixels(sprites, solver.palette.colours)
        out.append(sprites)
    return torch.cat(out)


# -----------------------------------------------------------------------------
# 6. Weight averaging and the learning rate
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
# sigma_rel = 0.10 gives gamma = 6.94. The average at step t depends only on
# the steps up to t, not on the budget, so a run can always be extended.
#
# LR. A linear warm-up over the first steps (Adam's moment estimates are poor
# at first), then constant, then a short cool-down to the end of the budget.
# The classic alternative anneals the LR over the whole budget, to let the
# weights settle out of the jitter that a high LR keeps them in. Here the power
# EMA already averages much of that jitter away, and the extra steps at a high
# LR pay: at equal steps, a constant LR matched or beat a cosine to the budget
# (lab record, "EMA and learning rate").
#
# Cool-down (warmup-stable-decay). --cooldown f ends the budget with a linear
# fall of the LR to 0 over its last share f:
#
#     lr = base_lr * min(1, (1 - progress) / f),   progress = share of the budget
#
# The average and the cool-down attack the same jitter differently: the EMA
# mixes weights from the last tenth or so of the run, each a little behind the
# newest, so it lags; a falling LR shrinks the jitter itself, with no lag. With
# f = 0.2 both real sets came closer to the data at every seed measured (RFD
# 7-18% lower; lab record, "Cool-down"), so it is the default. The state before
# the fall is kept as stable.pt: --resume with a larger budget continues from
# there, so a 30-minute run still becomes exactly the 60-minute run.
# -----------------------------------------------------------------------------

EMA_LENGTH = 0.10  # sigma_rel of the one power EMA we keep


def ema_gamma(sigma_rel):
    """The exponent gamma whose power-function EMA has relative length sigma_rel:
    the real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = sigma_rel^-2."""
    s = sigma_rel ** -2
    return float(max(np.roots([1, 7, 16 - s, 12 - s]).real))


@torch.no_grad()
def ema_update(ema, model, step, gamma):
    """One power-function EMA step; `step` counts from 1, so the first average is the model."""
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(list(ema.parameters()), params, 1 - (1 - 1 / step) ** (gamma + 1))


def lr_at(step, base_lr, warmup, progress=0.0, cooldown=0.0):
    """Linear warm-up over `warmup` steps, then the constant base_lr; over the last share
    `cooldown` of the budget (progress 1 - cooldown -> 1) a linear fall to 0."""
    lr = base_lr * min(1.0, (step + 1) / warmup)
    if cooldown:
        lr *= min(1.0, (1.0 - progress) / cooldown)
    return lr


# -----------------------------------------------------------------------------
# 7. Training
#
# One training step, for a batch of sprites z with classes c:
#     t   ~ uniform, then shift_time (section 3)
#     eps ~ N(0, I)
#     c   -> "no class" with probability label_dropout (so guidance has u(x, t, -))
#     y   = to_flow(z)      (the flow's colours, section 1)
#     x_t = alpha_t y + beta_t eps
#     L   = || u_theta(x_t, t, c) - u_t(x_t | y) ||^2, the error read back in RGB
#
# With x-prediction the velocity loss is an x-loss in disguise:
#     || u(z_hat) - u(z) ||^2 = w(t) || z_hat - z ||^2,  w(t) = a(t)^2  (= 1/(1-t)^2, linear path)
# An error e in the flow's colours is measured as || from_flow(e) ||^2: chroma
# errors count 1/b^2, so the loss is the RGB loss whatever b is.
# w is 1 at t=0 and 400 at the BETA_MIN clamp: the nearly trivial end of the
# path would dominate the gradient. Training caps w at weight_cap, so the
# middle of the path, where colours are decided, learns much faster.
#
# Characters (views V > 1) are also taught the conditional that --views-from
# asks for (section 8): for half of them one view k, drawn at random, is shown
# clean, x_t[k] = z[k], and left out of the loss. The joint model alone knows
# p(views) and can only be steered towards a given view through its guesses; a
# network that has seen given views learns p(other views | view k) directly.
# It needs no flag: at t < 1 every other view carries noise, so a view without
# any says by itself that it is given.
#
# The loop is the textbook one: draw a batch, take an AdamW step, update the
# EMA, and every val_every steps measure the validation loss (the uncapped
# loss of the EMA on held-out sprites, at fixed seeds for t and eps, so that it
# changes only when the weights do) and save a checkpoint. A step whose
# gradient is not finite is skipped, weights and EMA untouched; several in a
# row mean the weights themselves have gone bad, and the run stops.
#
# Autoguidance's guide (section 5) is a frozen copy of the EMA taken when
# guide_fraction of the budget is spent: the same network, trained 8x less.
# `cfg` is a TrainConfig (Part II): every knob of the recipe, each a --flag of
# `train` with its default and help text.
# Everything else a real run needs (the run folder and its lock, checkpoints
# that survive a crash, signals, bf16, several processes, the log) is Part II.
# -----------------------------------------------------------------------------

MAX_BAD_STEPS = 5  # non-finite gradients in a row that end a run
SHOWN_VIEW_P = 0.5  # share of training characters that show one view clean (views only)


def sample_t(n, shift, generator, device):
    """Training times (n,): uniform on [0, 1], then shifted towards noise (section 3)."""
    return shift_time(torch.rand(n, generator=generator, device=device), shift)


def drop_labels(c, p, n_classes, generator):
    """Each label (B,) becomes n_classes, "no class", with probability p."""
    dropped = torch.rand(c.shape, generator=generator, device=c.device) < p
    return torch.where(dropped, n_classes, c)


def flow_matching_loss(model, z, t, eps, c, cfg, shown=None):
    """Per-sample loss (B,): || u_theta(x_t, t, c) - u_t(x_t | z) ||^2, averaged over pixels.
    For x-prediction this is w(t) || z_hat - z ||^2, w capped at cfg.weight_cap (0 = no cap:
    validation). z comes in RGB; the path runs in the flow's colours (section 1) and the
    errors are measured back in RGB. `shown` (B, 4V, 1, 1) marks views given clean, left
    out of the loss (below). `model` may be a DDP wrapper, so it is called."""
    z = to_flow(z, cfg.chroma)
    x_t = sample_path(z, t, eps, cfg.schedule)
    drawn = torch.ones_like(z[:, :, :1, :1])  # (B, 4V, 1, 1): the channels that are drawn
    if shown is not None:
        x_t = shown * z + (1 - shown) * x_t
        drawn = 1 - shown
    out = model(x_t, t, c).float()
    if cfg.target == "velocity":
        target = conditional_vector_field(z, t, eps, cfg.schedule)
        return mean_over(drawn, from_flow(out - target, cfg.chroma).pow(2))
    w = data_coefficients(t, cfg.schedule, t)[0] ** 2  # (B,): u(z_hat) - u(z) = a (z_hat - z)
    if cfg.weight_cap:
        w = w.clamp(max=cfg.weight_cap)
    return w * mean_over(drawn, from_flow(out - z, cfg.chroma).pow(2))


def mean_over(drawn, err):
    """The mean of err (B, C, H, W) over the channels where drawn (B, C, 1, 1) is 1: (B,)."""
    return (err * drawn).flatten(1).sum(1) / (drawn.flatten(1).sum(1) * err[0, 0].numel())


def shown_views(n, views, p, gen, device):
    """(n, 4V, 1, 1): 1 on the 4 channels of one view, drawn at random, for a share p of
    the n characters; 0 elsewhere. Those views are shown to the network clean."""
    k = torch.randint(views, (n,), generator=gen, device=device)
    shown = torch.rand(n, generator=gen, device=device) < p
    one_hot = F.one_hot(k, views) * shown[:, None]  # (n, V)
    return one_hot.repeat_interleave(4, 1).float()[:, :, None, None]


@dataclasses.dataclass
class TrainState:
    """What changes while training; a checkpoint saves all of it, so a run resumes exactly."""
    model: nn.Module  # the weights AdamW moves
    ema: nn.Module  # their power-function average (section 6): what we sample from
    opt: torch.optim.Optimizer
    gen: torch.Generator  # every random draw of training comes from this one generator
    step: int = 0
    seconds: float = 0.0  # training time so far, across resumes
    best_val: float = math.inf
    skipped: int = 0  # steps skipped because the gradient was not finite
    guide: nn.Module = None  # the early EMA snapshot for autoguidance, once taken


def new_state(cfg, n_classes, device, rank=0):
    """Fresh weights (the same on every process), their EMA, AdamW and the RNG."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device, n_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # AdamW: per-parameter step sizes, weight decay applied to the weights directly.
    # beta2 = 0.99 lets the second moment follow the loss scale, which shifts a lot.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.99))
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    return TrainState(model, ema, opt, gen)


def build_model(cfg, device, n_classes=0):
    """The U-Net a config describes. On a GPU the default working resolution is 64x64:
    there is compute to spare for finer positions."""
    unshuffle = cfg.unshuffle or (4 if device.type == "cpu" else 2)
    widths = tuple(int(c) for c in cfg.channels.split(","))
    return UNet(widths, cfg.blocks, unshuffle, cfg.target, cfg.schedule, n_classes,
                views=cfg.views, chroma=cfg.chroma)


# A mirrored sprite is another plausible sprite, so training flips half of them. A
# mirrored turnaround must also swap its left and right views: the mirror image of a
# character facing left faces right. In the order front, left, back, right (V = 4) that
# swaps views 1 and 3; other view counts have no agreed order, so they are never flipped.
MIRRORED_VIEWS = {1: [0], 4: [0, 3, 2, 1]}  # V -> the view each mirrored view comes from


def mirror(z):
    """Stacked views z (B, 4V, H, W) as their mirror image: each view flipped left to right,
    the left and right views swapped (MIRRORED_VIEWS)."""
    views = z.flip(-1).unflatten(1, (-1, 4))  # (B, V, 4, H, W)
    return views[:, MIRRORED_VIEWS[views.shape[1]]].flatten(1, 2)


def draw_batch(data, cfg, gen):
    """A batch of training sprites z (B, 4V, 128, 128) in [-1, 1], mirrored at random, and
    their labels (B,), some dropped to "no class"; None without classes."""
    B, device = cfg.batch_size, data.train_x.device
    idx = torch.randint(len(data.train_x), (B,), generator=gen, device=device)  # with replacement
    z = to_float(data.train_x[idx])
    if cfg.flip and cfg.views in MIRRORED_VIEWS:
        flip = torch.rand(B, generator=gen, device=device) < 0.5
        z = torch.where(expand(flip, z), mirror(z), z)
    if data.train_y is None:
        return z, None
    return z, drop_labels(data.train_y[idx], cfg.label_dropout, len(data.classes), gen)


def train_step(net, opt, z, c, cfg, gen, amp, lr):
    """One AdamW step on the batch (z, c). Returns (t (B,), per-sample losses (B,), the
    gradient norm, whether the step was taken: not when the gradient is not finite)."""
    t = sample_t(len(z), cfg.t_shift, gen, z.device)  # (B,)
    eps = torch.randn(z.shape, generator=gen, device=z.device)  # (B, 4V, 128, 128)
    for group in opt.param_groups:
        group["lr"] = lr
    shown = None
    if cfg.views > 1:  # a share of the characters shows one view clean (section 7)
        shown = shown_views(len(z), cfg.views, SHOWN_VIEW_P, gen, z.device)
    with amp:
        per_sample = flow_matching_loss(net, z, t, eps, c, cfg, shown)
    opt.zero_grad(set_to_none=True)
    per_sample.mean().backward()
    params = opt.param_groups[0]["params"]
    grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # spikes are scaled, not followed
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    return t, per_sample.detach(), grad_norm, finite


@torch.no_grad()
def validation_loss(model, data, cfg, bf16, batch_size=64):
    """Mean uncapped flow-matching loss of `model` on the held-out sprites, fixed seeds."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)  # the same t and eps at every validation
    total = 0.0
    for i in range(0, len(data.val_x), batch_size):
        z = to_float(data.val_x[i:i + batch_size]).to(device)
        t = torch.rand(len(z), generator=gen).to(device)
        eps = torch.randn(z.shape, generator=gen).to(device)
        c = None if data.val_y is None else data.val_y[i:i + batch_size].to(device)
        with autocast(device, bf16):
            loss = flow_matching_loss(model, z, t, eps, c, dataclasses.replace(cfg, weight_cap=0))
        total += loss.sum().item()
    return total / len(data.val_x)


def train(cfg, stop_after=None):
    """Train per `cfg` and return the run folder. Stops when the budget is spent, at step
    `stop_after` (for tests), or when a signal asks: then it saves and raises Interrupted."""
    check_config(cfg)  # Part II: each bad value in one sentence, before any work
    rank, world, device = setup_distributed(pick_device(cfg.device))  # Part II: torchrun
    with StopSignals() as stop, open_run_folder(cfg, rank) as folder:  # Part II: signals, lock
        ckpt, cfg = resume_point(folder, cfg)  # Part II: the checkpoint to continue, if any
        data = load_training_data(cfg, ckpt, rank, world, device)  # Part II: sprites, split, grid
        state = new_state(cfg, len(data.classes), device, rank)
        if ckpt:
            restore(state, ckpt, cfg, rank)  # Part II: weights, EMA, AdamW, RNG, counters
        bf16, why = decide_bf16(cfg.bf16, device, state.model, ckpt, batch=cfg.batch_size)
        bf16 = any_rank(bf16, device)  # each process timed its own probe; all must train alike
        net = wrap(state.model, world, device, cfg.compile)  # Part II: DDP, torch.compile
        stop.during_start_up(folder)  # Part II: a signal during start-up ends here, in one line
        log = None  # under torchrun, the first process keeps the books
        if rank == 0:
            log = TrainingLog(folder, cfg, data, state, world, bf16, why)  # Part II
        reason = training_loop(cfg, state, data, net, bf16, log, stop, stop_after)
        if rank == 0:
            log.finish(state, data, reason)  # the last row, validation and checkpoint
        check_ranks_in_sync(state.model, world)  # Part II: DDP kept every replica identical
        if reason == "interrupted":
            raise Interrupted(folder, stop.signum)
    return folder


def training_loop(cfg, state, data, net, bf16, log, stop, stop_after=None):
    """Step until the budget is spent, a signal asks to stop or step `stop_after` is reached;
    returns "done", "interrupted" or "stopped"."""
    device = data.train_x.device
    gamma = ema_gamma(EMA_LENGTH)
    amp = autocast(device, bf16)  # Part II: bf16 where it pays
    wants_guide = cfg.guide == "on" or (cfg.guide == "auto" and not data.classes)
    bad_in_row = 0  # non-finite gradients in a row
    cooling = cooling_down(state.step, run_progress(state.step, state.seconds, cfg), cfg)
    last = time.time()
    while True:
        now = time.time()
        state.seconds += now - last  # training time, summed across resumes
        last = now
        progress = run_progress(state.step, state.seconds, cfg)  # Part II: share of the budget
        if any_rank(progress >= 1 or stop.asked or state.step == stop_after, device):  # Part II
            if progress >= 1:
                return "done"
            return "interrupted" if stop.asked else "stopped"
        lr = lr_at(state.step, cfg.lr, cfg.warmup, progress, cfg.cooldown)
        if not cooling and cooling_down(state.step, progress, cfg):
            cooling = True  # the state before the cool-down: where a longer budget resumes
            if log is not None:
                log.keep_stable(state, data)  # Part II: stable.pt
        state.model.train()
        z, c = draw_batch(data, cfg, state.gen)
        t, per_sample, grad_norm, finite = train_step(net, state.opt, z, c, cfg, state.gen, amp, lr)
        state.step += 1
        bad_in_row = 0 if finite else bad_in_row + 1
        if finite:
            ema_update(state.ema, state.model, state.step, gamma)
        else:
            state.skipped += 1
        if bad_in_row >= MAX_BAD_STEPS:
            what = f"the loss was not finite for {MAX_BAD_STEPS} steps in a row"
            raise UserError(diverged(cfg, state, lr, what))  # Part II: the sentence it ends with
        if wants_guide and state.guide is None and progress >= cfg.guide_fraction:
            state.guide = copy.deepcopy(state.ema)  # the model as it was at this point
        if log is None:
            continue  # under torchrun, the first process keeps the books
        log.add(t, per_sample, grad_norm, lr)  # Part II: sums for the next CSV row
        validate = state.step % cfg.val_every == 0
        if validate or state.step % cfg.log_every == 0:
            log.stop_clock()  # images per second count training steps only
            val = validate_and_save(cfg, state, data, bf16, lr) if validate else None
            log.row(state, lr, val)  # Part II: CSV row, progress line, training_log.png
        if state.step % cfg.sample_every == 0:
            log.sample_grid(state.ema, data, state.step)  # Part II: samples/step_NNNNNNN.png


def cooling_down(step, progress, cfg):
    """Whether the step at this share of the budget runs below the constant LR."""
    return lr_at(step, cfg.lr, cfg.warmup, progress, cfg.cooldown) < lr_at(step, cfg.lr, cfg.warmup)


def validate_and_save(cfg, state, data, bf16, lr):
    """The EMA's validation loss; then last.pt, and best.pt when the loss improved. Only
    finite weights are ever saved, so a diverged run keeps its last good checkpoint."""
    val = validation_loss(state.ema, data, cfg, bf16)
    if not math.isfinite(val):
        raise UserError(diverged(cfg, state, lr, "the validation loss was not finite"))
    improved = val < state.best_val
    state.best_val = min(val, state.best_val)
    ckpt = checkpoint_state(cfg, state, data, bf16)  # Part II: weights, optimizer, RNG, data id
    save_checkpoint(Path(cfg.run_dir) / "last.pt", ckpt)  # Part II: never half a file
    if improved:
        save_checkpoint(Path(cfg.run_dir) / "best.pt", ckpt)
    return val


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
# The other views of a sprite. A model of characters (section 1) knows the joint
# p(view_0, ..., view_{V-1}); given one view y it should draw the others from the
# conditional p(other views | view_k = y). That is inpainting again, with a mask
# over channel groups instead of pixels: m is 0 on the 4 channels of view k and 1
# elsewhere, so every guess z_hat holds view k equal to y while the unknown views
# are drawn towards a character whose view k is y. Sampling the missing views
# independently, or from a model of single sprites, could only match y's
# marginal statistics; the joint model makes them the same character.
# Holding the guess alone was not enough: the network sees view k in x_t only
# through noise, and through t = 0.1-0.6, where colours are decided, mostly
# noise, so it drew the other views as it pleased (lab record). A views model is
# trained with one view shown clean (section 7), so x_t shows it y itself.
# The drawn views are then projected onto y's own colours (section 5's palette,
# with the given sprite as the palette): one character wears one palette in
# every direction. Without it the views carry the speckle of the colour drift,
# which a colour measure counts as disagreement: on held-out built-in
# characters the drawn views were farther from the true ones than a stranger's
# (0.73); on the given view's colours, closer than the views of the nearest
# training character (0.30 against 0.32; lab record).
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
    wa, wb = torch.sin((1 - s) * theta) / sin, torch.sin(s * theta) / sin  # (B,) each
    direction = expand(wa, a) * ua + expand(wb, b) * ub
    return expand((1 - s) * na + s * nb, a) * direction


def view_mask(views, k):
    """The mask (1, 4V, 1, 1) that repaints every view but view k."""
    m = torch.ones(1, views, 4, 1, 1)
    m[:, k] = 0
    return m.flatten(1, 2)


@torch.no_grad()
def inpaint(clean, sched, y, m, x, solver, shown=False):
    """Repaint the sprite y (B, 4V, H, W) where the mask m is 1, from the noise x, by
    overwriting the known part of every guess z_hat with y (above); with `shown`, x_t's
    known part is y too, as a views model was trained. m broadcasts against y:
    (B, 1, H, W) marks pixels, view_mask(V, k) whole views."""

    def held(x_t, t):  # the guess, its known part replaced by y
        if shown:
            x_t = m * x_t + (1 - m) * y
        return m * clean(x_t, t) + (1 - m) * y

    return integrate(held, x, solver, sched)


# =============================================================================
#                       PART II: RUNNING IT FOR REAL
#
# Everything above is the method. What follows is what a tutorial needs once
# people run it on their own folders, laptops and GPUs, and expect that
# nothing is lost and nothing is silent: images in every format Pillow reads,
# a run folder with one writer at a time, checkpoints that survive a crash or
# a full disk, Ctrl-C and SIGTERM that save before they stop, a run that
# diverges stopping with one sentence, bf16 where the hardware makes it pay,
# several processes under torchrun, a training log with its plot, the speed
# benchmark, and the command line. Every user mistake raises UserError, which
# main() prints as one line ("error: ...") with exit status 2.
# =============================================================================


# -----------------------------------------------------------------------------
# Images: the formats and mistakes of real folders
#
# People point --data at folders exported from every tool there is: 16-bit and
# float greys, palettes with a transparent index, animated GIFs, JPEGs, hidden
# files, a broken download. Each file is read as RGBA or named in a warning;
# nothing is dropped silently, and a folder with nothing usable is an error.
# -----------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".gif", ".webp", ".bmp"}


def open_rgba(path):
    """Any image Pillow reads -> an RGBA image: the first frame of an animation, 16-bit and
    float greys scaled rather than clipped, a palette's transparency honoured."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as img:
            img.seek(0)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(img, np.float64)
                if img.mode != "F":
                    a = a / 257
                elif a.max() <= 1:
                    a = a * 255
                img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
            img = img.convert("RGBA")
    for w in caught:  # e.g. Pillow's decompression-bomb warning, which does not name the file
        warnings.warn(f"{path}: {w.message}")
    return img


def image_files(folder):
    """The image files under `folder`, sorted, hidden ones left out; other files are
    named in a warning (JPEG with a hint), and a folder without images is an error."""
    if not folder.is_dir():
        raise UserError(f"data folder '{folder}' does not exist or is not a folder")
    images, skipped = [], {}
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not path.is_file() or hidden:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.setdefault(path.suffix.lower() or "(no suffix)", []).append(path)
    for suffix, paths in skipped.items():
        hint = "; JPEG blurs pixel art, export PNG instead" if suffix in (".jpg", ".jpeg") else ""
        warnings.warn(f"skipped {len(paths)} {suffix} file(s) such as {paths[0]}: only PNG, GIF, "
                      f"WebP and BMP are read{hint}")
    if not images:
        raise UserError(f"data folder '{folder}' contains no PNG, GIF, WebP or BMP images")
    return images


def read_or_warn(path, size):
    """load_rgba, or None and a warning naming the file if it cannot be read."""
    try:
        return load_rgba(path, size)
    except Exception as e:  # PIL raises many types for broken files
        warnings.warn(f"skipping unreadable image {path}: {e}")
        return None


def check_loaded(folder, arrays, names):
    """An error if nothing could be read; a warning for images that are nearly empty."""
    if not arrays:
        raise UserError(f"none of the images in '{folder}' could be read")
    empty = [n for n, a in zip(names, arrays) if (a[..., 3::4] > 0).mean() < 0.01]
    if empty:
        warnings.warn(f"{len(empty)} image(s) such as {folder / empty[0]} are nearly empty (under "
                      "1% opaque) after loading; a very wide or tall image shrinks to a sliver "
                      "when padded to a square")


# -----------------------------------------------------------------------------
# Sheets and characters: how V views of one character are found on disk
#
# Two layouts give `train --views V` its characters (section 1 stacks their views):
#
# * Character folders: one folder per character holding exactly V images, its views
#   in name order (0_front.png, 1_left.png, 2_back.png, 3_right.png for V = 4).
#   Character folders may sit in class folders: turnarounds/orc/c00012/0_front.png.
# * Sprite sheets, with --cell WxH: every image is a sheet cut into WxH cells, and
#   fully transparent cells are skipped. Game sheets put directions in rows and
#   animation frames in columns, so the rows go in blocks of V: in each block,
#   column j holds one character's V views, top to bottom, and every frame column
#   is one example. Without --views, every non-empty cell is one sprite.
#
# Views are stacked in the order found, so all characters must list their views in
# the same order; V = 4 in the order front, left, back, right is the one that
# training mirrors (section 7). A sheet that does not divide into cells, or a
# character missing a view, is an error, never a silent skip: a character with a
# view missing would teach the network a blank view.
# -----------------------------------------------------------------------------


def parse_cell(text):
    """'WxH' -> (W, H) in pixels, or one sentence."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise UserError(f"--cell must be WIDTHxHEIGHT in pixels, such as 18x20, got {text!r}")
    return int(w), int(h)


def sheet_cells(path, name, cell):
    """A sprite sheet -> its cells, a list of rows of RGBA images; one sentence when it does
    not divide into cells, None and a warning when it cannot be read."""
    try:
        img = open_rgba(path)
    except Exception as e:  # PIL raises many types for broken files
        warnings.warn(f"skipping unreadable sheet {path}: {e}")
        return None
    w, h = cell
    if img.width % w or img.height % h:
        raise UserError(f"sheet '{name}' is {img.width}x{img.height} pixels, which does not "
                        f"divide into {w}x{h} cells (--cell)")
    return [[img.crop((x, y, x + w, y + h)) for x in range(0, img.width, w)]
            for y in range(0, img.height, h)]


def sheet_characters(rows, name, views):
    """The characters of one sheet's cells: {example name: its V cells}, column j of each
    block of V rows being one character; fully transparent columns are skipped."""
    if len(rows) % views:
        raise UserError(f"sheet '{name}' has {len(rows)} rows of cells, which do not group "
                        f"into characters of {views} rows (--views {views})")
    found = {}
    for top in range(0, len(rows), views):
        for j in range(len(rows[0])):
            cells = [rows[top + k][j] for k in range(views)]
            drawn = sum(c.getchannel("A").getbbox() is not None for c in cells)
            if drawn and drawn < views:
                raise UserError(f"the character in column {j + 1}, rows {top + 1}-{top + views} "
                                f"of sheet '{name}' has {drawn} of its {views} views; the "
                                "others are empty cells")
            if drawn:
                found[f"{name}#r{top:02d}c{j:02d}"] = cells
    return found


def load_sheets(folder, cell, views=1, size=128, labels=True):
    """Every sheet under `folder`, cut into cells (see above) -> load_folder's four values,
    one example per character of V views (channels 4k..4k+3: view k)."""
    folder = Path(folder)
    arrays, names = [], []
    for path in image_files(folder):
        name = path.relative_to(folder).as_posix()
        rows = sheet_cells(path, name, parse_cell(cell) if isinstance(cell, str) else cell)
        for example, cells in ({} if rows is None else sheet_characters(rows, name, views)).items():
            arrays.append(np.concatenate([square_rgba(c, size) for c in cells], -1))
            names.append(example)
    if not arrays:
        raise UserError(f"the sheets in '{folder}' hold no cell with a visible pixel")
    check_loaded(folder, arrays, names)
    return stack_and_label(folder, arrays, names, labels, "sheets")


def load_characters(folder, views, size=128, labels=True):
    """A folder of character folders (see above) -> load_folder's four values, one example
    per character folder, its V views stacked in name order."""
    folder = Path(folder)
    by_character = {}
    for path in image_files(folder):
        if path.parent == folder:
            raise UserError(f"'{path.name}' sits directly in '{folder}'; with --views {views} "
                            "each character's views go in a folder of their own")
        by_character.setdefault(path.parent.relative_to(folder).as_posix(), []).append(path)
    arrays = []
    for name, paths in by_character.items():
        views_read = [a for a in (read_or_warn(p, size) for p in paths) if a is not None]
        if len(views_read) != views:
            raise UserError(f"character folder '{name}' holds {len(views_read)} readable "
                            f"image(s), but --views {views} needs exactly {views}, its views "
                            "in name order")
        arrays.append(np.concatenate(views_read, -1))  # (size, size, 4V)
    names = list(by_character)
    check_loaded(folder, arrays, names)
    return stack_and_label(folder, arrays, names, labels, "character folders")


def load_examples(folder, views=1, cell="", size=128, labels=True):
    """The training examples under `folder` in whichever layout the flags name: single
    sprites, character folders (--views) or sheets (--cell)."""
    if cell:
        return load_sheets(folder, cell, views, size, labels)
    if views > 1:
        return load_characters(folder, views, size, labels)
    return load_folder(folder, size, labels)


# -----------------------------------------------------------------------------
# Training data: the split, the grid, classes too thin to learn, processes
#
# The validation split must not move when files are added (a resumed run would
# validate on sprites it trained on), so it hashes names instead of shuffling.
# The pixel grid must survive a few stray images, or one photo turns snapping
# off for the whole run. A checkpoint remembers its data folder, classes and a
# fingerprint of the file list, so --resume cannot quietly train on other data.
# -----------------------------------------------------------------------------

FEW_SPRITES = 8  # a class with fewer training sprites than this gets a warning


def split_train_val(names, val_fraction, y=None):
    """(train indices, validation indices). A file is held out when the hash of its name,
    read as a number in [0, 1), is below val_fraction: unlike a seeded shuffle, every sprite
    keeps its side when files are added later. With classes y, the split is made within
    each class, and a class never gives up its last training sprite."""
    u = [zlib.crc32(name.encode()) / 2**32 for name in names]
    groups = [list(range(len(names)))] if y is None else [
        [i for i in range(len(names)) if y[i] == k] for k in sorted(set(y.tolist()))]
    val = []
    for group in groups:
        held = [i for i in group if u[i] < val_fraction]
        if len(held) == len(group):
            held.remove(max(held, key=u.__getitem__))  # keep one sprite to train on
        val += held
    if not val and len(names) > 1 and val_fraction > 0:  # tiny folders still hold out one,
        spare = [i for i in range(len(names)) if y is None or (y == y[i]).sum() > 1]
        val = [min(spare, key=u.__getitem__)] if spare else []  # never a class's only sprite
    train = sorted(set(range(len(names))) - set(val))
    train = torch.tensor(train or val, dtype=torch.long)
    return train, torch.tensor(sorted(val), dtype=torch.long) if val else train


def own_grid(x_uint8):
    """(N,) the largest k in 8, 4, 2 for which each image (N, 4, H, W) is made of k x k
    blocks of one colour; 1 for an image with none."""
    grid = torch.ones(len(x_uint8), dtype=torch.long)
    for k in (2, 4, 8):
        corner = x_uint8[:, :, ::k, ::k].repeat_interleave(k, 2).repeat_interleave(k, 3)
        grid[(x_uint8 == corner).flatten(1).all(1)] = k
    return grid


def detect_grid(x_uint8, names=None, share=0.9):
    """The data's pixel grid: the largest k that at least `share` of the images are drawn
    on. A few stray images (a photo, a hand-resized sprite) do not turn the grid off; the
    images off the chosen grid are named in a warning, since samples are snapped to it."""
    grids = own_grid(x_uint8)
    names = names or [str(i) for i in range(len(grids))]
    on = {g: (grids % g == 0).float().mean() for g in (8, 4, 2, 1)}  # the share drawn on g
    k = max(g for g in on if on[g] >= share)
    off = [names[i] for i in range(len(grids)) if grids[i] % k]
    if off:
        warnings.warn(f"{len(off)} of {len(grids)} images are not drawn on the {k}-pixel grid of "
                      f"the rest, such as {', '.join(off[:3])}; samples are snapped to {k}")
    majority = max(g for g in on if on[g] > 0.5)
    if majority > k:
        finer = [names[i] for i in range(len(grids)) if grids[i] % majority]
        warnings.warn(f"most images are drawn on a {majority}-pixel grid, but {len(finer)} are not "
                      f"(such as {', '.join(finer[:3])}), so the grid falls back to {k}")
    return k


@dataclasses.dataclass
class TrainingData:
    """The sprites a run trains on, and what a checkpoint must remember about them."""
    train_x: torch.Tensor  # (N_train / world, 4V, 128, 128) uint8, on the device
    train_y: torch.Tensor  # (N_train / world,) class indices, or None
    val_x: torch.Tensor  # (N_val, 4V, 128, 128) uint8, on the CPU, at most 512
    val_y: torch.Tensor  # (N_val,) or None
    classes: list  # class names, [] without classes
    class_counts: list  # training sprites per class
    grid: int  # the art's pixel block size k; samples are snapped to it
    path: str  # the data folder, resolved
    fingerprint: str  # a hash of the file list: --resume refuses other files
    n_files: int
    palette: torch.Tensor  # (K, 3) uint8: the training sprites' colours, or K of them
    group_centres: torch.Tensor = None  # (C, D) thumbnails of the groups standing for classes


def load_training_data(cfg, ckpt, rank, world, device):
    """The data folder as TrainingData: checked against a resumed run, split into training
    and validation sprites within each class, one shard per process under torchrun."""
    default = "data/turnarounds" if cfg.views > 1 else "data/images"
    path = str(Path(cfg.data or default).resolve())
    x, names, classes, y = load_examples(path, cfg.views, cfg.cell, labels=cfg.labels)
    fingerprint = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    if ckpt and ckpt.get("fingerprint", fingerprint) != fingerprint and not cfg.allow_new_data:
        raise UserError(f"the files in '{path}' changed since this run started; add "
                        "--allow-new-data to go on with them")
    if ckpt:
        grid = ckpt["grid"]
    else:
        grid = detect_grid(x, names) if cfg.grid == "auto" else int(cfg.grid)
    train_idx, val_idx = split_train_val(names, cfg.val_fraction, y)
    centres = ckpt.get("group_centres") if ckpt else None
    n_groups = min(cfg.groups, len(train_idx) // FEW_SPRITES)  # no group of a sprite or two
    if not classes and (n_groups > 1 or centres is not None):  # a flat folder's own groups
        y, classes, centres = data_groups(x, train_idx, n_groups, centres)
    if ckpt and classes != ckpt["classes"]:
        raise UserError(f"this run has the classes [{', '.join(ckpt['classes'])}] but the data "
                        f"has [{', '.join(classes)}]")
    counts = [int((y[train_idx] == k).sum()) for k in range(len(classes))]
    thin = [f"{c} ({n})" for c, n in zip(classes, counts) if n < FEW_SPRITES]
    if thin and rank == 0 and centres is None:
        warnings.warn(f"few training sprites in class {', '.join(thin)}: sample --class for it "
                      "will mostly show the other classes")
    shard = train_idx[rank::world]
    palette = ckpt.get("palette") if ckpt else None  # an older run gets one on resume
    if palette is None:
        palette = data_palette(split_views(x[train_idx]), grid)  # every view's colours
    return TrainingData(x[shard].to(device), None if y is None else y[shard].to(device),
                        x[val_idx][:512], None if y is None else y[val_idx][:512], classes,
                        counts, grid, path, fingerprint, len(names), palette, centres)


def thumbnails(x_uint8, size=8):
    """Examples uint8 (N, 4V, 128, 128) -> (N, 4V size^2): each view's colour, premultiplied
    by alpha, and its alpha, averaged over size x size cells: where the colours are."""
    parts = []
    for chunk in x_uint8.split(256):  # a float copy of every sprite at once would be large
        views = chunk.float().unflatten(1, (-1, 4)) / 255  # (n, V, 4, 128, 128)
        rgba = torch.cat([views[:, :, :3] * views[:, :, 3:], views[:, :, 3:]], 2)
        parts.append(F.adaptive_avg_pool2d(rgba.flatten(1, 2), size).flatten(1))
    return torch.cat(parts)


def data_groups(x_uint8, train_idx, k, centres=None):
    """Labels (N,), names and centres (C, D) of the data's own groups (section 5): k-means
    on the training examples' thumbnails, empty groups dropped, the largest first; each
    example goes to its nearest centre. Given centres (a resumed run) are kept."""
    features = thumbnails(x_uint8)  # (N, D)
    if centres is None:
        centres = kmeans(features[train_idx], torch.ones(len(train_idx)), k)
        sizes = torch.bincount(torch.cdist(features[train_idx], centres).argmin(1),
                               minlength=len(centres))
        order = sizes.argsort(descending=True, stable=True)
        centres = centres[order[sizes[order] > 0]]
    y = torch.cdist(features, centres).argmin(1)  # (N,)
    names = [f"group{i + 1}" for i in range(len(centres))]
    return y, names, centres


# -----------------------------------------------------------------------------
# Config, devices and processes
#
# TrainConfig is the single list of training options: argparse builds train's
# flags from it and a checkpoint stores it, so the help text, the defaults and
# a resumed run cannot disagree. Bad values are refused before any work starts,
# an explicitly asked device must exist, and under torchrun every process must
# leave the loop at the same step and end with the same weights.
# -----------------------------------------------------------------------------

DEFAULT_MINUTES = 30.0  # the budget when a run names none
DEVICES = ("auto", "cpu", "cuda", "mps")


def run_progress(step, seconds, cfg):
    """How much of its budget (steps, minutes or both) the run has used: 0 -> 1."""
    by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
    by_time = seconds / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
    return min(1.0, max(by_steps, by_time))


def option(default, help, choices=None):
    """A config field that also carries its --help text (and allowed values) for argparse."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    # Where and how long.
    data: str = option("", "folder of sprites; subfolders are classes (default: data/images, "
                           "with --views: data/turnarounds)")
    cell: str = option("", "read every image as a sprite sheet of WxH-pixel cells, e.g. 18x20; "
                           "fully transparent cells are skipped")
    views: int = option(1, "views per character: V stacked images (character folders, or V "
                           "rows of a sheet's cells); V = 4 in the order front, left, back, "
                           "right mirrors correctly, other V > 1 are never flipped")
    run_dir: str = option("", "output folder (default: a new folder under runs/)")
    resume: bool = option(False, "continue the run in --run-dir from its newest checkpoint")
    allow_new_data: bool = option(False, "let --resume go on with other data or a changed file set")
    max_minutes: float = option(0.0, "time budget in minutes, counted across resumes "
                                     f"(with neither budget: {DEFAULT_MINUTES:g})")
    max_steps: int = option(0, "budget in optimizer steps, counted across resumes; 0 = none")
    # The recipe.
    batch_size: int = option(32, "sprites per step (per process under torchrun)")
    lr: float = option(1e-3, "AdamW learning rate after the warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup: int = option(200, "steps of linear LR warm-up")
    cooldown: float = option(0.2, "share of the budget at its end over which the LR falls "
                                  "linearly to 0; the state before it is kept as stable.pt, "
                                  "where --resume with a larger budget continues")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    schedule: str = option("linear", "noise schedule (alpha_t, beta_t)", SCHEDULES)
    target: str = option("data", "what the network predicts: the clean sprite or the velocity",
                         TARGETS)
    t_shift: float = option(4.0, "shift s of the training times, t -> t / (t + s (1 - t))")
    weight_cap: float = option(3.0, "cap on the x-prediction loss weight 1/(1-t)^2; 0 = no cap")
    chroma: float = option(CHROMA, "scale b of the two chroma axes the flow works in: below 1 "
                                   "hues are decided after light and shade (0.25: fewer colours "
                                   "per sprite); 1 = plain RGB")
    channels: str = option("32,64,128", "U-Net widths per level, comma-separated")
    blocks: int = option(2, "residual blocks per level")
    unshuffle: int = option(0, "pixel-unshuffle factor; 0 = 4 on CPU, 2 on GPU", (0, 1, 2, 4))
    flip: bool = option(True, "random horizontal flips")
    labels: bool = option(True, "classes from subfolders; --no-labels trains one model for all")
    label_dropout: float = option(0.1, "share of steps without the class (for guidance)")
    groups: int = option(16, "for data without classes: train on this many groups of "
                             "similar sprites as classes (at most one per 8 sprites); 0 = off")
    guide: str = option("auto", "keep an early EMA snapshot for sample --guidance with no "
                                "classes (auto: when there are no classes)", ("auto", "on", "off"))
    guide_fraction: float = option(0.125, "share of the budget after which the guide is taken")
    grid: str = option("auto", "pixel-art block size that samples snap to",
                       ("auto", "1", "2", "4", "8"))
    # Bookkeeping.
    val_fraction: float = option(0.05, "share of sprites held out for validation")
    log_every: int = option(25, "steps between CSV rows")
    val_every: int = option(250, "steps between validation + checkpoint")
    sample_every: int = option(500, "steps between sample grids")
    sample_steps: int = option(30, "solver steps for the sample grids (sample's default solver)")
    seed: int = option(0, "random seed (runs are reproducible)")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", DEVICES)
    bf16: bool = option(None, "bf16 autocast (default: where a timed probe finds it faster)")
    compile: bool = option(False, "torch.compile the model")


POSITIVE = {"views", "batch_size", "lr", "grad_clip", "t_shift", "blocks", "log_every", "val_every",
            "sample_every", "sample_steps", "warmup", "guide_fraction", "chroma"}


def check_number(flag, value, positive):
    """A finite number, and positive or at least non-negative; else one sentence."""
    if not math.isfinite(value) or value < 0 or (value == 0 and positive):
        kind = "positive" if positive else "non-negative"
        raise UserError(f"{flag} must be a {kind} finite number, got {value}")


def check_config(cfg):
    """Reject bad values with one sentence each, before any work starts."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            allowed = ", ".join(map(str, f.metadata["choices"]))
            raise UserError(f"{flag} must be one of {allowed}, got {value!r}")
        if f.type in (int, float):
            check_number(flag, value, positive=f.name in POSITIVE)
    if max(cfg.val_fraction, cfg.label_dropout, cfg.cooldown) >= 1 or cfg.guide_fraction > 1:
        raise UserError("--val-fraction, --label-dropout and --cooldown must be below 1, "
                        "--guide-fraction at most 1")
    if cfg.resume and not cfg.run_dir:
        raise UserError("--resume needs --run-dir to say which run to continue")
    if cfg.views > 16:
        raise UserError(f"--views must be at most 16, got {cfg.views}")
    if cfg.cell:
        parse_cell(cfg.cell)
    try:
        widths = [int(c) for c in cfg.channels.split(",")]
    except ValueError:
        raise UserError(f"--channels must be comma-separated numbers, got {cfg.channels!r}")
    if any(c <= 0 or c % 8 for c in widths) or len(widths) > 4:
        raise UserError("--channels needs at most 4 widths, each a positive multiple of 8")


def pick_device(name):
    """'auto' takes the fastest device present (cuda, then mps, then cpu); an explicit
    name must exist."""
    mps = getattr(torch.backends, "mps", None)
    present = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()),
               "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in present.items() if ok))
    if not present[name]:
        raise UserError(f"--device {name} was asked for but no {name.upper()} device is available")
    return torch.device(name)


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


def wrap(model, world, device, compile_model):
    """What the training step calls: the model, wrapped by DDP (which all-reduces the
    gradients in backward) under torchrun, and by torch.compile when asked."""
    net = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(net) if compile_model else net


def any_rank(flag, device):
    """True if `flag` holds on any process: all must leave the loop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_ranks_in_sync(model, world):
    """DDP keeps the replicas identical by averaging gradients; verify it (the element-wise
    max and min of the weights over all processes must coincide), then leave the group."""
    if world == 1:
        return
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().float()
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    same = torch.equal(hi, lo)
    dist.barrier()  # no process leaves the group while another still reads from it
    dist.destroy_process_group()
    if not same:
        raise UserError(f"the {world} processes ended with different weights; DDP lost sync")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights identical across {world} processes", file=sys.stderr)


# -----------------------------------------------------------------------------
# bf16: where the hardware makes it pay
#
# bf16 halves the memory traffic of convolutions and keeps fp32's exponent
# range, so unlike fp16 it needs no loss scaling; autocast keeps the weights,
# the optimizer and the loss in fp32. CPUs with bf16 dot-product instructions
# (avx512_bf16, amx_bf16, ARM bf16) can be faster in bf16 than in fp32; CPUs
# without them emulate it, ~50x slower. We read the flags, then time a small
# step each way: the flags say whether bf16 can be fast, the probe whether it is
# on this machine and build of PyTorch. Sampling does not time anything: it
# keeps the precision its run trained in (fp32 where the CPU lacks the flags),
# because a timing can change from one call to the next and a seed must give
# the same sprites every time.
# -----------------------------------------------------------------------------

BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 and AMX, ARM


def autocast(device, bf16):
    """bf16 autocast when asked for (Part II decides where it pays); else a no-op."""
    on = bool(bf16) and device.type in ("cuda", "cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def cpu_has_bf16():
    """Does /proc/cpuinfo list bf16 dot-product instructions? (False where there is none.)"""
    try:
        return bool(set(Path("/proc/cpuinfo").read_text().split()) & BF16_FLAGS)
    except OSError:
        return False


def probe_ms(model, device, bf16, batch):
    """Milliseconds of one forward and backward pass on a batch, the best of two after a
    warm-up."""
    shape = (batch, 4 * getattr(model, "views", 1), 128, 128)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 0.5, device=device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with autocast(device, bf16):
            loss = model(x, t).float().square().mean()
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return 1000 * min(times[1:])


def no_fast_bf16(device):
    """Why bf16 cannot pay on this device (mps, or a CPU without bf16 instructions), or None."""
    if device.type == "mps":
        return "mps"
    if device.type == "cpu" and not cpu_has_bf16():
        return "this CPU lists no bf16 instructions"
    return None


def decide_bf16(asked, device, model=None, ckpt=None, batch=8):
    """(use bf16?, why): --bf16/--no-bf16 if given; fp32 where bf16 cannot pay (emulated bf16
    is many times slower); with a checkpoint (a resumed run, or sampling) the precision the
    run trained in, untimed, so that a seed always draws the same sprites; for a new run a
    probe of a training step each way, on a GPU at the batch that will run."""
    if asked is not None:
        return asked, "as asked"
    why_not = no_fast_bf16(device)
    if why_not:
        return False, why_not
    if ckpt is not None:
        return bool(ckpt["bf16"]), "as the run trained"
    if device.type == "cpu":
        batch = 8  # a CPU's speed per sprite hardly depends on the batch
    fp32 = probe_ms(model, device, False, batch)
    bf16 = probe_ms(model, device, True, batch)
    return bf16 < 0.9 * fp32, f"a probe step took {bf16:.0f} ms in bf16, {fp32:.0f} ms in fp32"


# -----------------------------------------------------------------------------
# Signals, the run folder and checkpoints: nothing lost, nothing silent
#
# * Ctrl-C, SIGTERM and SIGHUP (schedulers, `timeout`, shutdowns) ask the loop
#   to stop; it saves last.pt and exits with 128 + the signal's number (130,
#   143, 129), as a shell does, so a script can tell an interrupted run from a
#   finished one (exit 0). A second Ctrl-C stops at once. A signal during
#   start-up ends the run there, in one line, and leaves no empty run folder.
# * A lock file (flock, which the OS releases when a process dies, so a killed
#   run leaves no stale lock) lets one process at a time write a run folder.
# * Checkpoints go to a temporary file that is renamed over the old one, last.pt
#   before best.pt, so a crash at any moment leaves the newest complete state.
#   A write that fails (a full disk) removes its temporary file and ends the run
#   in one sentence; the previous checkpoint stays. They hold only tensors,
#   numbers and strings (torch.load(weights_only=True)).
# * A checkpoint remembers its data folder and a fingerprint of its file list;
#   --resume refuses other data unless --allow-new-data says it is meant.
# -----------------------------------------------------------------------------


class Interrupted(Exception):
    """A run stopped by a signal, after saving: main() exits with 128 + signum."""

    def __init__(self, folder, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.folder, self.signum = folder, signum


class StopSignals:
    """Within `with`, SIGINT, SIGTERM and SIGHUP set .asked (and .signum) instead of killing
    the process; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.asked, self.signum, self.previous = False, None, {}

    def handle(self, signum, frame):
        if self.asked and signum == signal.SIGINT == self.signum:
            raise KeyboardInterrupt
        self.asked, self.signum = True, signum

    def __enter__(self):
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):  # Windows has no SIGHUP
                self.previous[name] = signal.signal(getattr(signal, name), self.handle)
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def during_start_up(self, folder):
        """Called once start-up is done: a signal that came during it stops the run here."""
        if self.asked:
            raise Interrupted(folder, self.signum)


@contextlib.contextmanager
def open_run_folder(cfg, rank):
    """The run folder (a new dated one by default), locked for this process; on the way
    out the lock is released, and a folder this run created but never wrote is removed."""
    if rank != 0:
        yield Path(cfg.run_dir)  # under torchrun the first process holds the lock
        return
    path, fd, created = claim_run_dir(cfg)
    try:
        yield path
    finally:
        os.close(fd)  # releases the flock
        if created and [p.name for p in path.iterdir()] in ([], ["lock"]):
            (path / "lock").unlink(missing_ok=True)
            path.rmdir()  # nothing was written: leave no empty run behind


def claim_run_dir(cfg):
    """The run folder and its lock: run_dir/lock holds the PID of the one process allowed
    to write there. Returns (folder, lock fd, whether this call created the folder)."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        candidates = [base] + [Path(f"{base}-{k}") for k in range(1, 1000)]
        run_dir = next(p for p in candidates if not p.exists())
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.run_dir))  # without exist_ok: atomic claim
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create or write the run folder '{run_dir}': {e.strerror or e}")
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"'{run_dir}' is being written by another training process (pid "
                            f"{pid}); wait for it or pick another --run-dir")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    for stale in run_dir.glob("*.tmp"):  # left by a process killed mid-save
        stale.unlink()
    return run_dir, fd, created


def resume_point(folder, cfg):
    """(checkpoint or None, the config to train with): on --resume, the newest complete
    checkpoint of the folder and its recipe with this command's budget; else the config
    with its run folder and budget filled in."""
    cfg = dataclasses.replace(cfg, run_dir=str(folder))
    ckpt = None
    saved = [p for p in (folder / "last.pt", folder / "best.pt") if p.exists()]
    if saved and not cfg.resume:
        raise UserError(f"'{folder}' already holds a checkpoint; add --resume to continue it "
                        "or pick another --run-dir")
    if cfg.resume and not saved:
        raise UserError(f"'{folder}' holds no checkpoint to resume (last.pt or best.pt)")
    if cfg.resume:
        found = [read_checkpoint(p) for p in saved]
        ckpt = max(found, key=lambda c: c["step"])  # a crash can leave best.pt newer, or alone
        if ckpt is not found[0] or saved[0].name != "last.pt":
            print(f"resuming from best.pt (step {ckpt['step']}), the newest complete "
                  "checkpoint", file=sys.stderr)
        ckpt = before_cool_down(folder, cfg, ckpt)
        cfg = resumed_config(cfg, ckpt)
    if not (cfg.max_steps or cfg.max_minutes):  # neither budget: the default one
        cfg = dataclasses.replace(cfg, max_minutes=DEFAULT_MINUTES)
    return ckpt, cfg


def before_cool_down(folder, cfg, ckpt):
    """A new budget moves the cool-down, so a run resumed with one continues from
    stable.pt, the state before the old budget's cool-down, when it got that far."""
    old = ckpt["config"]
    new_budget = (cfg.max_steps, cfg.max_minutes) != (old["max_steps"], old["max_minutes"])
    given = cfg.max_steps or cfg.max_minutes
    path = folder / "stable.pt"
    if not (given and new_budget and old.get("cooldown") and path.exists()):
        return ckpt
    stable = read_checkpoint(path)
    if stable["step"] >= ckpt["step"]:
        return ckpt
    print(f"resuming from stable.pt (step {stable['step']}), the state before the cool-down "
          "of the old budget", file=sys.stderr)
    return stable


def resumed_config(cfg, ckpt):
    """The recipe comes from the checkpoint; the budget (when given), and other data when
    --allow-new-data says so, from this command line."""
    moved = cfg.data and "data" in ckpt and Path(cfg.data).resolve() != Path(ckpt["data"])
    if moved and not cfg.allow_new_data:
        raise UserError(f"this run trained on '{ckpt['data']}', not '{cfg.data}'; leave out "
                        "--data, or add --allow-new-data")
    budget = {}
    if cfg.max_steps or cfg.max_minutes:
        budget = {"max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes}
    return dataclasses.replace(stored_config(ckpt), resume=True, run_dir=cfg.run_dir,
                               data=cfg.data or ckpt.get("data", ""),
                               allow_new_data=cfg.allow_new_data, bf16=cfg.bf16, **budget)


def checkpoint_state(cfg, state, data, bf16):
    """Everything needed to continue exactly, and to sample: weights, EMA, optimizer
    moments, step, training time, RNG, config, classes, pixel grid, data identity, palette."""
    ckpt = {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.opt.state_dict(), "step": state.step, "seconds": state.seconds,
            "best_val": state.best_val, "skipped": state.skipped,
            "rng": state.gen.get_state().cpu(), "config": dataclasses.asdict(cfg),
            "unshuffle": state.model.stem[0].downscale_factor, "classes": data.classes,
            "class_counts": data.class_counts, "grid": data.grid, "bf16": bf16,
            "data": data.path, "fingerprint": data.fingerprint, "palette": data.palette,
            "group_centres": data.group_centres}
    if state.guide is not None:
        ckpt["guide"] = state.guide.state_dict()
    return ckpt


def restore(state, ckpt, cfg, rank):
    """Put a checkpoint's weights, EMA, optimizer, counters and RNG into a fresh state."""
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["optimizer"])
    state.step, state.seconds = ckpt["step"], ckpt["seconds"]
    state.best_val, state.skipped = ckpt["best_val"], ckpt["skipped"]
    if rank == 0:
        state.gen.set_state(ckpt["rng"])
    else:  # only the first process's stream is saved; the others restart from the step
        state.gen.manual_seed(cfg.seed * 1000 + rank + 7919 * state.step)
    if "guide" in ckpt:
        state.guide = copy.deepcopy(state.ema)
        state.guide.load_state_dict(ckpt["guide"])


def assert_finite(path, *state_dicts):
    """Refuse weights that are not finite: a diverged run must not be saved or sampled."""
    for sd in state_dicts:
        for v in sd.values():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise UserError(f"'{path}' would hold non-finite weights (the run diverged); use "
                                "an earlier checkpoint or a lower --lr")


def write_atomically(path, write, what="file"):
    """Call write(tmp) on a temporary name beside `path`, then rename it over `path`: a crash
    leaves the old file whole, and a failed write (a full disk; torch.save raises
    RuntimeError there) removes the temporary file and ends in one sentence."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or "the disk may be full"
        kept = "; the previous checkpoint, if any, is unchanged" if what == "checkpoint" else ""
        raise UserError(f"cannot write {what} '{path}' ({why}){kept}")


def save_checkpoint(path, ckpt):
    """A finite checkpoint to `path`, written atomically."""
    assert_finite(path, ckpt["model"], ckpt["ema"])
    write_atomically(path, lambda tmp: torch.save(ckpt, tmp), "checkpoint")


# What a run made before an option existed did, where the option's default changed since.
OLDER_RUNS = {"groups": 0}  # no groups


def stored_config(ckpt):
    """The TrainConfig a checkpoint was trained with."""
    return TrainConfig(**{**OLDER_RUNS, **ckpt["config"]})


def read_checkpoint(path):
    """Load and check a checkpoint; any failure becomes one sentence."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint '{path}' is a folder; give a file such as {path / 'last.pt'}")
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        TrainConfig(**ckpt["config"])  # an older version's options fail here
        complete = {"model", "ema", "step", "unshuffle", "grid"} <= ckpt.keys()
    except Exception:  # torch.load raises many types for a damaged file
        complete = False
    if not complete:
        raise UserError(f"checkpoint '{path}' is corrupt or not a SpriteFlow checkpoint of this "
                        "version")
    return ckpt


def load_models(path, device="cpu"):
    """(model, guide or None, checkpoint) ready to sample: the EMA weights, and the
    autoguidance guide if the run kept one."""
    ckpt = read_checkpoint(path)
    cfg = dataclasses.replace(stored_config(ckpt), unshuffle=ckpt["unshuffle"])
    nets = [(build_model(cfg, device, len(ckpt["classes"])), ckpt["ema"])]
    if "guide" in ckpt:
        nets.append((build_model(cfg, device, len(ckpt["classes"])), ckpt["guide"]))
    for net, weights in nets:
        assert_finite(path, weights)
        try:
            net.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f"checkpoint '{path}' does not match the model its config describes")
        net.to(device).eval()
    return nets[0][0], nets[1][0] if len(nets) > 1 else None, ckpt


def diverged(cfg, state, lr, what):
    """The sentence a diverged run ends with."""
    last = Path(cfg.run_dir) / "last.pt"
    kept = "no checkpoint was written"
    if last.exists():
        kept = f"the last good checkpoint is {last} (step {read_checkpoint(last)['step']})"
    return (f"training diverged at step {state.step}: {what} at lr {lr:.2g}; {kept}; "
            f"try a lower --lr than {cfg.lr:g}")


# -----------------------------------------------------------------------------
# The training log: a CSV row every log_every steps, a progress line, and
# training_log.png (the losses on a log scale) redrawn at every checkpoint
#
# A run that says nothing for 30 minutes gets killed, and a loss curve is the
# first thing to look at when samples disappoint, so the run prints its data,
# device and budget up front, then progress with an honest ETA. The CSV keeps
# the loss per fifth of the time axis (where the flow is hard to learn) and the
# speed of the training steps alone. On resume the CSV keeps its rows up to the
# checkpoint, so a crash does not leave rows the run is about to redo. The plot
# needs only Pillow: no matplotlib to install for one chart.
# -----------------------------------------------------------------------------

T_BUCKETS = 5  # the CSV splits the loss by fifths of the time axis: where is the flow hard?
LOG_COLUMNS = (["step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "val_loss"]
               + [f"loss_t{k}" for k in range(T_BUCKETS)] + ["minutes", "skipped"])


class TrainingLog:
    """training_log.csv (kept on resume, minus rows past the checkpoint), the progress
    line on stderr, the plot, the sample grids and the run's first and last words."""

    def __init__(self, folder, cfg, data, state, world, bf16, bf16_why):
        self.folder, self.cfg, self.world, self.bf16 = folder, cfg, world, bf16
        path, rows = folder / "training_log.csv", []
        if cfg.resume and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and r[0].isdigit()]  # not the header
            rows = [r for r in rows if int(r[0]) <= state.step]
        try:
            self.file = open(path, "w", newline="")
            self.csv = csv.writer(self.file)
            self.csv.writerows([LOG_COLUMNS] + rows)
        except OSError as e:
            raise UserError(f"cannot write to the run folder '{folder}': {e.strerror or e}")
        self.sums = torch.zeros(2 * T_BUCKETS + 2, device=data.train_x.device)
        self.steps, self.clock, self.elapsed = 0, time.time(), None
        progress = run_progress(state.step, state.seconds, cfg)  # the LR of the step before
        self.lr = lr_at(max(state.step - 1, 0), cfg.lr, cfg.warmup, progress, cfg.cooldown)
        self.start_step, self.started = state.step, time.time()
        self.saved_at = state.step if cfg.resume else None  # the newest checkpoint's step
        self.n_train = max(len(data.train_x) * world, 1)
        print(start_line(folder, cfg, data, state, world, bf16, bf16_why), file=sys.stderr)

    def add(self, t, per_sample, grad_norm, lr):
        """Running sums, kept on the device until a row: per-fifth losses, loss, grad norm."""
        self.lr = lr  # the last step's
        bucket = (t * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
        self.sums[:T_BUCKETS].index_add_(0, bucket, per_sample.float())
        self.sums[T_BUCKETS:2 * T_BUCKETS].index_add_(0, bucket, torch.ones_like(t))
        self.sums[-2] += per_sample.float().mean()
        self.sums[-1] += grad_norm.float()
        self.steps += 1

    def keep_stable(self, state, data):
        """stable.pt: the state before the cool-down, where --resume with a larger budget
        continues (resume_point)."""
        ckpt = checkpoint_state(self.cfg, state, data, self.bf16)
        save_checkpoint(self.folder / "stable.pt", ckpt)

    def stop_clock(self):
        """The training time of the steps since the last row (validation is not counted)."""
        self.elapsed = time.time() - self.clock

    def row(self, state, lr, val=None):
        """A CSV row and a progress line for the steps since the last row; the plot after
        a validation. Restarts the clock."""
        cfg, n = self.cfg, max(self.steps, 1)
        sums = self.sums.tolist()
        img_s = self.steps * cfg.batch_size * self.world / max(self.elapsed or 0, 1e-9)
        pairs = zip(sums[:T_BUCKETS], sums[T_BUCKETS:-2])  # (loss sum, count) per fifth
        buckets = [f"{a / k:.5f}" if k else "" for a, k in pairs]
        epoch = state.step * cfg.batch_size * self.world / self.n_train
        minutes = state.seconds / 60
        # A row with no steps since the last one (the final validation of a run that
        # stopped just after a row) carries the validation alone, never a made-up 0 loss.
        loss = grad = speed = ""
        if self.steps:
            loss, grad, speed = f"{sums[-2] / n:.5f}", f"{sums[-1] / n:.4f}", f"{img_s:.2f}"
        row = [state.step, f"{epoch:.3f}", loss, f"{lr:.3e}", grad, speed,
               "" if val is None else f"{val:.5f}", *buckets, f"{minutes:.2f}", state.skipped]
        try:
            self.csv.writerow(row)
            self.file.flush()
        except OSError as e:
            raise UserError(f"cannot write the training log in '{self.folder}': {e.strerror or e}")
        pace = (time.time() - self.started) / 60 / max(state.step - self.start_step, 1)
        end = "\r" if sys.stderr.isatty() else "\n"
        said = f"loss {sums[-2] / n:.4f} lr {lr:.1e} {img_s:.1f} img/s"
        if not self.steps:  # only finish() writes such a row, and it carries a validation
            said = f"val loss {val:.5f}"
        print(f"{progress_text(state.step, minutes, pace, cfg)} {said}", end=end,
              file=sys.stderr, flush=True)
        if val is not None:
            self.saved_at = state.step  # validate_and_save wrote a checkpoint with it
            plot_training_log(self.folder)
        self.sums.zero_()
        self.steps, self.clock = 0, time.time()

    def sample_grid(self, ema, data, step):
        """16 sprites from fixed noises, sorted by class, whole characters in each row (16 / V
        characters of V views): samples/step_NNNNNNN.png."""
        views = self.cfg.views
        n = max(1, 16 // views)
        labels = class_plan(n, data.classes, data.class_counts) if data.classes else None
        noise = gaussian_noise(n, self.cfg.seed + 12345, views)
        solver = Solver(steps=self.cfg.sample_steps)
        sprites = generate(ema, noise, labels, 1.0, None, solver, data.grid, self.bf16)
        (self.folder / "samples").mkdir(exist_ok=True)
        cols = views * max(1, 4 // views)
        save_png(sprite_sheet(sprites, cols), self.folder / "samples" / f"step_{step:07d}.png")

    def finish(self, state, data, reason):
        """The last row with validation and checkpoint, then the run's last words."""
        if self.saved_at != state.step:  # the steps since the last checkpoint are saved too
            self.stop_clock()
            self.row(state, self.lr, validate_and_save(self.cfg, state, data, self.bf16, self.lr))
        self.file.close()
        skipped = f"; {state.skipped} steps skipped, loss not finite" if state.skipped else ""
        print(f"\n{reason} at step {state.step} after {state.seconds / 60:.1f} min; checkpoints "
              f"in {self.folder} (best val loss {state.best_val:.5f}{skipped})", file=sys.stderr)


def start_line(folder, cfg, data, state, world, bf16, why):
    """What the run trains on and how, in one line."""
    if data.classes:
        counts = ", ".join(f"{c} {n}" for c, n in zip(data.classes, data.class_counts))
        classes = f"; classes (training sprites) {counts}"
    else:
        classes = ", no classes"
    params = sum(p.numel() for p in state.model.parameters()) / 1e6
    device = f"{data.train_x.device}{' x' + str(world) if world > 1 else ''}"
    n_train = sum(data.class_counts) if data.classes else len(data.train_x) * world
    what = "sprites" if cfg.views == 1 else f"characters of {cfg.views} views"
    cool = f", LR cooling down over the last {cfg.cooldown:.0%}" if cfg.cooldown else ""
    return (f"{data.n_files} {what} ({n_train} train, {len(data.val_x)} val) from {data.path}"
            f"{classes}; pixel grid {data.grid}; {params:.1f}M parameters; device {device}; "
            f"bf16 {'on' if bf16 else 'off'} ({why}); budget {budget_text(cfg)}{cool}; "
            f"run folder {folder}")


def budget_text(cfg):
    """'4000 steps', '30 min' or both."""
    parts = []
    if cfg.max_steps:
        parts.append(f"{cfg.max_steps} steps")
    if cfg.max_minutes:
        parts.append(f"{cfg.max_minutes:g} min")
    return " and ".join(parts)


def progress_text(step, minutes, pace, cfg):
    """'step S (M min; budget B, eta E min)': the ETA uses this process's pace (minutes
    per step) for a step budget, and never runs past the time budget."""
    etas = []
    if cfg.max_steps:
        etas.append((cfg.max_steps - step) * pace)
    if cfg.max_minutes:
        etas.append(cfg.max_minutes - minutes)
    eta = max(min(etas), 0) if etas else 0
    return f"step {step} ({minutes:.1f} min; budget {budget_text(cfg)}, eta {eta:.0f} min)"


def plot_training_log(folder):
    """training_log.csv -> training_log.png: every loss column against the step, on a log
    scale, drawn with Pillow alone. A plot that cannot be drawn is skipped, not fatal."""
    with open(folder / "training_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    series = {}
    for name in ["loss"] + [f"loss_t{k}" for k in range(T_BUCKETS)] + ["val_loss"]:
        points = [(float(r["step"]), float(r[name])) for r in rows if r.get(name)]
        points = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
        if points:
            series[name] = points
    if not series:
        return
    try:
        save_png(draw_log_chart(series, str(folder)), folder / "training_log.png")
    except UserError as e:  # save_png's sentence: the file and why
        warnings.warn(f"{e}; the plot is skipped")


def draw_log_chart(series, title):
    """A line chart of {name: [(x, y), ...]} with a log-scale y axis; a lone point is a dot."""
    (W, H), (left, right, top, bottom) = (900, 560), (70, 170, 30, 50)
    img = Image.new("RGB", (W, H), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [math.log10(y) for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = math.floor(min(ys) * 4) / 4, math.ceil(max(ys) * 4) / 4 + 0.25

    def px(x, y):
        u = (x - x0) / (x1 - x0)
        v = (math.log10(y) - y0) / (y1 - y0)
        return left + u * (W - left - right), H - bottom - v * (H - top - bottom)

    for k in range(math.floor(y0), math.ceil(y1) + 1):  # decades and their 2x, 5x lines
        for m in (1, 2, 5):
            if y0 <= math.log10(m * 10.0**k) <= y1:
                y = px(x0, m * 10.0**k)[1]
                shade = (190, 190, 190) if m == 1 else (225, 225, 225)
                draw.line([(left, y), (W - right, y)], fill=shade)
                draw.text((5, y - 6), f"{m * 10.0**k:g}", fill="black", font=font)
    for x in sorted({round(v) for v in np.linspace(x0, x1, 6)}):
        draw.text((px(x, 10**y0)[0] - 10, H - bottom + 8), f"{x}", fill="black", font=font)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text((left, 8), f"{title}  (log scale; x: step)", fill="black", font=font)
    colors = [(31, 119, 180), (230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0),
              (204, 121, 167), (200, 0, 0)]
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        points = [px(x, y) for x, y in pts]
        draw.line(points, fill=color, width=3 if name in ("loss", "val_loss") else 1)
        if len(points) < 3:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 16 * i + 6
        draw.line([(W - right + 10, legend_y), (W - right + 30, legend_y)], fill=color, width=3)
        draw.text((W - right + 36, top + 16 * i), name, fill="black", font=font)
    return img


# -----------------------------------------------------------------------------
# Palettes: the data's, the artist's files, and a colour budget per sprite
#
# `train` counts the opaque colours of its training sprites, one pixel per
# k x k block (the art's own pixels; a stray off-grid image adds no invented
# block means), and keeps a palette in the checkpoint: every colour when there
# are at most PALETTE_SIZE, otherwise PALETTE_SIZE of them found by k-means in
# OKLab weighted by how often each colour is drawn, each centre then replaced
# by the nearest colour the data really uses. K = 128: an art pixel of the
# built-in set (443 colours) then lies on average 0.009 OKLab units from its
# palette colour, under half of a just-noticeable difference (about 0.02),
# and real sets A (17 colours) and B (125) keep every colour; at K = 64 the
# built-in set's error is 0.019 and 8 % of its pixels move by more than 0.05
# (lab record, "Palettes").
# `sample --palette FILE` reads the formats artists exchange: GIMP .gpl,
# Lospec .hex (RRGGBB lines), Paint.NET .txt (AARRGGBB, ';' comments), JASC
# .pal, or an image whose distinct opaque colours are the palette. `--colours
# N` picks at most N colours for each sprite by the same weighted k-means over
# its own pixels, snapped to the palette when there is one.
# -----------------------------------------------------------------------------

PALETTE_SIZE = 128  # K: colours kept from a training set that uses more (lab record, "Palettes")
PALETTE_LAM = 1.0  # the pull of the projection inside the flow: 1 = hard
MAX_PALETTE = 256  # the most colours a palette file may hold
PALETTE_FILES = {".gpl", ".hex", ".txt", ".pal"}


def colour_counts(x_uint8, grid=1):
    """The distinct opaque colours of sprites (N, 4, H, W), one pixel per grid x grid block:
    (uint8 (M, 3), their pixel counts (M,))."""
    x = x_uint8[:, :, ::grid, ::grid]
    rgb = x[:, :3].permute(0, 2, 3, 1)[x[:, 3] > 0].long()  # (P, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    values, counts = torch.unique(packed, return_counts=True)
    colours = torch.stack([values >> 16, (values >> 8) & 255, values & 255], 1)
    return colours.to(torch.uint8), counts


def kmeans(points, weights, k, iters=30):
    """Weighted k-means: k centres (k, D) for points (M, D) with weights (M,), seeded by
    k-means++ (each new centre drawn with probability ~ weight x squared distance) from a
    fixed generator, so the same points always give the same centres."""
    gen = torch.Generator().manual_seed(0)
    centres = points[torch.multinomial(weights, 1, generator=gen)]  # (1, D)
    nearest = torch.cdist(points, centres)[:, 0] ** 2  # (M,)
    for _ in range(k - 1):
        p = weights * nearest
        if p.sum() <= 0:  # fewer distinct points than k
            break
        new = points[torch.multinomial(p, 1, generator=gen)]
        centres = torch.cat([centres, new])
        nearest = torch.minimum(nearest, torch.cdist(points, new)[:, 0] ** 2)
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points * weights[:, None])
        mass = torch.zeros(len(centres)).index_add_(0, assign, weights)[:, None]
        centres = torch.where(mass > 0, sums / mass.clamp(min=1e-12), centres)
    return centres


def representative_colours(colours, counts, k, candidates=None):
    """At most k colours, taken from candidates uint8 (C, 3) (default: the colours
    themselves), that stand for colours uint8 (M, 3) drawn counts (M,) times: all of them
    when M <= k, else the weighted k-means centres in OKLab, each snapped to its nearest
    candidate."""
    candidates = colours if candidates is None else candidates
    if len(colours) <= k:
        return candidates[nearest_colour(colours.float() / 127.5 - 1, candidates).unique()]
    centres = kmeans(oklab(colours.float() / 127.5 - 1), counts.float(), k)
    chosen = torch.cdist(centres, oklab(candidates.float() / 127.5 - 1)).argmin(1)
    return candidates[chosen.unique()]


def data_palette(x_uint8, grid):
    """The palette a checkpoint keeps: uint8 (K, 3) for training sprites (N, 4, H, W)."""
    colours, counts = colour_counts(x_uint8, grid)
    if len(colours) == 0:
        return colours
    return representative_colours(colours, counts, PALETTE_SIZE)


def limit_colours(sprites, n, colours=None):
    """uint8 sprites (B, H, W, 4) -> each with at most n opaque colours, chosen for it (from
    the palette `colours` when given) and every opaque pixel mapped to the nearest."""
    out = []
    for sprite in sprites:
        own, counts = colour_counts(sprite.permute(2, 0, 1)[None])
        if len(own) > n:
            chosen = representative_colours(own, counts, n, colours)  # (<= n, 3)
            sprite = palette_pixels(sprite[None], chosen)[0]
        out.append(sprite)
    return torch.stack(out)


def palette_line_error(path, number, line, expected):
    """The one sentence for a line of a palette file that does not parse."""
    return UserError(f"palette file '{path}' line {number}: expected {expected}, got "
                     f"{line.strip()[:40]!r}")


def parse_gpl(lines, path):
    """GIMP .gpl: 'GIMP Palette', then 'R G B [name]' lines among Name:, Columns: and #."""
    if not lines or lines[0].strip() != "GIMP Palette":
        raise UserError(f"palette file '{path}' does not start with 'GIMP Palette'")
    colours = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip() or line.lstrip().startswith("#") or line.split(":")[0] in (
                "Name", "Columns"):
            continue
        colours.append(rgb_numbers(line.split()[:3], path, number, line))
    return colours


def rgb_numbers(words, path, number, line):
    """Three words that are integers 0-255 -> [r, g, b], or one sentence."""
    if len(words) == 3 and all(w.isdigit() and int(w) <= 255 for w in words):
        return [int(w) for w in words]
    raise palette_line_error(path, number, line, "three numbers 0-255 (R G B)")


def parse_hex(lines, path):
    """Lospec .hex (RRGGBB per line) and Paint.NET .txt (AARRGGBB, ';' comments); an
    optional '#'; Paint.NET's fully transparent entries are left out."""
    colours = []
    for number, line in enumerate(lines, 1):
        word = line.split(";")[0].strip().lstrip("#")
        if not word:
            continue
        if len(word) not in (6, 8) or any(ch not in "0123456789abcdefABCDEF" for ch in word):
            raise palette_line_error(path, number, line, "RRGGBB or AARRGGBB hex digits")
        if len(word) == 8 and word[:2] == "00":
            continue
        colours.append([int(word[i:i + 2], 16) for i in range(len(word) - 6, len(word), 2)])
    return colours


def parse_jasc(lines, path):
    """JASC .pal: 'JASC-PAL', '0100', the count, then that many 'R G B' lines."""
    lines = [line for line in lines if line.strip()]
    if len(lines) < 3 or lines[0].strip() != "JASC-PAL" or lines[1].strip() != "0100":
        raise UserError(f"palette file '{path}' is not a JASC-PAL file (it must start with "
                        "the lines JASC-PAL and 0100)")
    if not lines[2].strip().isdigit() or int(lines[2]) != len(lines) - 3:
        raise UserError(f"palette file '{path}' says it holds {lines[2].strip()!r} colours but "
                        f"lists {len(lines) - 3}")
    return [rgb_numbers(line.split(), path, k, line) for k, line in enumerate(lines[3:], 4)]


def image_palette(path):
    """The distinct opaque colours of an image file, as [[r, g, b], ...]."""
    try:
        rgba = np.asarray(open_rgba(path))
    except Exception as e:  # PIL raises many types for broken files
        raise UserError(f"cannot read palette image '{path}': {e}")
    return np.unique(rgba[rgba[..., 3] > 0][:, :3], axis=0).tolist()


def read_palette(path):
    """A palette file or image -> uint8 (K, 3), its distinct colours in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PALETTE_FILES | IMAGE_SUFFIXES:
        raise UserError(f"palette '{path}' is not a palette file (.gpl, .hex, .txt, .pal) or an "
                        "image (.png, .gif, .webp, .bmp), nor 'data' or 'none'")
    if not path.is_file():
        raise UserError(f"palette file '{path}' does not exist")
    if suffix in IMAGE_SUFFIXES:
        colours = image_palette(path)
    else:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
        parse = {".gpl": parse_gpl, ".pal": parse_jasc}.get(suffix, parse_hex)
        colours = parse(lines, path)
    colours = list(dict.fromkeys(map(tuple, colours)))  # duplicates out, order kept
    if not colours:
        raise UserError(f"palette file '{path}' holds no colours")
    if len(colours) > MAX_PALETTE:
        raise UserError(f"palette '{path}' has {len(colours)} colours; a palette may hold at "
                        f"most {MAX_PALETTE}")
    return torch.tensor(colours, dtype=torch.uint8)


def sampling_palette(name, ckpt):
    """--palette data|none|FILE -> (uint8 (K, 3) or None, the words for the summary line).
    None (not given) and 'given' (the --views-from sprite's colours, applied there) are none."""
    if name in (None, "none", "given"):
        return None, ""
    if name != "data":
        colours = read_palette(name)
        return colours, f", palette {Path(name).name} ({len(colours)} colours)"
    if "palette" not in ckpt or len(ckpt["palette"]) == 0:
        raise UserError("this checkpoint keeps no palette (it was trained before palettes were "
                        "saved, or on sprites with no opaque pixel); give a palette file instead")
    return ckpt["palette"], f", palette of the data ({len(ckpt['palette'])} colours)"


# -----------------------------------------------------------------------------
# What sampling writes
#
# grid.png is for looking (a checkerboard shows what is transparent, one row
# per class); sheet.png and sheet.json are for using: a transparent sheet with
# every frame's place in TexturePacker's JSON-array layout, which Phaser, PixiJS
# and Aseprite read as it is (Godot and Unity slice the sheet by its cell size,
# 128x128); sprite_NNN.png are the sprites themselves. Every file is written
# to a temporary name and renamed, so a full disk leaves no half-written file.
# Output folders are never overwritten: one that holds files gets a sibling
# OUT-2, OUT-3, ...
# -----------------------------------------------------------------------------


def save_png(image, path):
    """A PIL image to `path`, written atomically."""
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def save_gif(frames, path, ms_per_frame):
    """PIL images as an endlessly looping GIF at `path`, written atomically."""
    save = lambda tmp: frames[0].save(tmp, format="GIF", save_all=True,  # noqa: E731
                                      append_images=frames[1:], duration=ms_per_frame, loop=0)
    write_atomically(path, save)


def sprite_sheet(images, cols=None, scale=1, checker=8):
    """uint8 (N, H, W, 4) -> one RGB image on a grey checkerboard of `checker`-pixel squares
    (shows transparency), or with checker=0 the sprites themselves on a transparent RGBA sheet."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    size = (cols * w, math.ceil(n / cols) * h)
    sheet = Image.new("RGBA", size)  # all zero: transparent
    if checker:
        yy, xx = np.mgrid[: size[1], : size[0]]
        board = np.where(((yy // checker) + (xx // checker)) % 2 == 0, 208, 232).astype(np.uint8)
        sheet = Image.fromarray(board).convert("RGB")
    for i, img in enumerate(images.numpy() if torch.is_tensor(images) else images):
        tile = Image.fromarray(img, "RGBA")
        sheet.paste(tile, ((i % cols) * w, (i // cols) * h), tile if checker else None)
    if scale > 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    return sheet


def sheet_layout(n, names):
    """Where each of n sprites goes: a list of (index or None for an empty cell), and the
    number of columns. With class names, each class starts a new row."""
    if not names:
        return list(range(n)), math.ceil(math.sqrt(n))
    rows = [[i for i in range(n) if names[i] == c] for c in dict.fromkeys(names)]
    cols = max(len(row) for row in rows)
    cells = []
    for row in rows:
        cells += row + [None] * (cols - len(row))
    return cells, cols


def sprite_name(i, views=1):
    """The file of sprite i: sprite_NNN.png, or with V views sprite_NNN_vK.png for view K of
    character NNN."""
    return f"sprite_{i:03d}.png" if views == 1 else f"sprite_{i // views:03d}_v{i % views}.png"


def texture_packer_json(cells, cols, h, w, names, views=1):
    """sheet.json in TexturePacker's JSON-array layout, plus a `class` field per frame (names
    holds one per character) and, with V views, `character` and `view` fields."""
    frames = []
    for k, i in enumerate(cells):
        if i is None:
            continue
        rect = {"x": k % cols * w, "y": k // cols * h, "w": w, "h": h}
        frame = {"filename": sprite_name(i, views), "frame": rect, "rotated": False,
                 "trimmed": False, "spriteSourceSize": {"x": 0, "y": 0, "w": w, "h": h},
                 "sourceSize": {"w": w, "h": h}}
        if names:
            frame["class"] = names[i // views]
        if views > 1:
            frame["character"], frame["view"] = i // views, i % views
        frames.append(frame)
    rows = math.ceil(len(cells) / cols)
    meta = {"app": "SpriteFlow", "version": "1.0", "image": "sheet.png", "format": "RGBA8888",
            "size": {"w": cols * w, "h": rows * h}, "scale": "1"}
    return {"frames": frames, "meta": meta}


def write_sprites(out, sprites, names=None, native=0, views=1):
    """sprite_NNN.png; grid.png (checkerboard) and sheet.png + sheet.json (transparent, for
    game engines), one row per class; with native = k, the sprites at 1/k size in native/.
    With V views, sprites holds V per character (generate's order), names one per character,
    and every character is one row of its V views, sprite_NNN_vK.png."""
    for i, sprite in enumerate(sprites):
        save_png(Image.fromarray(sprite.numpy(), "RGBA"), out / sprite_name(i, views))
        if native:
            (out / "native").mkdir(exist_ok=True)
            small = Image.fromarray(sprite[::native, ::native].numpy(), "RGBA")
            save_png(small, out / "native" / sprite_name(i, views))
    if views > 1:
        cells, cols = list(range(len(sprites))), views
    else:
        cells, cols = sheet_layout(len(sprites), names)
    blank = torch.zeros_like(sprites[0])
    tiles = torch.stack([blank if i is None else sprites[i] for i in cells])  # (cells, H, W, 4)
    save_png(sprite_sheet(tiles, cols), out / "grid.png")
    save_png(sprite_sheet(tiles, cols, checker=0), out / "sheet.png")
    h, w = sprites.shape[1:3]
    sheet_json = json.dumps(texture_packer_json(cells, cols, h, w, names, views), indent=1)
    write_atomically(out / "sheet.json", lambda tmp: tmp.write_text(sheet_json))


@torch.no_grad()
def write_trajectory(model, noise, labels, guidance, guide, solver, bf16, out):
    """trajectory.gif and .png of the first sprites flowing from noise to data. Each row is
    one time t: on the left the state x_t, on the right the guess z_hat(x_t, t) that steered
    the solver there (guided, with its class), which shows when a sprite is decided."""
    x = noise[:4].to(next(model.parameters()).device)
    c = None if labels is None else labels[:4].to(x.device)
    clean = guided_clean(model, c, guidance, guide, bf16)
    if solver.palette is not None:  # the guesses as the solver saw them, projected
        clean = held_to_palette(clean, solver.palette)
        solver = dataclasses.replace(solver, palette=None)
    frames = [x]
    integrate(clean, x, solver, model.schedule, frames)
    ts, rows = time_grid(solver.steps), []
    for i in sorted({round(k * solver.steps / 8) for k in range(9)}):
        z_hat = from_flow(clean(frames[i], at(frames[i], ts[i])), model.chroma)
        x_t = from_flow(frames[i], model.chroma)
        state = to_uint8(x_t, binary_alpha=(i == solver.steps))
        rows.append(torch.cat([state, to_uint8(z_hat, binary_alpha=False)]))
    sheets = [sprite_sheet(row, 2 * len(x)) for row in rows]
    save_gif(sheets + [sheets[-1]] * 3, out / "trajectory.gif", 300)  # a pause at the end
    save_png(sprite_sheet(torch.cat(rows), 2 * len(x)), out / "trajectory.png")


def fresh_folder(path):
    """`path`, or path-2, path-3, ... if it already holds files: output never overwrites."""
    candidates = [Path(path)] + [Path(f"{path}-{k}") for k in range(2, 10000)]
    for out in candidates:
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"cannot write to '{out}': {e.strerror or e}")
    return out


# -----------------------------------------------------------------------------
# The sampling commands: sample, invert, interpolate
#
# Each reads one checkpoint and writes one fresh folder, and ends with a line
# that says what it did and how (solver, network calls, guidance, grid, bf16),
# so a picture can always be traced back to its settings. Defaults follow the
# checkpoint: guidance where it has classes, its own pixel grid; a flag that
# cannot apply to it (--class without classes, --edit without --mask) is
# refused in one sentence rather than ignored.
# -----------------------------------------------------------------------------

CFG_GUIDANCE = 2.0  # classifier-free guidance's default w (lab record, "Guidance on real art")
DEFAULT_SAMPLER, DEFAULT_STEPS = "multistep", 30  # sample's defaults; fid.py samples the same way


def class_plan(n, classes, counts, wanted=None):
    """Labels (n,) for n samples, sorted by class: spread over `wanted` class names
    evenly, or over all classes in proportion to their training counts."""
    if wanted:
        unknown = [w for w in wanted if w not in classes]
        if unknown:
            known = ", ".join(classes)
            raise UserError(f"unknown class '{unknown[0]}'; this checkpoint knows {known}")
        counts = [1 if c in wanted else 0 for c in classes]
    share = [n * k / sum(counts) for k in counts]
    alloc = [int(s) for s in share]
    by_remainder = sorted(range(len(share)), key=lambda i: alloc[i] - share[i])
    for i in by_remainder[: n - sum(alloc)]:
        alloc[i] += 1  # largest remainders first
    labels = [k for k, count in enumerate(alloc) for _ in range(count)]
    return torch.tensor(labels, dtype=torch.long)


def own_group(ckpt, sprite, k, views, n):
    """Labels (n,) for an edit or the missing views of the uint8 sprite (1, 128, 128, 4) in a
    run on a flat folder's own groups: the group whose centre is nearest to it on view k, so
    the network is steered by the group the sprite would have trained in (section 5). None
    for any other run."""
    if ckpt.get("group_centres") is None:
        return None
    thumb = thumbnails(sprite.permute(0, 3, 1, 2))  # (1, 4 * 64)
    centres = ckpt["group_centres"].unflatten(1, (views, -1))[:, k]  # (C, 4 * 64): view k's part
    return torch.cdist(thumb, centres).argmin(1).repeat(n)


def default_guidance(ckpt, labels):
    """sample's default w for these labels (or None): classifier-free guidance with the
    user's classes, else none (w = 1); a flat folder's own groups condition but do not
    guide (section 5)."""
    if labels is None or ckpt.get("group_centres") is not None:
        return 1.0
    return CFG_GUIDANCE


def guidance_text(w, labels, guide, ckpt):
    """What guided the sprites, for the summary line."""
    if w == 1:
        return "guidance 1 (none)"
    if labels is not None:
        groups = ckpt.get("group_centres") is not None  # train --groups
        kind = "the data's own groups" if groups else "classifier-free"
        return f"guidance {w:g} ({kind})"
    return f"guidance {w:g} (autoguidance)" if guide is not None else f"guidance {w:g} (no effect)"


def cmd_sample(args, model, guide, ckpt, device, out):
    """sample: --n sprites (classes spread as in the training set, or --class), guided
    with the default weight for the checkpoint's kind unless --guidance says otherwise."""
    if args.class_names and not ckpt["classes"]:
        raise UserError("this checkpoint was trained without classes, so --class cannot be used")
    wanted = args.class_names.split(",") if args.class_names else None
    labels = None
    conditional_edit = args.edit or args.views_from  # by --class, or the sprite's own group
    if ckpt["classes"] and not (conditional_edit and not wanted):
        labels = class_plan(args.n, ckpt["classes"], ckpt["class_counts"], wanted)
    w = args.guidance if args.guidance is not None else default_guidance(ckpt, labels)
    grid = 1 if args.no_snap else ckpt["grid"]
    views = model.views
    if views > 1 and (args.edit or args.trajectory):
        raise UserError("--edit and --trajectory work on single sprites; this checkpoint draws "
                        f"characters of {views} views (use --views-from to complete a character)")
    colours, palette_text = sampling_palette(args.palette, ckpt)
    held = None
    if colours is not None:
        held = OnPalette(colours, grid, PALETTE_T, PALETTE_LAM, model.chroma)
    solver = Solver(args.sampler, args.steps, args.sigma, args.seed, held)
    if args.edit:
        return cmd_edit(args, model, (guide, labels, w, grid, solver), ckpt, device, out)
    if args.views_from:
        return cmd_views_from(args, model, (guide, labels, w, grid, solver), ckpt, device, out)
    bf16, why = decide_bf16(args.bf16, device, ckpt=ckpt)
    start = time.time()
    noise = gaussian_noise(args.n, args.seed, views)
    sprites = generate(model, noise, labels, w, guide, solver, grid, bf16)
    if args.colours:
        sprites = limit_colours(sprites, args.colours, colours)
        palette_text += f", at most {args.colours} colours per sprite"
    names = None if labels is None else [ckpt["classes"][k] for k in labels]
    write_sprites(out, sprites, names, grid if args.native else 0, views)
    written = "grid.png, sheet.png, sheet.json"
    if args.trajectory:
        write_trajectory(model, noise, labels, w, guide, solver, bf16, out)
        written += ", trajectory.gif, trajectory.png"
    drawn = f"{len(sprites)} sprites" if views == 1 else f"{args.n} characters of {views} views"
    guided = guidance_text(w, labels, guide, ckpt)
    return (f"wrote {drawn}, {written} ({args.sampler}, {args.steps} steps = "
            f"{solver.calls()} network calls per sprite, {guided}, grid {grid}{palette_text}, "
            f"bf16 {'on' if bf16 else 'off'} ({why}), {time.time() - start:.1f} s)")


def read_sprite(path, device, what="sprite"):
    """A sprite file as float (1, 4, 128, 128) in [-1, 1], or one sentence."""
    if not Path(path).is_file():
        raise UserError(f"{what} file '{path}' does not exist")
    try:
        return to_float(torch.from_numpy(load_rgba(path)).permute(2, 0, 1)[None]).to(device)
    except Exception as e:
        raise UserError(f"cannot read {what} '{path}': {e}")


def cmd_edit(args, model, steering, ckpt, device, out):
    """sample --edit SPRITE --mask MASK: --n variations, repainted under the mask only."""
    guide, labels, w, grid, solver = steering
    y = read_sprite(args.edit, device).expand(args.n, -1, -1, -1)
    if labels is None:
        labels = own_group(ckpt, to_uint8(y[:1], binary_alpha=False), 0, 1, args.n)
    mask = read_sprite(args.mask, device, "mask")
    m = ((mask[:, 3:] > 0) & (mask[:, :3].amax(1, keepdim=True) > -0.9)).float()  # (1, 1, H, W)
    if not m.any():
        raise UserError(f"mask '{args.mask}' marks no pixels; paint what to repaint in white (any "
                        "opaque, non-black colour)")
    x = gaussian_noise(args.n, args.seed).to(device)
    c = None if labels is None else labels.to(device)
    y_flow = to_flow(y, model.chroma)
    z = inpaint(guided_clean(model, c, w, guide), model.schedule, y_flow, m, x, solver)
    z = from_flow(z, model.chroma)
    keep = (m[0, 0] == 0).cpu()[None, :, :, None]  # (1, 128, 128, 1)
    repainted = to_uint8(snap_to_grid(z, grid))
    if solver.palette is not None:  # the repainted pixels only: the kept ones stay as given
        repainted = palette_pixels(repainted, solver.palette.colours)
    edited = torch.where(keep, to_uint8(y), repainted)
    names = None
    if labels is not None:
        names = ["original"] + [ckpt["classes"][k] for k in labels]
    write_sprites(out, torch.cat([to_uint8(y[:1]), edited]), names)
    guided = guidance_text(w, labels, guide, ckpt)
    return (f"wrote the sprite (sprite_000.png) and {args.n} variations repainted under "
            f"{args.mask}, grid.png, sheet.png, sheet.json ({guided})")


def cmd_views_from(args, model, steering, ckpt, device, out):
    """sample --views-from SPRITE [--view K]: --n characters whose view K is the sprite, bit
    for bit, and whose other views are drawn by inpainting over views (section 8)."""
    guide, labels, w, grid, solver = steering
    views, k = model.views, args.view
    if views == 1:
        raise UserError("--views-from needs a checkpoint trained with --views; this one draws "
                        "single sprites")
    if k >= views:
        raise UserError(f"--view must be below {views}, this checkpoint's number of views, "
                        f"got {k}")
    y = read_sprite(args.views_from, device)  # (1, 4, 128, 128)
    kept = to_uint8(y, binary_alpha=False)  # (1, 128, 128, 4): the given view, exactly as read
    if labels is None:
        labels = own_group(ckpt, kept, k, views, args.n)
    known = torch.zeros(args.n, 4 * views, 128, 128, device=device)
    known[:, 4 * k:4 * k + 4] = to_flow(y, model.chroma)
    x = gaussian_noise(args.n, args.seed, views).to(device)
    c = None if labels is None else labels.to(device)
    clean = guided_clean(model, c, w, guide)
    z = inpaint(clean, model.schedule, known, view_mask(views, k).to(device), x, solver, True)
    z = from_flow(z, model.chroma)
    sprites = to_uint8(snap_to_grid(split_views(z), grid))  # (n V, 128, 128, 4)
    colours = None if solver.palette is None else solver.palette.colours
    palette_text = ""
    if args.palette in (None, "given"):  # the default: every view in the given view's colours
        colours = colour_counts(kept.permute(0, 3, 1, 2))[0]  # (K, 3)
        palette_text = f", in the given view's {len(colours)} colours"
    if colours is not None and len(colours):
        sprites = palette_pixels(sprites, colours)
    sprites[k::views] = kept
    names = None if labels is None else [ckpt["classes"][i] for i in labels]
    write_sprites(out, sprites, names, views=views)
    return (f"wrote {args.n} characters of {views} views, view {k} from {args.views_from} and "
            f"the other {views - 1} drawn{palette_text}, grid.png, sheet.png, sheet.json "
            f"({guidance_text(w, labels, guide, ckpt)})")


def cmd_invert(args, model, ckpt, device, out):
    """invert SPRITE: sprite -> noise -> sprite, its RMS error, and a picture of the three."""
    z = read_sprite(args.sprite, device)
    velocity = velocity_of(guided_clean(model), model.schedule)
    x0 = invert(velocity, to_flow(z, model.chroma), args.steps)
    back = from_flow(sample_heun(velocity, x0, args.steps), model.chroma)
    back_uint8 = to_uint8(snap_to_grid(back, ckpt["grid"]))
    row = [to_uint8(z), to_uint8(x0 / 3, binary_alpha=False), back_uint8]
    save_png(sprite_sheet(torch.cat(row), 3), out / "roundtrip.png")
    write_atomically(out / "noise.pt", lambda tmp: torch.save(x0.cpu(), tmp))
    error = (back - z).pow(2).mean().sqrt().item()
    return (f"round trip of {args.sprite} ({args.steps} Heun steps each way): RMS error "
            f"{error:.4f} in [-1, 1] units; noise norm {x0.norm().item():.0f} (a Gaussian's: "
            f"{math.sqrt(x0.numel()):.0f}); wrote roundtrip.png (sprite, noise, reconstruction) "
            "and noise.pt")


def cmd_interpolate(args, model, ckpt, device, out):
    """interpolate A B: sprites along the slerp between two noises (of seeds, or of sprites
    by inversion), as a strip and a GIF that goes there and back."""
    velocity = velocity_of(guided_clean(model), model.schedule)
    ends = []
    for end in (args.a, args.b):
        if end.lstrip("-").isdigit():
            ends.append(gaussian_noise(1, int(end)).to(device))
        else:
            z = to_flow(read_sprite(end, device), model.chroma)
            ends.append(invert(velocity, z, args.steps))
    noise = torch.cat([slerp(*ends, float(s)) for s in torch.linspace(0, 1, args.frames)])
    sprites = generate(model, noise, solver=Solver("heun", args.steps), grid=ckpt["grid"])
    save_png(sprite_sheet(sprites, len(sprites)), out / "strip.png")
    frames = [sprite_sheet(sp[None], 1, scale=2) for sp in sprites]
    save_gif(frames + frames[::-1], out / "morph.gif", 120)  # there and back
    return f"wrote strip.png and morph.gif ({len(sprites)} sprites from {args.a} to {args.b})"


# -----------------------------------------------------------------------------
# The benchmark: `python spriteflow.py bench`
#
# Speed figures mean little without the machine, so the bench names the CPU
# (model, family, bf16 flags, the vector kernels PyTorch picked) or the GPU. It
# times full training steps (forward, backward, AdamW, EMA) of the default
# model in fp32 and, where it can pay, bf16; sampling with the default solver
# (multistep, 30 calls) and with Heun 20 (40 calls), unguided; and the
# full-resolution twin (no pixel-unshuffle), to show what the unshuffle buys.
# The last line is JSON.
# -----------------------------------------------------------------------------


def time_train_steps(cfg, device, steps, batch_size, bf16):
    """(images/s of full training steps after one untimed step, the model)."""
    state = new_state(cfg, 0, device)  # seeded: every bench times the same model
    net = torch.compile(state.model) if cfg.compile else state.model
    shape = (batch_size, 4 * cfg.views, 128, 128)
    z = to_float(torch.randint(0, 256, shape, dtype=torch.uint8)).to(device)
    amp, gamma = autocast(device, bf16), ema_gamma(EMA_LENGTH)
    for i in range(steps + 1):
        if i == 1:  # the first step pays for allocation and kernel selection
            sync(device)
            start = time.time()
        train_step(net, state.opt, z, None, cfg, state.gen, amp, 1e-4)
        ema_update(state.ema, state.model, i + 1, gamma)
    sync(device)
    return steps * batch_size / (time.time() - start), state.model


def time_sampling(model, device, n, solver, bf16):
    """Images/s of unguided sampling of n sprites with `solver`."""
    generate(model, gaussian_noise(min(n, 2), 1), solver=Solver(solver.method, 1), bf16=bf16)
    sync(device)
    start = time.time()
    generate(model, gaussian_noise(n, 0), solver=solver, bf16=bf16)
    sync(device)
    return n / (time.time() - start)


def sync(device):
    """Wait for queued GPU work: CUDA runs asynchronously, so timings need this."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device):
    """The GPU's name, or the CPU's model, family, model number and bf16 flags from
    /proc/cpuinfo, and the vector extension PyTorch picked."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first core's entry
        flags = sorted(set(info.get("flags", "").split()) & BF16_FLAGS) or ["none"]
        return (f"{info['model name']}, family {info['cpu family']}, model {info['model']}; "
                f"bf16 flags: {' '.join(flags)}; PyTorch kernels: {capability}")
    except (OSError, KeyError):
        return f"unknown CPU; PyTorch kernels: {capability}"


def cmd_bench(args):
    """bench: the speeds above on this machine, as lines and, last, one JSON line."""
    device = pick_device(args.device)
    cfg = TrainConfig(compile=args.compile)
    batch = args.batch_size
    result = {}
    precisions = [False, True] if device.type == "cuda" or cpu_has_bf16() else [False]
    for bf16 in precisions:
        name = "bf16" if bf16 else "fp32"
        img_s, model = time_train_steps(cfg, device, args.steps, batch, bf16)
        result[f"train_img_s_{name}"] = round(img_s, 2)
        speeds = []
        for solver in (Solver(DEFAULT_SAMPLER, DEFAULT_STEPS), Solver("heun", 20)):
            key = f"sample_img_s_{name}_{solver.method}{solver.steps}"
            result[key] = round(time_sampling(model, device, batch, solver, bf16), 3)
            speeds.append(f"{result[key]} ({solver.method}, {solver.calls()} calls)")
        print(f"{name}: {img_s:.1f} train img/s; sampling img/s: {', '.join(speeds)}; batch "
              f"{batch}", file=sys.stderr)
    full_cfg = dataclasses.replace(cfg, unshuffle=1)
    full = time_train_steps(full_cfg, device, max(1, args.steps // 4), min(batch, 8), False)[0]
    print(f"full resolution (no pixel-unshuffle), fp32: {full:.2f} train img/s", file=sys.stderr)
    use, why = decide_bf16(None, device, model, batch=batch)
    print(f"train would use bf16: {use} ({why})", file=sys.stderr)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource  # POSIX only, and only needed here
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(json.dumps({"device": str(device), "machine": machine_name(device),
                      "threads": torch.get_num_threads(), "batch_size": batch,
                      "params_m": round(params, 2), **result,
                      "full_res_train_img_s": round(full, 3),
                      "peak_mem_mb": round(peak_mb), "bf16_chosen": use, "bf16_why": why}))
    return "bench done"


# -----------------------------------------------------------------------------
# The command line
#
# Every way a command can end maps to an exit status a script can test: 0 done,
# 2 a mistake in the input (one line, "error: ...", argparse's own included),
# 128 + the signal's number for a run stopped and saved by a signal. Warnings
# are one line each, without Python's file and line noise.
# -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_train_flags(p):
    """Every TrainConfig field as a --flag, with its help text and default."""
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), f.type
        text = f.metadata["help"]
        if "default" not in text and f.default not in ("", None):
            text += f" (default: {f.default})"
        how = {"type": kind, "choices": f.metadata["choices"]}
        if kind is bool:
            how = {"action": argparse.BooleanOptionalAction}  # --flip and --no-flip
        p.add_argument(flag, default=f.default, help=text, **how)


def add_sampling_flags(p, name):
    """The flags sample, invert and interpolate share."""
    p.add_argument("--checkpoint", default="", help="checkpoint file (default: the newest .pt "
                                                    "under runs/ in the working directory)")
    steps = DEFAULT_STEPS if name == "sample" else 20
    solver = "--sampler's steps" if name == "sample" else "Heun steps"
    p.add_argument("--steps", type=int, default=steps, help=f"{solver} (default: {steps})")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")
    out = "samples" if name == "sample" else name
    p.add_argument("--out", default=out, help="output folder (default: %(default)s, in the "
                                              "working directory; never overwritten)")


def build_parser():
    """train takes every TrainConfig field as a --flag; the sampling commands share theirs."""
    parser = Parser(prog="spriteflow.py", description="Flow matching for pixel-art sprites.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_flags(sub.add_parser("train", help="train a model"))
    for name, text in [("sample", "draw sprites from a checkpoint"),
                       ("invert", "sprite -> noise -> sprite: the ODE run both ways"),
                       ("interpolate", "morph between two sprites or seeds")]:
        add_sampling_flags(sub.add_parser(name, help=text), name)
    p = sub.choices["interpolate"]
    p.add_argument("a", help="sprite file or integer seed")
    p.add_argument("b", help="sprite file or integer seed")
    p.add_argument("--frames", type=int, default=9, help="sprites along the way, ends included "
                                                         "(at least 2; default: 9)")
    sub.choices["invert"].add_argument("sprite", help="sprite image file")
    p = sub.choices["sample"]
    p.add_argument("--n", type=int, default=16, help="number of sprites, or of characters for a "
                                                     "--views checkpoint (default: 16)")
    p.add_argument("--class", dest="class_names", default="",
                   help="class name or comma list (default: all, as many as in training)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance weight w, 1 = none (default: {CFG_GUIDANCE:g} with classes, "
                        "else 1; with no classes, w > 1 uses the run's early snapshot)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="ODE solver (multistep: one network call a step; heun: two; euler) or "
                        "the SDE (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=1.0, help="SDE noise scale: sigma_t = sigma "
                   "beta_t; larger: flatter, simpler sprites (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--no-snap", action="store_true", help="do not snap to the data's pixel grid")
    p.add_argument("--native", action="store_true",
                   help="also write each sprite at its art's native size into OUT/native")
    p.add_argument("--trajectory", action="store_true",
                   help="also write trajectory.gif/.png: noise (t=0) to sprite (t=1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: the precision the run trained in)")
    p.add_argument("--edit", default="", help="a sprite to repaint in part (needs --mask; "
                                              "--class steers the repaint)")
    p.add_argument("--mask", default="", help="PNG whose opaque, non-black pixels mark what "
                                              "--edit repaints")
    p.add_argument("--views-from", default="", help="a sprite to complete: with a --views "
                   "checkpoint, draw the character's other views, this one kept exactly")
    p.add_argument("--view", type=int, default=0, help="which view --views-from is (default: 0, "
                                                       "front in the built-in order)")
    p.add_argument("--palette", default=None,
                   help="draw every opaque pixel from a palette: 'data' (the training set's), "
                        "'given' (the --views-from sprite's own colours), 'none', or a file: .gpl, "
                        ".hex, .txt (Paint.NET), .pal (JASC) or an image (with --edit, the "
                        "repainted pixels; default: given with --views-from, else none)")
    p.add_argument("--colours", type=int, default=None,
                   help="at most N colours per sprite, chosen for each (from --palette if given)")
    p = sub.add_parser("bench", help="training and sampling speed on this machine")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--steps", type=int, default=8, help="timed training steps (default: 8)")
    p.add_argument("--batch-size", type=int, default=32, help="batch (default: 32, as train)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser


def check_sampling_args(args):
    """Each numeric flag of the sampling commands in range, in one sentence."""
    for name in ("n", "steps", "frames", "sigma", "guidance", "batch_size", "colours"):
        value = getattr(args, name, None)
        if value is None:
            continue
        positive = name not in ("sigma", "guidance")
        check_number("--" + name.replace("_", "-"), value, positive)
    if getattr(args, "frames", 2) < 2:
        raise UserError(f"--frames must be at least 2 (the two ends), got {args.frames}")
    if getattr(args, "edit", "") and not args.mask:
        raise UserError("--edit needs --mask, an image whose opaque, non-black pixels mark what "
                        "to repaint")
    if getattr(args, "edit", "") and args.views_from:
        raise UserError("--edit and --views-from cannot be combined; give one of them")
    if getattr(args, "view", 0) < 0:
        raise UserError(f"--view must be a view number, 0 or more, got {args.view}")
    if getattr(args, "edit", "") and args.colours:
        raise UserError("--colours cannot be used with --edit: its kept pixels keep their colours")
    if getattr(args, "views_from", "") and args.colours:
        raise UserError("--colours cannot be used with --views-from: the given view keeps its "
                        "colours, and the others take them (--palette given, the default)")
    if getattr(args, "palette", None) == "given" and not getattr(args, "views_from", ""):
        raise UserError("--palette given takes the colours of the --views-from sprite; without "
                        "--views-from, use 'data', 'none' or a palette file")


def run_command(args):
    """One sampling command, into a fresh output folder that an error leaves behind empty."""
    device = pick_device(args.device)
    path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    model, guide, ckpt = load_models(path, device)
    if model.views > 1 and args.command != "sample":
        raise UserError(f"{args.command} works on single sprites; this checkpoint draws "
                        f"characters of {model.views} views")
    out = fresh_folder(args.out)
    try:
        if args.command == "sample":
            summary = cmd_sample(args, model, guide, ckpt, device, out)
        elif args.command == "invert":
            summary = cmd_invert(args, model, ckpt, device, out)
        else:
            summary = cmd_interpolate(args, model, ckpt, device, out)
    except BaseException:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an error before anything was written leaves no empty folder
        raise
    print(f"{summary}; in {out}, from {path}")


def main(argv=None):
    """Parse the command line and run one command; returns the exit status: 0 done, 2 a
    user error, 128 + the signal's number for a run stopped (and saved) by a signal."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # one line
    try:
        if args.command == "train":
            fields = dataclasses.fields(TrainConfig)
            train(TrainConfig(**{f.name: getattr(args, f.name) for f in fields}))
            return 0
        check_sampling_args(args)
        if args.command == "bench":
            cmd_bench(args)
        else:
            run_command(args)
    except UserError as e:
        ends_progress = args.command == "train" and sys.stderr.isatty()  # a "\r" line is open
        print(f"\nerror: {e}" if ends_progress else f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        saved = "nothing was written"
        if (e.folder / "last.pt").exists():
            saved = f"saved {e.folder / 'last.pt'}; continue with --run-dir {e.folder} --resume"
        print(f"\n{e}; {saved}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nstopped without saving; a run keeps its last checkpoint", file=sys.stderr)
        return 130
    return 0


def newest_checkpoint():
    """The run under runs/ that wrote a checkpoint last, and its last.pt: the weights a run
    ends with, whether or not the validation loss improved at its last save (best.pt)."""
    found = sorted(Path("runs").rglob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint found under '{Path('runs').resolve()}'; train first (the "
                        "first checkpoint comes at step 250) or pass --checkpoint")
    last = found[-1].parent / "last.pt"
    return last if last.exists() else found[-1]


if __name__ == "__main__":
    sys.exit(main())
