"""SpriteFlow: flow matching for 128x128 RGBA pixel-art characters, in one file.

Read it top to bottom: data -> noise schedules -> Gaussian probability path ->
time-conditioned U-Net -> ODE/SDE samplers -> EMA and LR schedule -> trainer ->
command line. Time runs from t=0 (pure noise) to t=1 (data) everywhere.

    pip install -r requirements.txt
    python spriteflow.py train --data data/images            # CPU is fine
    python spriteflow.py sample                              # newest run, 16 sprites
    python spriteflow.py sample --sampler sde --steps 50 --trajectory
    python spriteflow.py plot                                # loss curves -> PNG
    python spriteflow.py bench                               # speed on this device
    python -m pytest -q                                      # the tests

On a GPU the same command picks CUDA, bf16 autocast and a wider working
resolution by itself; several GPUs (or CPU processes) use torchrun:

    python spriteflow.py train --data data/images --compile
    torchrun --nproc_per_node 4 spriteflow.py train --data data/images
"""

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import resource
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


class UserError(Exception):
    """Bad input from the user: printed as one sentence, never as a traceback."""


# -----------------------------------------------------------------------------
# 1. Data
#
# A sprite is a 128x128 RGBA image. We store the whole set once, decoded, as a
# uint8 tensor of shape (N, 4, 128, 128): 2,000 sprites take 130 MB, which
# fits on any device, so a training step is one random index into memory
# instead of a PNG decode (the original project decoded every file again at
# every step). Converting to floats happens per batch:
#
#     x = byte / 127.5 - 1        so every channel, alpha too, lies in [-1, 1].
#
# Pixel art must stay on its pixel grid, so resizing is nearest-neighbour only:
# bilinear filtering would invent in-between colours and soft edges that no
# sprite has. Non-square images are padded to a square with transparent pixels
# (centred) before resizing, so characters are never stretched. Wherever alpha
# is 0 we set RGB to 0: an invisible pixel's colour is arbitrary (editors leave
# junk there) and the model should not spend capacity learning that junk.
# -----------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".gif", ".webp", ".bmp"}


def load_rgba(path, size=128):
    """Decode one image file into a (size, size, 4) uint8 array (see above)."""
    with Image.open(path) as img:
        img.seek(0)  # first frame of an animated GIF/WebP
        # convert() honours a palette's or a grey/RGB image's transparency key.
        img = img.convert("RGBA")
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    arr = np.array(img, dtype=np.uint8)  # (size, size, 4)
    arr[arr[..., 3] == 0, :3] = 0
    return arr


def load_folder(folder, size=128):
    """Every readable image under `folder` (recursively) -> ((N, 4, size, size) uint8, names).

    An unreadable file among good ones is skipped with one warning naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder '{folder}' does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"data folder '{folder}' contains no PNG, GIF, WebP or BMP images")
    arrays, names = [], []
    for p in paths:
        try:
            arrays.append(load_rgba(p, size))
            names.append(str(p.relative_to(folder)))
        except Exception as e:  # PIL raises many types for broken files
            warnings.warn(f"skipping unreadable image {p}: {e}")
    if not arrays:
        raise UserError(f"none of the {len(paths)} images in '{folder}' could be read")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 4, size, size)
    return x, names


def split_train_val(names, val_fraction):
    """Deterministic split: a file is held out when the hash of its name, read as a
    number in [0, 1), falls below val_fraction.

    Unlike a seeded shuffle, this keeps every sprite on its side of the split
    when files are added to the folder later. Tiny folders still get one
    validation sprite (the one with the smallest hash).
    """
    u = [zlib.crc32(name.encode()) / 2**32 for name in names]
    val = [i for i in range(len(names)) if u[i] < val_fraction]
    if not val and len(names) > 1 and val_fraction > 0:
        val = [min(range(len(names)), key=u.__getitem__)]
    train = sorted(set(range(len(names))) - set(val))
    return torch.tensor(train or val, dtype=torch.long), torch.tensor(val or train, dtype=torch.long)


def to_float(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]: data on the same scale as the N(0, I) noise."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x, binary_alpha=True):
    """float (B, 4, H, W) in about [-1, 1] -> uint8 (B, H, W, 4), ready for PNG.

    Pixel art has binary alpha, so by default alpha is snapped to 0 or 255 and
    transparent pixels get RGB 0, the same convention the loader enforces.
    """
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).cpu().contiguous()  # (B, H, W, 4)
    if binary_alpha:
        alpha = torch.where(x[..., 3] >= 128, 255, 0).to(torch.uint8)
        x[..., 3] = alpha
        x[..., :3] *= (alpha > 0).unsqueeze(-1).to(torch.uint8)
    return x


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
# path did not start at pure noise or end at pure data; here a property test
# checks the four boundary values and the derivatives against autograd.
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
# t for fixed (z, eps) gives the conditional vector field that moves along it:
#
#     u_t(x | z) = d_alpha z + d_beta eps = d_alpha z + (d_beta / beta)(x - alpha z)
#
# and the conditional score is the gradient of the Gaussian's log-density:
#
#     grad log p_t(x | z) = -(x - alpha z) / beta^2
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
# expectations given x), so a trained vector field gives us the score the SDE
# sampler needs, for free. The denominator vanishes as beta -> 0 (t -> 1):
# the data distribution's score is undefined there, which the SDE handles by
# scaling its noise with beta (section 5).
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
# constant (it lies on a low-dimensional set), while the noise part of the
# velocity, d_beta eps, is a full 64-dimensional Gaussian that the network
# must reproduce exactly; its failures show up as colour speckle. Predicting
# the clean sprite instead ("data" or x-prediction) asks only for the
# low-dimensional part, and we turn it back into a velocity by putting
# eps = (x - alpha z_hat) / beta into u_t(x | z):
#
#     u = d_alpha z_hat + d_beta (x - alpha z_hat) / max(beta, BETA_MIN)
#
# The clamp keeps t -> 1 finite. The loss is always measured on velocities,
# so both targets optimise the same flow-matching objective (for x-prediction
# it is an x-loss weighted by (d_alpha - d_beta alpha / beta)^2).

TARGETS = ("velocity", "data")
BETA_MIN = 0.05

# Where along the path is a sprite decided? On the linear path the noise-to-
# signal ratio is beta/alpha = (1-t)/t. But our sprites are 32-px art drawn at
# 4x: each 4x4 block is one colour, and a block averages 16 independent noise
# draws, so at block scale the ratio is only (1-t)/(4t). Silhouette and
# colours are settled at small t, where uniform t spends few training samples.
# The time shift
#
#     t -> t / (t + s (1 - t))        (0 -> 0, 1 -> 1, monotone)
#
# multiplies the ratio (1-t)/t by s, so s = 4 (the block side) shows the
# network the block-level noise levels a native 32-px sprite would see at t.
# We warp the training times with it: the path and its ODE are unchanged,
# only where training effort is spent moves. (The sampler's grid can be warped
# the same way, but measured, a uniform grid samples better; section 5.)


def shift_time(t, s):
    """t -> t / (t + s (1 - t)): multiplies the noise-to-signal ratio (1-t)/t by s."""
    return t / (t + s * (1 - t))


def data_coefficients(t, sched, like):
    """(a, b) with u = a z_hat + b x: the velocity is affine in the predicted sprite,
    a = d_alpha - d_beta alpha / beta and b = d_beta / beta, beta clamped at BETA_MIN."""
    alpha, beta, d_alpha, d_beta = schedule(sched, expand(t, like))
    beta = beta.clamp(min=BETA_MIN)
    return d_alpha - d_beta * alpha / beta, d_beta / beta


def velocity_from_data(z_hat, x, t, sched):
    """Turn a predicted clean sprite into a velocity (see above)."""
    a, b = data_coefficients(t, sched, x)
    return a * z_hat + b * x


def data_from_velocity(u, x, t, sched):
    """The inverse of velocity_from_data: the sprite that velocity u points at."""
    a, b = data_coefficients(t, sched, x)
    return (u - b * x) / a


def velocity_from_output(out, x, t, target, sched):
    """The network's raw output -> the vector field u_theta(x, t)."""
    return out if target == "velocity" else velocity_from_data(out, x, t, sched)


# -----------------------------------------------------------------------------
# 4. Time-conditioned U-Net
#
# u_theta(x, t): an image-to-image network told the time t.
#
# * Time embedding: t is turned into sinusoids sin(1000 t w_k), cos(1000 t w_k)
#   with geometrically spaced frequencies w_k, then an MLP; every residual
#   block turns it into a per-channel scale and shift of its features.
# * Residual blocks normalise with GroupNorm. BatchNorm (the original's choice)
#   normalises with statistics of the whole batch, so one sprite's output
#   would depend on which other sprites share its batch, and training (batch
#   statistics) would differ from sampling (running averages) across the very
#   different noise levels t. GroupNorm looks at one sample only.
#   How many groups matters at these small widths. The customary 32 groups
#   on a 32-channel level is one channel per group: every feature map is
#   reset to mean 0 and variance 1 over the image, which throws away how
#   much of that feature the sprite has overall (how much red, how much
#   outline). 8 groups (4 channels each at 32 wide) keeps the ratios between
#   the channels of a group; at step 500 it halved the validation loss
#   (README, "Normalisation groups").
# * Skip connections carry fine detail from each down level to its up level.
# * Self-attention runs where the feature map is smallest (8x8 by default),
#   where it is cheap and lets the whole character coordinate, e.g. both arms.
# * The output layer starts at zero, so the untrained network predicts u = 0
#   (or z_hat = 0) and early training is stable.
# * Pixel-unshuffle stem: a 128x128x4 image is rearranged losslessly into a
#   32x32x64 tensor (factor 4) before the first convolution, and pixel-shuffle
#   undoes it at the end. Convolutions then touch 16x fewer positions, which
#   is what makes CPU training practical. Pixel art drawn on a coarse grid
#   loses nothing: a 4x4 block of one colour becomes one position.
# -----------------------------------------------------------------------------


def group_norm(channels, groups):
    """GroupNorm with up to `groups` groups: statistics over channel groups of one sample."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, 4 dim). t is scaled by 1000 first so that the slowest of the
    geometric frequencies w_k = 10000^(-k/half) still turns through a useful
    angle as t goes from 0 to 1, and the fastest separates nearby times."""

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
    """x + F(x, t). Time enters as a per-channel scale and shift of the normalised
    features (h -> h (1 + scale_t) + shift_t), so each noise level can re-weight
    every feature map rather than just add a constant to it."""

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

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(t_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention(nn.Module):
    """Every position attends to every other: softmax(Q K^T / sqrt(d)) V per head,
    with queries, keys and values from 1x1 convolutions. Cost grows with the
    square of the number of positions, hence only at the lowest resolution."""

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
    """u_theta(x, t) for x of shape (B, 4, 128, 128) and t of shape (B,).

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

    `target` and `schedule` say what the raw output means (section 3), so a
    loaded checkpoint knows how to turn its output into a velocity.
    """

    def __init__(self, channels=(64, 128, 256), blocks=2, unshuffle=4, target="data", schedule="linear", groups=8):
        super().__init__()
        self.target, self.schedule = target, schedule
        c0, t_dim = channels[0], 4 * channels[0]
        patch = 4 * unshuffle * unshuffle  # channels after pixel-unshuffle
        self.time_embedding = TimeEmbedding(c0)
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

    def forward(self, x, t):
        t_emb = self.time_embedding(t)
        # `skips` collects the stem's output and every down layer's output; the
        # up path consumes them in reverse, so each level meets its own resolution.
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), t_emb) if isinstance(layer, ResBlock) else layer(h)
        return self.head(h)  # (B, 4, 128, 128)

    def velocity(self, x, t):
        return velocity_from_output(self(x, t), x, t, self.target, self.schedule)

    def clean(self, x, t):
        """z_hat(x, t): the sprite the flow is heading for, as the network sees it at t."""
        out = self(x, t)
        return out if self.target == "data" else data_from_velocity(out, x, t, self.schedule)


# -----------------------------------------------------------------------------
# 5. Samplers
#
# Sampling integrates from noise X_0 ~ N(0, I) at t=0 to a sprite at t=1 on
# the grid t_i = shift_time(i/N, s) (section 3), step h_i = t_{i+1} - t_i.
# The default grid is uniform (s = 1), whatever shift the model trained with:
# see the measurements below the equations.
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
# original multiplied and drew uniform noise). We use sigma_t = sigma beta_t:
# the score behaves like 1/beta near t=1, so sigma_t^2 score -> 0 and the last
# steps stay finite, and no noise is injected at the data end.
# -----------------------------------------------------------------------------

# Which sampler, steps and grid? Measured against a 500-step Heun solution
# from the same noise (README, "Sampling"): halving h cuts Heun's error about
# 4x once h is small, and Heun-20 (40 network calls) beat Euler-100. A grid
# warped by the training shift looks natural but samples worse: it takes big
# steps near t=1, where x-prediction's velocity (z_hat - x)/(1-t) changes
# fastest and colour regions are made flat. Default: Heun, 20 uniform steps.

SAMPLERS = ("euler", "heun", "sde")


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
def sample_heun(velocity, x, steps, frames=None, shift=1.0):
    """Heun's method: an Euler predictor, then the average of the slopes at both ends."""
    ts = time_grid(steps, shift)
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

    A larger sigma injects more noise and pulls harder towards high density
    (the Langevin term); any sigma leaves the marginals p_t unchanged in exact
    arithmetic, so it only trades discretisation error against correction."""
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


def autocast(device, cpu_bf16=False):
    """bf16 autocast on CUDA (and on CPU when asked); otherwise a no-op context."""
    on = device.type == "cuda" or (cpu_bf16 and device.type == "cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def generate(model, n, steps=30, sampler="heun", seed=0, device="cpu", batch_size=64, sigma=1.0, frames=None, grid_shift=1.0):
    """n sprites as a uint8 (n, 128, 128, 4) tensor. Noise comes from a CPU generator
    seeded with `seed`, so the same seed gives the same sprites on any device."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}")
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    model.eval()

    def velocity(x, t):
        with autocast(device):
            return model.velocity(x, t).float()

    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn(b, 4, 128, 128, generator=gen).to(device)  # (b, 4, 128, 128), t=0
        keep = frames if start == 0 else None  # frames[i]: the first batch after i steps
        if keep is not None:
            keep.append(x)
        if sampler == "sde":
            noise_gen = torch.Generator(device).manual_seed(seed + 1 + start)
            x = sample_sde(velocity, x, steps, model.schedule, sigma, generator=noise_gen, frames=keep, shift=grid_shift)
        else:
            x = {"euler": sample_euler, "heun": sample_heun}[sampler](velocity, x, steps, keep, grid_shift)
        out.append(to_uint8(x))
    return torch.cat(out)


# -----------------------------------------------------------------------------
# 6. Training helpers: EMA, learning-rate schedule
#
# EMA: sampling uses an exponential moving average of the weights,
#     theta_ema <- d theta_ema + (1 - d) theta,
# which averages out the noise of the last steps of SGD. A fixed d = 0.999
# remembers ~1000 steps, so early on it would be dominated by the random
# initialisation; the warm-up d_k = min(d, (1 + k) / (10 + k)) lets the
# average track the model closely at first and slow down as training goes.
#
# The average's memory is about 1 / (1 - d) steps: its half-life at
# d = 0.999 is ln 2 / 0.001 = 693 steps.
#
# LR: linear warm-up from 0 for `warmup` steps (Adam's second-moment estimates
# are poor at the start), then cosine decay to `min_lr_ratio` of the peak at
# max_steps. The LR is a pure function of the step, so resuming a run only
# needs the step count to restore the schedule exactly.
# -----------------------------------------------------------------------------


def ema_decay(step, max_decay):
    """0.1 at step 0, 0.5 at step 8, 0.9 at step 80, then capped at max_decay."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema_model, model, step, max_decay):
    d = ema_decay(step, max_decay)
    ema_params, params = list(ema_model.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - d)
    return d


def lr_at(step, base_lr, warmup, max_steps, min_lr_ratio=0.1):
    """The learning rate at `step`: linear warm-up, then cosine down to min_lr_ratio * base_lr."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# 7. Trainer
#
# One training step, for a batch of sprites z:
#     t   ~ p(t)            uniform or logit-normal, then shift_time (section 3)
#     eps ~ N(0, I)
#     x_t = alpha_t z + beta_t eps
#     L   = || u_theta(x_t, t) - u_t(x_t | z) ||^2
# Logit-normal puts more samples at middle times, where the prediction is
# hardest (at t near 0 the answer is roughly the data mean, near 1 it can be
# read off x_t); the per-t-bucket losses in the CSV show this.
#
# With x-prediction the velocity loss is an x-loss in disguise:
#     || u(z_hat) - u(z) ||^2 = w(t) || z_hat - z ||^2,
#     w(t) = (d_alpha - d_beta alpha / beta)^2   (= 1/(1-t)^2 on the linear path)
# w is 1 at t=0, 100 at t=0.9 and 400 at the BETA_MIN clamp. Near t=1 the task
# is nearly trivial (z is almost x), yet those few samples carry most of the
# gradient, and Adam's per-parameter step sizes shrink to fit their spikes,
# which slows learning everywhere else. Capping w at weight_cap lets the middle
# of the path, where a sprite's colours are decided, learn much faster.
#
# The validation metric is the uncapped loss on the held-out sprites at FIXED
# seeds for t (uniform, whatever the training p(t)) and eps, so it changes
# only when the weights change and can be compared across steps and runs.
# It is computed with the EMA weights, the ones that sample, and picks best.pt.
#
# Checkpoints are written to a temporary file and renamed over the old one,
# so a crash mid-write never leaves a half-written last.pt. They hold only
# tensors, numbers and strings, so torch.load(..., weights_only=True) can read
# them without running arbitrary pickled code.
# -----------------------------------------------------------------------------

# Why these defaults (each measured on 2 CPU cores; README "Results" has the
# runs, figures and numbers):
# * pixel-unshuffle 4, widths 32-64-128: over 10x the images/s of the same
#   widths at full resolution; wider or deeper nets were slower and no cleaner.
# * target "data": the velocity-predicting net stayed speckled everywhere.
# * uniform t, shifted by 4: a lower validation loss than logit-normal, and
#   the shift spends training on the noisy times where colours are decided.
# * weight_cap 3: the uncapped weight (up to 400) left samples rainbow
#   speckle after 30 minutes although one denoising step on real sprites
#   was nearly right; the middle of the path had not been learned.
# * norm_groups 8 (see section 4), batch 32, AdamW at 1e-3 with 200 warm-up
#   steps, EMA 0.999, gradient clip 1.0 (it acts only in warm-up and on spikes).
# * fp32 on CPU: bf16 autocast made a step ~50x slower (no fast CPU bf16 convs).

T_BUCKETS = 5


DEVICES = ("auto", "cpu", "cuda", "mps")


def option(default, help, choices=None):
    """A config field that also carries its --help text (and allowed values) for argparse."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    # Where and how long.
    data: str = option("data/images", "folder of sprites (searched recursively)")
    run_dir: str = option("", "output folder (default: a new folder under runs/)")
    resume: bool = option(False, "continue the run in --run-dir from its last.pt")
    max_steps: int = option(20000, "optimizer steps to train for (the LR schedule's length)")
    max_minutes: float = option(0.0, "also stop (and save) after this many minutes; 0 = no limit")
    # The optimisation recipe.
    batch_size: int = option(32, "sprites per step (per process under torchrun)")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup: int = option(200, "linear LR warm-up steps")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    ema: float = option(0.999, "EMA decay (after its warm-up)")
    # The flow and the network.
    schedule: str = option("linear", "noise schedule (alpha_t, beta_t)", SCHEDULES)
    target: str = option("data", "what the network predicts: the clean sprite or the velocity", TARGETS)
    t_dist: str = option("uniform", "training time distribution", ("uniform", "logit-normal"))
    t_mean: float = option(0.0, "logit-normal location m in t = sigmoid(m + s n); below 0 favours noisier t")
    t_std: float = option(1.0, "logit-normal scale s")
    t_shift: float = option(4.0, "time shift s of the training t: t -> t / (t + s (1 - t)); above 1 favours noisier t")
    weight_cap: float = option(3.0, "cap on the x-prediction loss weight w(t) = 1/(1-t)^2 (linear path); 0 = no cap")
    channels: str = option("32,64,128", "U-Net widths per level, comma-separated")
    blocks: int = option(2, "residual blocks per level")
    norm_groups: int = option(8, "GroupNorm groups per normalisation layer (fewer if the width is not divisible)")
    unshuffle: int = option(0, "pixel-unshuffle factor; 0 = 4 on CPU, 2 on GPU", (0, 1, 2, 4))
    flip: bool = option(True, "random horizontal flips")
    # Bookkeeping.
    val_fraction: float = option(0.05, "share of sprites held out for validation")
    log_every: int = option(25, "steps between CSV rows")
    val_every: int = option(250, "steps between validation + checkpoint")
    sample_every: int = option(500, "steps between sample grids")
    sample_steps: int = option(20, "Heun steps for the sample grids")
    seed: int = option(0, "random seed (runs are reproducible)")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", DEVICES)
    bf16: bool = option(False, "bf16 autocast on CPU too (always on for CUDA)")
    compile: bool = option(False, "torch.compile the model")
    fid_every: int = option(0, "steps between FID/KID of EMA samples vs the validation sprites (needs the Inception weights); 0 = off")
    fid_weights: str = option("", "Inception weights file for --fid-every (default: fid.py's cache)")


def check_config(cfg):
    """Reject bad values with one sentence each, before any work starts."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
        if (f.type in (int, float) and value < 0 and f.name != "t_mean") or (value == 0 and f.name in POSITIVE):
            raise UserError(f"{flag} must be {'positive' if f.name in POSITIVE else 'zero or more'}, got {value}")
    if cfg.ema >= 1 or cfg.val_fraction >= 1:
        raise UserError("--ema and --val-fraction must be below 1")
    try:
        widths = parse_channels(cfg.channels)
    except ValueError:
        raise UserError(f"--channels must be comma-separated positive integers, got {cfg.channels!r}")
    if any(c % 8 for c in widths) or len(widths) > 4:
        raise UserError("--channels needs at most 4 widths, each a multiple of 8")


POSITIVE = {"max_steps", "batch_size", "lr", "grad_clip", "t_std", "t_shift", "blocks", "norm_groups", "log_every", "val_every", "sample_every", "sample_steps"}


def parse_channels(text):
    """'32,64,128' -> (32, 64, 128), the U-Net width at each resolution level."""
    widths = tuple(int(c) for c in text.split(","))
    if not widths or min(widths) <= 0:
        raise ValueError(text)
    return widths


def pick_device(name):
    """'auto' takes the fastest device present (cuda, then mps, then cpu); an explicit name must exist."""
    mps = getattr(torch.backends, "mps", None)
    present = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in present.items() if ok))
    if not present[name]:
        raise UserError(f"--device {name} was asked for but no {name.upper()} device is available")
    return torch.device(name)


def build_model(cfg, device):
    """The U-Net a config describes. On a GPU the default working resolution is
    64x64: there is compute to spare, and finer positions help finer sprites."""
    unshuffle = cfg.unshuffle or (4 if device.type == "cpu" else 2)
    return UNet(parse_channels(cfg.channels), cfg.blocks, unshuffle, cfg.target, cfg.schedule, cfg.norm_groups)


def sample_t(n, cfg, generator, device):
    """Training times. Logit-normal, t = sigmoid(m + s n) with n ~ N(0, 1), has a
    density peaked near sigmoid(m) and thin tails: few samples are spent at the
    two ends, where the best prediction is nearly trivial (the data mean, or x)."""
    if cfg.t_dist == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator, device=device))
    return shift_time(t, cfg.t_shift)


def flow_matching_loss(model, z, t, eps, target, sched, weight_cap=None):
    """Per-sample loss (B,): || u_theta(x_t, t) - u_t(x_t | z) ||^2, averaged over pixels.

    For x-prediction this is w(t) || z_hat - z ||^2 with w(t) as in section 7,
    capped at `weight_cap` when given (training); validation leaves it uncapped.
    `model` may be a DDP wrapper, so it is called, not asked for .velocity().
    """
    x_t = sample_path(z, t, eps, sched)
    out = model(x_t, t).float()
    if target == "velocity":
        return (out - conditional_vector_field(z, t, eps, sched)).pow(2).flatten(1).mean(1)
    w = data_coefficients(t, sched, t)[0] ** 2  # (B,): u(z_hat) - u(z) = a (z_hat - z)
    if weight_cap:
        w = w.clamp(max=weight_cap)
    return w * (out - z).pow(2).flatten(1).mean(1)


@torch.no_grad()
def validation_loss(model, val_x, cfg, device, batch_size=64):
    """Mean flow-matching loss on held-out sprites at fixed seeds (see above)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for start in range(0, len(val_x), batch_size):
        z = to_float(val_x[start:start + batch_size])
        t = torch.rand(len(z), generator=gen).to(device)
        eps = torch.randn(z.shape, generator=gen).to(device)
        with autocast(device):
            total += flow_matching_loss(model, z, t, eps, cfg.target, cfg.schedule).sum().item()
    return total / len(val_x)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: the old file survives any crash.
    os.replace is atomic, so a reader sees either the old or the new file, never half of one."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    """Load and sanity-check a checkpoint; any failure becomes one UserError sentence."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint '{path}' is a folder; give a file such as '{path / 'last.pt'}'")
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        # Checkpoints written before --norm-groups existed were trained with 32 groups.
        ckpt["config"] = {"norm_groups": 32, **ckpt["config"]}
        TrainConfig(**ckpt["config"]), ckpt["ema"], ckpt["model"], ckpt["step"], ckpt["unshuffle"]
    except Exception:
        raise UserError(f"checkpoint '{path}' is corrupt or not a SpriteFlow checkpoint")
    return ckpt


def load_model_from_checkpoint(path, device="cpu"):
    """The EMA weights of a checkpoint as a ready-to-sample UNet (eval mode)."""
    ckpt = read_checkpoint(path)
    cfg = TrainConfig(**ckpt["config"])
    model = build_model(dataclasses.replace(cfg, unshuffle=ckpt["unshuffle"]), device)
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise UserError(f"checkpoint '{path}' does not match the model its config describes")
    return model.to(device).eval()


def sprite_sheet(images, cols=None, scale=1, checker=8):
    """uint8 (N, H, W, 4) -> one RGB image on a grey checkerboard (shows transparency)."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    yy, xx = np.mgrid[: rows * h, : cols * w]
    board = np.where(((yy // checker) + (xx // checker)) % 2 == 0, 208, 232).astype(np.uint8)
    sheet = Image.fromarray(board).convert("RGB")
    for i, img in enumerate(images.numpy() if torch.is_tensor(images) else images):
        tile = Image.fromarray(img, "RGBA")
        sheet.paste(tile, ((i % cols) * w, (i // cols) * h), tile)
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale > 1 else sheet


def setup_distributed(device):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK;
    each process then trains on its own shard and DDP averages gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def new_run_dir():
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return next(p for p in [base] + [Path(f"{base}-{k}") for k in range(1, 1000)] if not p.exists())


def progress(step, max_steps, loss, img_s, elapsed, steps_done, max_minutes=0.0):
    """One status line; redrawn in place on a terminal, one line per update in a log file.
    The ETA uses the pace of the `steps_done` steps taken in `elapsed` seconds by this
    process, and never runs past the --max-minutes limit."""
    bar = ("#" * int(24 * step / max_steps)).ljust(24, "-")
    eta = (max_steps - step) * elapsed / max(steps_done, 1) / 60
    if max_minutes:
        eta = min(eta, max(0.0, max_minutes - elapsed / 60))
    print(f"step {step}/{max_steps} [{bar}] loss {loss:.4f} {img_s:.1f} img/s eta {eta:.0f} min",
          end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)


def train_step(net, model, ema_model, opt, z, t, eps, cfg, amp, step):
    """One optimisation step on sprites z (B, 4, 128, 128) at times t (B,) with noise eps.
    Returns the per-sample losses (B,) and the gradient norm before clipping."""
    with amp:
        per_sample = flow_matching_loss(net, z, t, eps, cfg.target, cfg.schedule, cfg.weight_cap)
    opt.zero_grad(set_to_none=True)
    per_sample.mean().backward()
    # Rare large gradients (early on, or a batch heavy in t near 1 when the
    # x-prediction weight is uncapped) are scaled down, not followed.
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    ema_update(ema_model, model, step, cfg.ema)
    return per_sample.detach(), grad_norm


def train(cfg, stop_after=None):
    """Train per `cfg`; returns the run folder. `stop_after` ends the loop early at
    that step as if interrupted (the tests use it to check resuming)."""
    check_config(cfg)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    is_main = rank == 0
    run_dir = Path(cfg.run_dir) if cfg.run_dir else new_run_dir()
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    ckpt = None
    if cfg.resume:
        if not cfg.run_dir:
            raise UserError("--resume needs --run-dir to say which run to continue")
        ckpt = read_checkpoint(last_path)
        # The recipe comes from the checkpoint; only how long to go on and where
        # the data lives come from this command line.
        cfg = dataclasses.replace(TrainConfig(**ckpt["config"]), resume=True, run_dir=str(run_dir),
                                  data=cfg.data, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes)
    elif last_path.exists():
        raise UserError(f"'{run_dir}' already holds a checkpoint; add --resume to continue it or pick another --run-dir")

    # The whole set lives on the device as uint8 (4x smaller than floats);
    # under torchrun each rank keeps every world-th training sprite, its shard.
    data, names = load_folder(cfg.data)
    train_idx, val_idx = split_train_val(names, cfg.val_fraction)
    train_x = data[train_idx][rank::world].to(device)  # (N_train / world, 4, 128, 128) uint8
    # At most 512 held-out sprites: enough for a stable number, cheap enough to run often.
    val_x = data[val_idx][:512].to(device)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, device).to(device)
    if device.type == "cuda":  # tensor cores prefer NHWC convolutions
        model = model.to(memory_format=torch.channels_last)
    unshuffle = model.stem[0].downscale_factor
    ema_model = copy.deepcopy(model).requires_grad_(False)
    # AdamW: Adam's per-parameter step sizes, with weight decay applied to the
    # weights directly rather than through the gradient. beta2 = 0.99 (instead of
    # 0.999) lets the second-moment estimate follow the loss scale, which shifts
    # a lot as the network learns the easy times first.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    # Every random draw of training (batch indices, flips, t, eps) comes from
    # this one generator, so saving its state makes a resumed run draw exactly
    # what the uninterrupted run would have. Ranks get different streams.
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        # Only rank 0's stream is saved; other ranks restart theirs from a seed that depends on the step.
        gen.set_state(ckpt["rng"]) if rank == 0 else gen.manual_seed(cfg.seed * 1000 + rank + 7919 * step)
    # `net` is what the training step calls: possibly wrapped by DDP (which
    # all-reduces gradients in backward) and/or torch.compile. `model` stays the
    # plain module whose weights we average, save and sample from.
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    # bf16 autocast runs matmuls and convolutions in bfloat16 (same exponent
    # range as float32, so no loss scaling is needed); the loss is taken in fp32.
    use_bf16 = device.type == "cuda" or cfg.bf16
    amp = autocast(device, cfg.bf16)

    if cfg.fid_every and len(val_x) < 2:
        raise UserError("--fid-every needs at least 2 validation sprites; raise --val-fraction")
    inception = load_fid_network(cfg, device) if is_main and cfg.fid_every else None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        print(f"{len(data)} sprites ({len(train_idx)} train, {len(val_idx)} val) from {cfg.data}; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters at {128 // unshuffle}x{128 // unshuffle} working resolution; "
              f"device {device}{' x' + str(world) if world > 1 else ''}{', bf16' if use_bf16 else ''}; run folder {run_dir}",
              file=sys.stderr)
        log_path = run_dir / "training_log.csv"
        columns = ["step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "val_loss"] + [f"loss_t{k}" for k in range(T_BUCKETS)]
        columns += ["fid", "kid"] if cfg.fid_every else []
        new_log = not (cfg.resume and log_path.exists())
        log_file = open(log_path, "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(columns)
        fixed_noise_seed = cfg.seed + 12345

    def checkpoint_state():
        """Everything needed to continue exactly: weights, optimizer moments, step, RNG."""
        return {"model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "best_val": best_val, "rng": gen.get_state().cpu(), "config": dataclasses.asdict(cfg),
                "unshuffle": unshuffle}

    # Log statistics stay on the device until a row is written: reading them
    # every step would make a GPU wait for each step to finish.
    bucket_sum, bucket_n = torch.zeros(T_BUCKETS, device=device), torch.zeros(T_BUCKETS, device=device)
    loss_sum, grad_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    window_steps, start_step, why = 0, step, "done"
    start_time = window_time = time.time()
    try:
        while step < cfg.max_steps:
            if (stop_after is not None and step >= stop_after) or (cfg.max_minutes and time.time() - start_time > 60 * cfg.max_minutes):
                break
            model.train()
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            # Sampling with replacement: steps, not epochs, are the unit of training.
            idx = torch.randint(len(train_x), (cfg.batch_size,), generator=gen, device=device)
            z = to_float(train_x[idx])  # (B, 4, 128, 128) in [-1, 1]
            if cfg.flip:
                flip = torch.rand(cfg.batch_size, generator=gen, device=device) < 0.5
                z = torch.where(expand(flip, z), z.flip(-1), z)
            t = sample_t(cfg.batch_size, cfg, gen, device)  # (B,)
            eps = torch.randn(z.shape, generator=gen, device=device)  # (B, 4, 128, 128)
            per_sample, grad_norm = train_step(net, model, ema_model, opt, z, t, eps, cfg, amp, step)
            step += 1

            if not is_main:  # only rank 0 logs, validates, samples and saves
                continue
            # Per-t-bucket losses: where along the path is the flow hard to learn?
            bucket = (t * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
            bucket_sum.index_add_(0, bucket, per_sample.float())
            bucket_n.index_add_(0, bucket, torch.ones_like(t))
            loss_sum += per_sample.mean()
            grad_sum += grad_norm
            window_steps += 1
            if step % cfg.log_every == 0 or step % cfg.val_every == 0 or step == cfg.max_steps:
                now = time.time()
                img_s = window_steps * cfg.batch_size * world / max(now - window_time, 1e-9)
                val = ""
                if step % cfg.val_every == 0 or step == cfg.max_steps:
                    val = validation_loss(ema_model, val_x, cfg, device)
                buckets, counts = (bucket_sum / bucket_n.clamp(min=1)).tolist(), bucket_n.tolist()
                mean_loss, mean_grad = loss_sum.item() / window_steps, grad_sum.item() / window_steps
                row = [step, f"{step * cfg.batch_size * world / len(train_idx):.3f}", f"{mean_loss:.5f}",
                       f"{lr:.3e}", f"{mean_grad:.4f}", f"{img_s:.2f}",
                       val if val == "" else f"{val:.5f}"] + [f"{b:.5f}" if n else "" for b, n in zip(buckets, counts)]
                if cfg.fid_every:
                    row += fid_kid_row(ema_model, val_x, inception, cfg, device) if step % cfg.fid_every == 0 else ["", ""]
                log.writerow(row)
                log_file.flush()
                progress(step, cfg.max_steps, mean_loss, img_s, now - start_time, step - start_step, cfg.max_minutes)
                if val != "":
                    if val < best_val:
                        best_val = val
                        save_checkpoint(best_path, checkpoint_state())
                    save_checkpoint(last_path, checkpoint_state())
                for stat in (bucket_sum, bucket_n, loss_sum, grad_sum):
                    stat.zero_()
                window_steps, window_time = 0, time.time()
            if step % cfg.sample_every == 0:
                sprites = generate(ema_model, 16, cfg.sample_steps, "heun", fixed_noise_seed, device)
                sprite_sheet(sprites, cols=4).save(run_dir / "samples" / f"step_{step:07d}.png")
    except KeyboardInterrupt:  # Ctrl-C: fall through to the final save below
        why = "interrupted"
    if world > 1:
        check_ranks_in_sync(model, rank, world)
    if is_main:
        if step > start_step or not last_path.exists():
            save_checkpoint(last_path, checkpoint_state())
        if not best_path.exists():
            save_checkpoint(best_path, checkpoint_state())
        log_file.close()
        print(f"\n{why} at step {step}; checkpoints in {run_dir} (best val loss {best_val:.5f})", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def load_fid_network(cfg, device):
    """fid.py's Inception network; without its weights we stop now, not hours in."""
    import fid
    try:
        return fid.load_inception(cfg.fid_weights or None, device, allow_download=False)
    except fid.FIDError as e:
        raise UserError(f"--fid-every needs the Inception weights: {e}")


def fid_kid_row(ema_model, val_x, inception, cfg, device):
    """FID and KID between as many EMA samples as there are validation sprites
    and those sprites. With a few hundred images FID is biased upwards; KID,
    being unbiased, is the number to compare across steps."""
    import fid
    fake = generate(ema_model, len(val_x), cfg.sample_steps, "heun", cfg.seed + 999, device)
    real = val_x.permute(0, 2, 3, 1).cpu()  # (N, 128, 128, 4)
    scores = fid.fid_kid(real.numpy(), fake.numpy(), inception, device=device)
    return [f"{scores['fid']:.3f}", f"{scores['kid_mean']:.5f}"]


def check_ranks_in_sync(model, rank, world):
    """DDP keeps replicas identical by averaging gradients; verify it: the
    element-wise max and min of the weights over all ranks must coincide."""
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().float()
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if rank == 0:
        same = torch.equal(hi, lo)
        print(f"\nweights identical across {world} ranks: {same}", file=sys.stderr)


# -----------------------------------------------------------------------------
# 8. Command line: train, sample, plot, bench
#
#   train   section 7, with every TrainConfig field as a --flag.
#   sample  loads the EMA weights of a checkpoint (by default the newest .pt
#           under runs/) and integrates dX = u_theta(X, t) dt (or the SDE) from
#           X_0 ~ N(0, I) to t = 1. Pass --trajectory to watch the flow: every
#           intermediate X_t is an image too, noise condensing into a sprite.
#   plot    training_log.csv -> PNG. Losses span orders of magnitude (the
#           t-buckets differ by ~100x), hence the log-scale y axis.
#   bench   what one training step and one sample cost on this device, for
#           the default model and for the same widths at full resolution
#           (no pixel-unshuffle). The convolutions' cost scales with the
#           number of positions, so the full-resolution variant does ~16x the
#           work of the 32x32 default. With --checkpoint it also measures how
#           far Euler and Heun endpoints land from a 500-step Heun solution:
#           the global error of a method of order p shrinks like (1/N)^p.
#
# Every user mistake raises UserError, which main() prints as one line
# ("error: ...") with exit status 2; argparse reports bad flags the same way.
# -----------------------------------------------------------------------------


def newest_checkpoint(root="runs"):
    """The most recently written .pt under root: usually the running or last run's last.pt."""
    found = sorted(Path(root).rglob("*.pt"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
    if not found:
        raise UserError(f"no checkpoint found under '{root}/'; train first or pass --checkpoint")
    return found[-1]


def cmd_sample(args):
    """Write --n sprites as RGBA PNGs plus a grid sheet (and optionally the trajectory)."""
    if args.n <= 0 or args.steps <= 0 or args.grid_shift <= 0:
        raise UserError("--n, --steps and --grid-shift must be positive")
    device = pick_device(args.device)
    path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    model = load_model_from_checkpoint(path, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [] if args.trajectory else None
    t0 = time.time()
    sprites = generate(model, args.n, args.steps, args.sampler, args.seed, device, sigma=args.sigma, frames=frames,
                       grid_shift=args.grid_shift)
    for i, sprite in enumerate(sprites):
        Image.fromarray(sprite.numpy(), "RGBA").save(out / f"sprite_{i:03d}.png")
    sprite_sheet(sprites).save(out / "grid.png")
    print(f"wrote {len(sprites)} sprites and grid.png to {out} from {path} "
          f"({args.sampler}, {args.steps} steps, {time.time() - t0:.1f} s)")
    if frames is not None:
        write_trajectory(model, frames, args.steps, out, args.grid_shift)


@torch.no_grad()
def write_trajectory(model, frames, steps, out, grid_shift=1.0, count=4, n_frames=9):
    """A GIF and a PNG of the first few sprites flowing from noise to data. Each row is
    one time t: on the left the state x_t, on the right the network's guess z_hat(x_t, t)
    of where it is heading. The guesses show when a sprite's layout and colours are
    decided; x_t only shows it once the noise has faded. Only the last x_t is snapped
    to binary alpha; the rest are shown as they are."""
    ts = time_grid(steps, grid_shift)
    picks = sorted({round(k * steps / (n_frames - 1)) for k in range(n_frames)})
    rows = []
    for i in picks:
        x = frames[i][:count]
        with autocast(x.device):
            z_hat = model.clean(x, at(x, ts[i])).float()
        rows.append(torch.cat([to_uint8(x, binary_alpha=(i == steps)), to_uint8(z_hat, binary_alpha=False)]))
    sheets = [sprite_sheet(row, cols=2 * count) for row in rows]
    sheets[0].save(out / "trajectory.gif", save_all=True, append_images=sheets[1:] + [sheets[-1]] * 3, duration=300, loop=0)
    sprite_sheet(torch.cat(rows), cols=2 * count).save(out / "trajectory.png")  # one row per time
    print(f"wrote trajectory.gif and trajectory.png ({len(rows)} times; left x_t, right z_hat) to {out}")


def cmd_plot(args):
    """training_log.csv of a run -> training_log.png (training, per-bucket and val losses)."""
    run_dir = Path(args.run_dir) if args.run_dir else newest_checkpoint().parent
    log_path = run_dir / "training_log.csv"
    if not log_path.is_file():
        raise UserError(f"'{log_path}' does not exist; point plot at a run folder")
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    names = ["loss"] + [f"loss_t{k}" for k in range(T_BUCKETS)] + ["val_loss"]
    series = {name: [(float(r["step"]), float(r[name])) for r in rows if r.get(name) and float(r[name]) > 0] for name in names}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        raise UserError(f"'{log_path}' has no rows yet")
    out = Path(args.out) if args.out else run_dir / "training_log.png"
    plot_log_scale(series, out, title=f"{run_dir}")
    print(f"wrote {out}")


def plot_log_scale(series, out, title="", size=(900, 560)):
    """Line chart with a log-scale y axis, drawn with Pillow alone."""
    (W, H), (left, right, top, bottom) = size, (70, 170, 30, 50)
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [math.log10(y) for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = math.floor(min(ys) * 4) / 4, math.ceil(max(ys) * 4) / 4 + 1e-9

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (math.log10(y) - y0) / (y1 - y0) * (H - top - bottom))

    for k in range(math.floor(y0), math.ceil(y1) + 1):  # decades and their 2x, 5x ticks
        for m in (1, 2, 5):
            v = m * 10.0**k
            if y0 <= math.log10(v) <= y1:
                _, y = px(x0, v)
                draw.line([(left, y), (W - right, y)], fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                draw.text((5, y - 6), f"{v:g}", fill="black", font=font)
    for x in np.linspace(x0, x1, 6):
        draw.text((px(x, 10**y0)[0] - 10, H - bottom + 8), f"{x:.0f}", fill="black", font=font)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text((left, 8), f"{title}  (log scale; x: step)", fill="black", font=font)
    colors = [(31, 119, 180), (230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0), (204, 121, 167), (200, 0, 0)]
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        draw.line([px(x, y) for x, y in pts], fill=color, width=3 if name in ("loss", "val_loss") else 1)
        draw.line([(W - right + 10, top + 16 * i + 6), (W - right + 30, top + 16 * i + 6)], fill=color, width=3)
        draw.text((W - right + 36, top + 16 * i), name, fill="black", font=font)
    img.save(out)


def peak_memory_mb(device):
    """Peak memory so far: the CUDA allocator's high-water mark, or on CPU the
    process's peak resident set size (everything Python and torch hold)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device):
    """Wait for queued GPU work: CUDA runs asynchronously, so timings need this."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_steps(cfg, device, steps, batch_size):
    """Images/s of full training steps (forward, backward, AdamW, EMA) after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(cfg, device).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    net = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, 256, (batch_size, 4, 128, 128), dtype=torch.uint8, device=device)
    amp = autocast(device, cfg.bf16)
    for i in range(steps + 1):
        if i == 1:  # the first step pays for allocation and kernel selection: not timed
            sync(device)
            start = time.time()
        z = to_float(data)
        train_step(net, model, ema_model, opt, z, torch.rand(batch_size, device=device), torch.randn_like(z), cfg, amp, i)
    sync(device)
    return steps * batch_size / (time.time() - start), sum(p.numel() for p in model.parameters()), model


@torch.no_grad()
def sampler_errors(model, device, n=16, step_counts=(5, 10, 20, 30, 50, 100, 200), ref_steps=500):
    """RMS distance (in [-1, 1] pixel units) of Euler and Heun endpoints from a
    500-step Heun solution started at the same noise: the ODE's own error,
    which needs no external network to measure."""
    model.eval()
    x0 = torch.randn(n, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to(device)
    reference = sample_heun(model.velocity, x0, ref_steps)
    rows = []
    for steps in step_counts:
        row = {"steps": steps}
        for name, fn in (("euler", sample_euler), ("heun", sample_heun)):
            row[name] = (fn(model.velocity, x0, steps) - reference).pow(2).mean().sqrt().item()
        rows.append(row)
        print(f"{steps:4d} steps: euler {row['euler']:.4f}  heun {row['heun']:.4f}  (RMS vs {ref_steps}-step heun)", file=sys.stderr)
    return rows


@torch.no_grad()
def denoising_errors(model, sprites, device, times=(0.1, 0.2, 0.3, 0.5, 0.7, 0.9)):
    """MSE of the one-shot clean-sprite estimate z_hat(x_t, t) against z, per t, on
    real sprites: where along the path the model is still wrong. An ODE keeps
    whatever z_hat decides at small t, so errors there become the samples' errors."""
    model.eval()
    z = to_float(sprites).to(device)  # (N, 4, 128, 128)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for t0 in times:
        t = at(z, t0)
        x_t = sample_path(z, t, eps, model.schedule)
        z_hat = model.clean(x_t, t)
        rows.append({"t": t0, "mse": (z_hat - z).pow(2).mean().item()})
        print(f"t = {t0:.1f}: one-shot denoising MSE {rows[-1]['mse']:.4f}", file=sys.stderr)
    return rows


def pixel_art_stats(images, block=4):
    """Two weight-free quality proxies for sprites drawn in `block`-pixel blocks, from uint8
    (N, H, W, 4): flatness, the share of side-by-side opaque blocks whose colours differ
    by at most 24 in every channel (clean colour regions score high, speckle low), and
    colours, the mean number of distinct colours per sprite at 8 levels per channel."""
    g = images[:, block // 2::block, block // 2::block].long()  # (N, H/block, W/block, 4)
    opaque, rgb = g[..., 3] > 127, g[..., :3]
    same = pairs = 0
    for a, b, both in ((rgb[:, :, 1:], rgb[:, :, :-1], opaque[:, :, 1:] & opaque[:, :, :-1]),
                       (rgb[:, 1:], rgb[:, :-1], opaque[:, 1:] & opaque[:, :-1])):
        pairs += both.sum().item()
        same += (((a - b).abs().amax(-1) <= 24) & both).sum().item()
    colours = [len(torch.unique(rgb[k][opaque[k]] // 32, dim=0)) for k in range(len(g))]
    return {"flatness": round(same / max(pairs, 1), 3), "colours": round(sum(colours) / len(colours), 1)}


def cmd_bench(args):
    """Measure the default model on this device; the last printed line is JSON."""
    cfg = TrainConfig(bf16=args.bf16, compile=args.compile)
    device = pick_device(args.device)
    batch = args.batch_size
    train_img_s, n_params, model = time_train_steps(cfg, device, args.steps, batch)
    print(f"default ({cfg.channels}, unshuffle {model.stem[0].downscale_factor}, {n_params / 1e6:.1f}M params): "
          f"{train_img_s:.1f} train img/s", file=sys.stderr)
    sync(device)
    t0 = time.time()
    generate(model, batch, cfg.sample_steps, "heun", 0, device)
    sync(device)
    sample_img_s = batch / (time.time() - t0)
    print(f"sampling: {sample_img_s:.2f} img/s (heun, {cfg.sample_steps} steps, batch {batch})", file=sys.stderr)
    peak_mb = peak_memory_mb(device)  # before the full-resolution run, which needs far more
    # Full resolution: same widths, no pixel-unshuffle. A batch of 8 keeps its
    # activations (16x larger) in memory; images/s barely depends on batch size here.
    full = dataclasses.replace(cfg, unshuffle=1)
    full_img_s, full_params, _ = time_train_steps(full, device, max(1, args.steps // 4), min(batch, 8))
    print(f"full resolution (unshuffle 1, {full_params / 1e6:.1f}M params): {full_img_s:.2f} train img/s", file=sys.stderr)
    errors = denoise = art = None
    if args.checkpoint:
        trained = load_model_from_checkpoint(args.checkpoint, device)
        errors = sampler_errors(trained, device)
        sprites = load_folder(args.data)[0][-64:]  # (64, 4, 128, 128) uint8
        denoise = denoising_errors(trained, sprites, device)
        art = {"data": pixel_art_stats(sprites.permute(0, 2, 3, 1)),
               "samples": pixel_art_stats(generate(trained, 64, cfg.sample_steps, "heun", 7, device))}
        print(f"pixel-art stats, 64 sprites: {art}", file=sys.stderr)
    print(json.dumps({"device": str(device), "train_img_s": round(train_img_s, 2), "full_res_train_img_s": round(full_img_s, 3),
                      "speedup": round(train_img_s / full_img_s, 1), "sample_img_s": round(sample_img_s, 3),
                      "peak_mem_mb": round(peak_mb), "batch_size": batch, "params_m": round(n_params / 1e6, 2),
                      "bf16": cfg.bf16 or device.type == "cuda", "threads": torch.get_num_threads(),
                      **({"sampler_rms_error": errors, "denoising_mse": denoise, "pixel_art": art} if errors else {})}))


def add_config_arguments(parser):
    """One --flag per TrainConfig field, with the field's default and help text."""
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=field.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(getattr(field.type, "__name__", field.type), str)
            parser.add_argument(flag, type=kind, default=field.default, help=field.metadata["help"], choices=field.metadata["choices"])


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    """Parse the command line and run one subcommand; returns the exit status."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="spriteflow.py", description="Flow matching for pixel-art sprites.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model", formatter_class=fmt)
    add_config_arguments(p_train)
    p_sample = sub.add_parser("sample", help="draw sprites from a checkpoint", formatter_class=fmt)
    p_sample.add_argument("--checkpoint", default="", help="checkpoint file (default: the newest .pt under runs/)")
    p_sample.add_argument("--n", type=int, default=16, help="number of sprites")
    p_sample.add_argument("--steps", type=int, default=20, help="integration steps")
    p_sample.add_argument("--sampler", choices=SAMPLERS, default="heun", help="ODE (euler, heun) or SDE sampler")
    p_sample.add_argument("--sigma", type=float, default=1.0, help="SDE noise scale: sigma_t = sigma * beta_t (larger: flatter but simpler sprites)")
    p_sample.add_argument("--grid-shift", type=float, default=1.0, help="warp s of the sampler's time grid, t -> t / (t + s (1 - t)); 1 = uniform")
    p_sample.add_argument("--seed", type=int, default=0, help="noise seed")
    p_sample.add_argument("--out", default="samples", help="output folder")
    p_sample.add_argument("--device", default="auto", choices=DEVICES, help="where to run")
    p_sample.add_argument("--trajectory", action="store_true", help="also write trajectory.gif/.png: noise (t=0) to sprite (t=1)")
    p_plot = sub.add_parser("plot", help="draw training_log.csv as a PNG (log scale)", formatter_class=fmt)
    p_plot.add_argument("run_dir", nargs="?", default="", help="run folder (default: the newest under runs/)")
    p_plot.add_argument("--out", default="", help="PNG path (default: RUN_DIR/training_log.png)")
    p_bench = sub.add_parser("bench", help="measure training and sampling speed of the default model", formatter_class=fmt)
    p_bench.add_argument("--steps", type=int, default=8, help="timed training steps")
    p_bench.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="batch size (default: the training default)")
    p_bench.add_argument("--device", default="auto", choices=DEVICES, help="where to run")
    p_bench.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU")
    p_bench.add_argument("--compile", action="store_true", help="torch.compile the model")
    p_bench.add_argument("--checkpoint", default="", help="also measure Euler/Heun error vs a 500-step Heun reference, denoising error per t and pixel-art stats")
    p_bench.add_argument("--data", default="data/images", help="sprites for the denoising error (the last 64 files)")
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # one line, no source echo
    try:
        if args.command == "train":
            train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
        else:
            {"sample": cmd_sample, "plot": cmd_plot, "bench": cmd_bench}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
