#!/usr/bin/env python3
"""make_sprites.py: procedural pixel-art RPG characters for SpriteFlow.

This script builds SpriteFlow's built-in training set: a few thousand small,
front-facing "idle" game characters, each saved as a 128x128 RGBA PNG on a
transparent background. Only numpy, Pillow and the standard library are used.

How one sprite is made, in order:

1. A random number generator is seeded from (seed, index) alone, so sprite
   number i never depends on how many sprites you ask for.
2. The generator rolls a *body kind* (human, elf, dwarf, orc, goblin, skeleton,
   slime, robot) and, for the people, an *archetype* (knight, mage, ranger...).
   The archetype decides which clothes, hats and held items are likely, so a
   mage tends to get a robe, a pointed hat and a staff rather than a random mix.
3. The character is painted layer by layer, back to front (cape, back hair,
   legs, boots, body, arms, head, face, hair, hat, held items) on a small
   *logical grid*: 32x32 by default. Every layer is a boolean mask built from a
   few simple shapes (rectangles, ellipses, polygons, thick lines) plus a
   *colour ramp* (highlight, base, shadow, deep shadow).
4. Each layer is shaded from one light source at the top-left: pixels on the
   top/left rim of a layer get the highlight tone, pixels on its bottom/right
   rim get the shadow tone, everything else the base tone. A layer can also
   cast a one-pixel shadow onto whatever lies directly below it (hair on the
   forehead, a head on the chest).
5. A one-pixel dark outline is drawn around the whole silhouette.
6. The sprite is shifted sideways so its bounding box is centred, then blown up
   to 128x128 with nearest-neighbour scaling (each logical pixel becomes a
   4x4 block on the default 32 grid), which keeps the edges crisp.

All shape coordinates in this file are written in *design units*: a 32x32
square where x grows to the right, y grows downwards, the character's centre
line is x = 16 and the ground is the line y = 29 (feet occupy row 28). With
``--grid 64`` the very same shapes are rasterised on a 64x64 grid, so the same
characters come out with finer detail (2x2 blocks instead of 4x4).

Usage (from the repository root):

    python data/make_sprites.py                       # 2048 sprites -> data/images/<kind>/
    python data/make_sprites.py --no-images --sheet data/contact_sheet.png
    python data/make_sprites.py --grid 64 --count 16 --out /tmp/hires
    python data/make_sprites.py --flat --out /tmp/flat    # no kind folders
    python data/make_sprites.py --turnarounds data/turnarounds   # 64 per kind in 4 views

Sprite i is saved as <out>/<kind>/sprite_<i:05d>.png, one folder per body kind
(the torchvision ImageFolder layout: the folder name is the class label).

With --turnarounds, the first 64 characters of every kind are drawn from four sides
(front, left, back, right; see make_turnaround()) and saved at the art's native size as
<out>/<kind>/c<index:05d>/0_front.png ... 3_right.png, one folder per character: the
layout `spriteflow.py train --views 4` reads. Their fronts are the sprites above.

Rerunning with the same options rewrites the same files byte for byte.
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------
SIZE = 128          # side of every output image, in real pixels
DESIGN = 32         # side of the design grid that all coordinates refer to
CX = 16.0           # horizontal centre line of every character (design units)
FLOOR = 29.0        # the ground: nothing is drawn at or below this y
OUTLINE_RGB = (28, 20, 38)   # the dark, slightly purple outline colour

# Body kinds and how often each is rolled. The people (human/elf/dwarf) share
# one drawing routine; orcs, goblins and skeletons reuse it with their own
# proportions and face details; slimes and robots have routines of their own.
KINDS = ("human", "elf", "dwarf", "orc", "goblin", "skeleton", "slime", "robot")
KIND_WEIGHTS = (0.25, 0.10, 0.08, 0.10, 0.08, 0.14, 0.12, 0.13)


# --------------------------------------------------------------------------
# Colours and palettes
# --------------------------------------------------------------------------
# Every palette entry is a single *base* colour; ramp() derives the lighter and
# darker tones from it. Keeping the lists short keeps each sprite's palette
# small, which is a large part of what makes pixel art look like pixel art.
SKIN_HUMAN = ["#ffe3c8", "#f7cba4", "#ecb48a", "#d99a6c", "#c27f55", "#a2653f",
              "#7f4c30", "#5f3925"]
SKIN_ELF = ["#fbe6d6", "#f2d3bb", "#e9c7a8", "#f6dcc0", "#d8b48e"]
SKIN_ORC = ["#79a64e", "#679845", "#8fab5a", "#5f8f5f", "#9aa25c", "#7c9a7a"]
SKIN_GOBLIN = ["#9fd05a", "#b7cc52", "#7fc46c", "#a9bb6c", "#c9b46a"]
BONE = ["#f1ead6", "#e8e3d2", "#dcd8cc", "#efe4c4"]
HAIR_NATURAL = ["#2b2230", "#4a3026", "#6e4630", "#8e5a34", "#b4432f", "#d9822b",
                "#e9c45c", "#f2e4ae", "#c9c9d6", "#f2f0ea"]
HAIR_FANTASY = ["#e070a8", "#5b8fe0", "#62c47a", "#9a62d8", "#e05a5a"]
CLOTH = ["#c8373e", "#8e2a3c", "#e07b39", "#e0b83a", "#6fa83f", "#2f7a4a",
         "#2aa198", "#4a90d9", "#2f4f9e", "#26335c", "#7b4bb0", "#b84a9a",
         "#8a5a3a", "#c9a878", "#8c8f99", "#ebe6d8", "#3c3646"]
CLOTH_EARTHY = ["#6fa83f", "#2f7a4a", "#8a5a3a", "#c9a878", "#5e6b3a", "#7a6a4a"]
CLOTH_DARK = ["#26335c", "#3c3646", "#4a2a3c", "#2f3f3a", "#5a2a2a", "#3a2f5a"]
CLOTH_RICH = ["#c8373e", "#8e2a3c", "#7b4bb0", "#2f4f9e", "#b84a9a", "#2aa198"]
CLOTH_HOLY = ["#ebe6d8", "#f2efe6", "#d8d2c0", "#e0e8f0"]
LEATHER = ["#7a4a2a", "#5e3a24", "#9a6a3a", "#4a3428"]
METAL = {"steel": "#b7bfcb", "iron": "#808a98", "gold": "#e8b83a",
         "bronze": "#c08040", "dark": "#5a5e70"}
WOOD = ["#8a5a30", "#6e4424", "#a8743e"]
GEM = ["#4ee0f0", "#ff5a8a", "#8af05a", "#f0d03a", "#b070ff", "#ff7a3a"]
IRIS = ["#2a2436", "#2a2436", "#3a6ad0", "#3a9a5a", "#7a4a2a", "#8a3ac8"]
SLIME = ["#5ad06a", "#4aa8f0", "#f070b0", "#a070f0", "#f0a040", "#40d0c0",
         "#e05050", "#b8e050", "#70c8ff"]
ROBOT_BODY = ["#b7bfcb", "#6a8ac0", "#c85a4a", "#e8b83a", "#70b070", "#ebe6d8",
              "#70747f", "#e08a3a"]
GLOW = ["#40f0ff", "#ff4060", "#60ff80", "#ffd040", "#ff70f0"]
BLACK = "#241c30"
WHITE = "#fbfaf4"
BLUSH = "#f08a8a"


def hex_rgb(code):
    """'#rrggbb' -> (r, g, b) as ints."""
    return tuple(int(code[i:i + 2], 16) for i in (1, 3, 5))


def _toward(h, target, amount):
    """Move hue h (0..1) at most `amount` of a turn towards hue `target`."""
    diff = ((target - h + 0.5) % 1.0) - 0.5
    return (h + max(-amount, min(amount, diff))) % 1.0


def ramp(code):
    """Build a 4-tone colour ramp [highlight, base, shadow, deep] from one colour.

    Pixel artists rarely shade by just mixing in black or white. Here the
    lighter tone drifts towards warm yellow and the darker ones towards cool
    blue-purple ("hue shifting"), and shadows get a little more saturated.
    """
    r, g, b = (c / 255.0 for c in hex_rgb(code))
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    tones = [
        (_toward(h, 1 / 6, 0.04), s * 0.78, min(1.0, v * 1.15 + 0.07)),   # highlight
        (h, s, v),                                                        # base
        (_toward(h, 0.70, 0.05), min(1.0, s * 1.1 + 0.08), v * 0.74),     # shadow
        (_toward(h, 0.72, 0.08), min(1.0, s * 1.15 + 0.12), v * 0.52),    # deep
    ]
    out = []
    for th, ts, tv in tones:
        rr, gg, bb = colorsys.hsv_to_rgb(th, ts, tv)
        out.append((round(rr * 255), round(gg * 255), round(bb * 255)))
    return tuple(out)


def colour_distance(a, b):
    """Plain Euclidean distance between two '#rrggbb' colours (0..441)."""
    return float(np.linalg.norm(np.subtract(hex_rgb(a), hex_rgb(b))))


def flat(code):
    """A ramp whose four tones are all the same colour (eyes, glints...)."""
    c = hex_rgb(code)
    return (c, c, c, c)


# Tone indices into a ramp.
HI, BASE, SHADOW, DEEP = 0, 1, 2, 3


# --------------------------------------------------------------------------
# Dice: small helpers around numpy's Generator
# --------------------------------------------------------------------------
class Dice:
    """Convenience wrapper so the drawing code reads like a recipe."""

    def __init__(self, rng):
        self.rng = rng

    def pick(self, items, weights=None):
        """One element of `items`, optionally with relative `weights`."""
        if weights is None:
            return items[int(self.rng.integers(len(items)))]
        w = np.asarray(weights, dtype=float)
        return items[int(self.rng.choice(len(items), p=w / w.sum()))]

    def chance(self, p):
        """True with probability p."""
        return bool(self.rng.random() < p)

    def int(self, lo, hi):
        """An integer from lo to hi inclusive."""
        return int(self.rng.integers(lo, hi + 1))


# --------------------------------------------------------------------------
# The canvas: masks, shading, outline
# --------------------------------------------------------------------------
def box_blur(mask, r):
    """Mean of each (2r+1)x(2r+1) neighbourhood (zeros outside the image)."""
    k = 2 * r + 1
    p = np.pad(mask.astype(np.float32), r)
    c = np.cumsum(np.pad(p, ((0, 0), (1, 0))), axis=1)     # running sums along x
    h = c[:, k:] - c[:, :-k]
    c = np.cumsum(np.pad(h, ((1, 0), (0, 0))), axis=0)     # ...then along y
    return (c[k:, :] - c[:-k, :]) / (k * k)


class Canvas:
    """A logical-resolution paint surface that remembers *which ramp* and *which
    tone* every pixel uses. Colours are only looked up at the very end, which
    makes later tone tweaks (cast shadows) trivial.

    Shape methods (rect, ellipse, ...) take design-unit coordinates and return
    boolean masks at the canvas resolution; paint() puts a mask on the canvas.
    """

    def __init__(self, grid=32):
        if grid % DESIGN or SIZE % grid:
            raise ValueError("grid must be a multiple of 32 that divides 128")
        self.grid = grid
        self.scale = grid / DESIGN                 # canvas pixels per design unit
        centres = (np.arange(grid) + 0.5) / self.scale
        self.X, self.Y = np.meshgrid(centres, centres)   # pixel centres, design units
        self.ramp_id = np.full((grid, grid), -1, np.int16)   # -1 = transparent
        self.tone = np.full((grid, grid), BASE, np.int8)
        self.ramps = []
        # Everything stays inside a 1-unit margin (room for the outline) and
        # above the floor line, which gives every character the same baseline.
        self.allowed = ((self.X > 1) & (self.X < DESIGN - 1) &
                        (self.Y > 1) & (self.Y < FLOOR))

    # ---- shapes ----------------------------------------------------------
    def rect(self, x0, y0, x1, y1):
        """Axis-aligned box covering x0 <= x < x1, y0 <= y < y1."""
        return (self.X >= x0) & (self.X < x1) & (self.Y >= y0) & (self.Y < y1)

    def srect(self, x0, y0, x1, y1):
        """A box plus its mirror image about the centre line (x -> 32 - x)."""
        return self.rect(x0, y0, x1, y1) | self.rect(2 * CX - x1, y0, 2 * CX - x0, y1)

    def ellipse(self, cx, cy, rx, ry, power=2.0):
        """Filled ellipse; power > 2 gives a rounded box (a 'superellipse')."""
        return (np.abs((self.X - cx) / rx) ** power +
                np.abs((self.Y - cy) / ry) ** power) <= 1.0

    def rbox(self, x0, y0, x1, y1, power=4.0):
        """Rounded box filling x0..x1, y0..y1 (a superellipse)."""
        return self.ellipse((x0 + x1) / 2, (y0 + y1) / 2,
                            (x1 - x0) / 2, (y1 - y0) / 2, power)

    def poly(self, pts):
        """Filled polygon (even-odd rule) through a list of (x, y) points."""
        inside = np.zeros_like(self.X, dtype=bool)
        n = len(pts)
        for i in range(n):
            x1, y1 = pts[i]
            x2, y2 = pts[(i + 1) % n]
            if y1 == y2:
                continue
            crosses = (y1 > self.Y) != (y2 > self.Y)
            xcross = (x2 - x1) * (self.Y - y1) / (y2 - y1) + x1
            inside ^= crosses & (self.X < xcross)
        return inside

    def line(self, x0, y0, x1, y1, width=1.0):
        """A thick segment: pixels whose centre lies within width/2 of it."""
        dx, dy = x1 - x0, y1 - y0
        t = ((self.X - x0) * dx + (self.Y - y0) * dy) / max(dx * dx + dy * dy, 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (self.X - x0 - t * dx) ** 2 + (self.Y - y0 - t * dy) ** 2
        return dist2 <= (width / 2) ** 2 + 1e-9

    @staticmethod
    def mirror(mask):
        """The mask together with its left-right mirror image."""
        return mask | mask[:, ::-1]

    # ---- painting --------------------------------------------------------
    def _ramp_index(self, r):
        if r not in self.ramps:
            self.ramps.append(r)
        return self.ramps.index(r)

    def shade(self, mask, soft=1):
        """Tone for every pixel of `mask`, lit from the top-left.

        We blur the mask; the blurred image rises from 0 outside the shape to 1
        deep inside, so its gradient points inwards, i.e. opposite the surface
        normal. Summing the x and y gradients gives "how much this rim pixel
        faces the top-left". Rims facing the light get HI, rims facing away get
        SHADOW, flat interiors stay BASE. `soft` widens the blur for big round
        shapes (slimes) so their shading band is wider.
        """
        r = max(1, int(round(soft * self.scale)))
        b = np.pad(box_blur(mask, r), r)
        g = self.grid
        gx = b[r:r + g, 2 * r:] - b[r:r + g, :g]
        gy = b[2 * r:, r:r + g] - b[:g, r:r + g]
        facing = gx + gy
        tone = np.full(mask.shape, BASE, np.int8)
        tone[facing > 0.3] = HI
        tone[facing < -0.3] = SHADOW
        tone[facing < -0.85] = DEEP
        return tone

    def paint(self, mask, colour, tone=None, soft=1, cast=False):
        """Put `mask` on the canvas in ramp `colour`.

        tone=None shades the layer (see shade()); a number paints it flat in
        that tone. cast=True darkens, by one step, the already painted pixels
        directly below this layer: a cheap drop shadow.
        """
        mask = mask & self.allowed
        if not mask.any():
            return mask
        tones = self.shade(mask, soft) if tone is None else np.full(mask.shape, tone, np.int8)
        if cast:
            step = max(1, int(round(self.scale)))
            below = np.zeros_like(mask)
            below[step:] = mask[:-step]
            hit = below & ~mask & (self.ramp_id >= 0)
            self.tone[hit] = np.minimum(self.tone[hit] + 1, DEEP)
        self.ramp_id[mask] = self._ramp_index(colour)
        self.tone[mask] = tones[mask]
        return mask

    def darken(self, mask, steps=1):
        """Push already painted pixels under `mask` `steps` tones darker."""
        mask = mask & (self.ramp_id >= 0)
        self.tone[mask] = np.minimum(self.tone[mask] + steps, DEEP)

    def erase(self, mask):
        """Make pixels transparent again (used for gaps, e.g. between ribs)."""
        self.ramp_id[mask] = -1

    # ---- finishing -------------------------------------------------------
    def render(self):
        """Resolve colours, add the outline, centre, and upscale to 128x128."""
        g = self.grid
        filled = self.ramp_id >= 0
        table = np.array(self.ramps, dtype=np.uint8).reshape(-1, 4, 3)
        rgb = np.zeros((g, g, 3), np.uint8)
        rgb[filled] = table[self.ramp_id[filled], self.tone[filled]]
        # Outline: every empty pixel that touches a filled one (4-neighbourhood).
        grown = filled.copy()
        grown[1:, :] |= filled[:-1, :]
        grown[:-1, :] |= filled[1:, :]
        grown[:, 1:] |= filled[:, :-1]
        grown[:, :-1] |= filled[:, 1:]
        rgb[grown & ~filled] = OUTLINE_RGB
        rgba = np.zeros((g, g, 4), np.uint8)
        rgba[..., :3] = rgb
        rgba[..., 3] = np.where(grown, 255, 0)
        # Centre the bounding box horizontally (whole logical pixels only, so
        # the blocky structure survives). Held items make sprites lopsided.
        cols = np.flatnonzero(grown.any(axis=0))
        shift = int(np.floor((g - 1 - cols[0] - cols[-1]) / 2 + 0.5))
        shift = max(-cols[0], min(g - 1 - cols[-1], shift))
        rgba = np.roll(rgba, shift, axis=1)     # safe: nothing wraps around
        k = SIZE // g
        return np.repeat(np.repeat(rgba, k, axis=0), k, axis=1)


# --------------------------------------------------------------------------
# Archetypes: which gear goes with which kind of character
# --------------------------------------------------------------------------
# For every archetype: weights for (top, bottom, headgear, left-hand item,
# right-hand item) choices and the chance of a cape. Unlisted options have
# weight 0. "left" means the viewer's left (the character's right hand).
ARCHETYPES = {
    "knight":    dict(top={"armour": 1},
                      bottom={"trousers": 1},
                      head={"helmet": 6, "none": 2, "crown": 1},
                      left={"sword": 6, "axe": 2, "none": 1},
                      right={"shield": 7, "none": 2},
                      cape=0.4, cloth=CLOTH_RICH),
    "warrior":   dict(top={"armour": 2, "tunic": 2, "bare": 1},
                      bottom={"trousers": 3, "shorts": 1},
                      head={"helmet": 4, "bandana": 2, "none": 3},
                      left={"sword": 4, "axe": 3},
                      right={"shield": 3, "none": 4},
                      cape=0.15, cloth=CLOTH),
    "mage":      dict(top={"robe": 6, "tunic": 1},
                      bottom={"trousers": 1},
                      head={"wizard": 6, "hood": 3, "none": 2},
                      left={"staff": 6, "wand": 2},
                      right={"none": 1},
                      cape=0.25, cloth=CLOTH),
    "ranger":    dict(top={"tunic": 1},
                      bottom={"trousers": 3, "skirt": 1},
                      head={"hood": 4, "none": 3, "bandana": 1},
                      left={"bow": 6, "dagger": 1},
                      right={"none": 1},
                      cape=0.35, cloth=CLOTH_EARTHY),
    "rogue":     dict(top={"tunic": 1},
                      bottom={"trousers": 1},
                      head={"hood": 4, "bandana": 3, "none": 2},
                      left={"dagger": 4, "sword": 2},
                      right={"none": 1},
                      cape=0.25, cloth=CLOTH_DARK),
    "cleric":    dict(top={"robe": 3, "tunic": 1},
                      bottom={"trousers": 1},
                      head={"hood": 2, "none": 3, "crown": 1},
                      left={"staff": 3, "none": 2, "wand": 1},
                      right={"shield": 1, "none": 2},
                      cape=0.2, cloth=CLOTH_HOLY),
    "noble":     dict(top={"tunic": 2, "dress": 2},
                      bottom={"trousers": 1},
                      head={"crown": 5, "none": 2},
                      left={"none": 3, "staff": 1, "sword": 1},
                      right={"none": 1},
                      cape=0.7, cloth=CLOTH_RICH),
    "villager":  dict(top={"tunic": 3, "dress": 2},
                      bottom={"trousers": 3, "skirt": 1, "shorts": 1},
                      head={"none": 5, "bandana": 2, "hood": 1},
                      left={"none": 5, "staff": 1},
                      right={"none": 1},
                      cape=0.05, cloth=CLOTH),
    "barbarian": dict(top={"bare": 3, "tunic": 1},
                      bottom={"shorts": 2, "trousers": 1},
                      head={"helmet": 3, "bandana": 2, "none": 3},
                      left={"axe": 4, "sword": 2},
                      right={"none": 3, "shield": 1},
                      cape=0.1, cloth=CLOTH_EARTHY),
}

# Which archetypes each body kind may take, with weights.
KIND_ARCHETYPES = {
    "human":    {"knight": 3, "warrior": 2, "mage": 3, "ranger": 2, "rogue": 2,
                 "cleric": 2, "noble": 2, "villager": 3, "barbarian": 1},
    "elf":      {"ranger": 4, "mage": 3, "rogue": 1, "noble": 2, "cleric": 1, "knight": 1},
    "dwarf":    {"warrior": 3, "knight": 2, "barbarian": 1, "cleric": 1, "villager": 1},
    "orc":      {"barbarian": 4, "warrior": 3, "mage": 1, "rogue": 1},
    "goblin":   {"rogue": 3, "mage": 2, "ranger": 2, "villager": 1, "warrior": 1},
    "skeleton": {"warrior": 3, "knight": 2, "mage": 2, "ranger": 1, "noble": 1, "barbarian": 1},
}


def weighted(d, opts):
    """Pick a key from a {name: weight} dict."""
    names = list(opts)
    return d.pick(names, [opts[n] for n in names])


# --------------------------------------------------------------------------
# People: human, elf, dwarf, orc, goblin, skeleton
# --------------------------------------------------------------------------
def body_plan(d, kind):
    """Proportions in design units. Chibi style: big head, short legs."""
    if kind == "dwarf":
        p = dict(hw=10, hh=8, tw=10, th=5, legs=3, arm=2)
    elif kind == "orc":
        p = dict(hw=10, hh=d.pick([8, 9]), tw=d.pick([10, 12]), th=d.pick([6, 7]),
                 legs=d.pick([4, 5]), arm=3)
    elif kind == "goblin":
        p = dict(hw=d.pick([8, 10]), hh=d.pick([7, 8]), tw=6, th=d.pick([4, 5]),
                 legs=d.pick([3, 4]), arm=2)
    elif kind == "skeleton":
        p = dict(hw=d.pick([8, 10]), hh=d.pick([7, 8]), tw=d.pick([6, 8]), th=6,
                 legs=d.pick([5, 6]), arm=2)
    elif kind == "elf":
        p = dict(hw=8, hh=d.pick([8, 9]), tw=d.pick([6, 8]), th=d.pick([6, 7]),
                 legs=d.pick([5, 6]), arm=2)
    else:
        p = dict(hw=d.pick([8, 10]), hh=d.pick([7, 8, 9]), tw=d.pick([6, 8, 8, 10]),
                 th=d.pick([5, 6, 7]), legs=d.pick([4, 5, 6]), arm=2)
    # Derived landmarks (all y values are row boundaries in design units).
    p["hip"] = FLOOR - p["legs"]             # top of the legs
    p["sh"] = p["hip"] - p["th"]             # top of the torso (shoulders)
    p["hb"] = p["sh"] + 1                    # bottom of the head (chin overlaps torso)
    p["ht"] = p["hb"] - p["hh"]              # top of the head
    p["eye"] = p["hb"] - 4                   # the eye row: faces sit low, chibi-like
    p["hx0"], p["hx1"] = CX - p["hw"] / 2, CX + p["hw"] / 2
    p["tx0"], p["tx1"] = CX - p["tw"] / 2, CX + p["tw"] / 2
    return p


def choose_look(d, kind):
    """Roll colours and gear for one person-like character."""
    arche = weighted(d, KIND_ARCHETYPES[kind])
    a = ARCHETYPES[arche]
    look = dict(archetype=arche)
    # Skin.
    look["skin"] = {"human": lambda: d.pick(SKIN_HUMAN), "dwarf": lambda: d.pick(SKIN_HUMAN[:6]),
                    "elf": lambda: d.pick(SKIN_ELF), "orc": lambda: d.pick(SKIN_ORC),
                    "goblin": lambda: d.pick(SKIN_GOBLIN),
                    "skeleton": lambda: d.pick(BONE)}[kind]()
    # Clothes: a main colour from the archetype's palette, a contrasting accent.
    look["cloth"] = d.pick(a["cloth"])
    look["accent"] = d.pick([c for c in CLOTH if c != look["cloth"]])
    look["leather"] = d.pick(LEATHER)
    look["metal"] = d.pick(["steel", "steel", "iron", "gold", "bronze", "dark"])
    look["trim"] = d.pick(["gold", "gold", "steel", "bronze"])
    look["top"] = weighted(d, a["top"])
    look["bottom"] = weighted(d, a["bottom"])
    look["pants"] = d.pick(CLOTH_EARTHY + CLOTH_DARK + [look["accent"]])
    look["boots"] = d.pick(LEATHER + ["#3c3646", METAL["iron"]])
    look["head"] = weighted(d, a["head"])
    look["left"] = weighted(d, a["left"])
    look["right"] = weighted(d, a["right"])
    look["cape"] = d.chance(a["cape"])
    look["cape_col"] = d.pick(CLOTH_RICH + CLOTH_DARK)
    # Hair.
    if kind == "orc":
        styles = {"bald": 3, "mohawk": 4, "topknot": 3, "long": 1}
    elif kind == "goblin":
        styles = {"bald": 4, "tuft": 3, "mohawk": 1}
    elif kind == "dwarf":
        styles = {"short": 3, "bald": 1, "spiky": 1}
    elif kind == "skeleton":
        styles = {"bald": 1}
    else:
        styles = {"short": 4, "spiky": 2, "long": 3, "bob": 2, "twintails": 1,
                  "bun": 1, "bald": 1, "mohawk": 1}
    look["hair"] = weighted(d, styles)
    look["hair_col"] = (d.pick(HAIR_FANTASY) if d.chance(0.15) else d.pick(HAIR_NATURAL))
    if kind in ("orc", "goblin", "dwarf"):
        look["hair_col"] = d.pick(HAIR_NATURAL[:8])
    # Hair the same shade as the skin makes the face vanish: re-roll it from
    # the natural colours until it clearly differs (deterministic, same dice).
    while colour_distance(look["hair_col"], look["skin"]) < 80:
        look["hair_col"] = d.pick(HAIR_NATURAL)
    look["beard"] = kind == "dwarf" or (kind == "human" and d.chance(0.12)) or \
        (kind == "orc" and d.chance(0.15))
    # Face.
    look["eyes"] = d.pick(["tall", "tall", "big", "sclera", "dot"])
    if look["skin"] in SKIN_HUMAN[-3:]:
        look["eyes"] = d.pick(["big", "sclera"])       # keep eyes readable on dark skin
    look["iris"] = d.pick(IRIS)
    if kind == "orc":
        look["iris"] = d.pick(["#e03030", "#f0c030", BLACK])
    if kind == "goblin":
        look["iris"] = d.pick(["#f0d030", "#e03030", BLACK])
        look["eyes"] = d.pick(["big", "tall"])
    look["eye_gap"] = d.pick([1, 2]) if look_head_wide(kind) else 1
    look["mouth"] = d.chance(0.45)
    look["blush"] = kind in ("human", "elf") and d.chance(0.25)
    look["glow"] = d.pick(GLOW + [BLACK, BLACK])          # skeleton eye lights
    # Gear details.
    look["helmet"] = d.pick(["dome", "horned", "plume", "visor", "spike"])
    look["hat_tip"] = d.pick([-3, -2, 0, 2, 3])
    look["hat_h"] = d.int(5, 7)
    look["hood_point"] = d.chance(0.5)
    look["shield"] = d.pick(["round", "heater", "kite"])
    look["emblem"] = d.pick(["boss", "cross", "stripe", "none"])
    look["gem"] = d.pick(GEM)
    look["topper"] = d.pick(["orb", "crystal", "crook"])
    look["sleeves"] = d.pick(["long", "long", "short"])
    look["belt"] = d.chance(0.7)
    return look


def look_head_wide(kind):
    """Whether the head is usually wide enough for widely set eyes."""
    return kind in ("orc", "dwarf", "goblin", "human")


def person_top(L, kind):
    """The garment the torso shows: a skeleton's bare, tunic or dress torso shows ribs."""
    top = L["top"]
    if kind == "skeleton" and top in ("bare", "tunic", "dress"):
        return "ribs"
    return top


def detail_rolls(d, kind, L):
    """The dice for small details, rolled in the order the drawing once rolled them inline,
    so that every facing of a character gets the same boots, collar, hems and beard."""
    top = person_top(L, kind)
    r = dict(boot_h=None if kind == "skeleton" else d.pick([1, 2, 2, 3]))
    r["collar"] = top == "tunic" and d.chance(0.6)
    r["vest"] = top == "tunic" and d.chance(0.35)
    r["hem_trim"] = top == "robe" and d.chance(0.5)
    r["stripe_accent"] = top == "robe" and d.chance(0.5)
    skirted = top != "robe" and (top == "dress" or L["bottom"] == "skirt")
    r["hem"] = d.pick([2.5, 3.5]) if skirted else None
    r["long_beard"] = L["beard"] and (kind == "dwarf" or d.chance(0.4))
    return r


def person_plan(d, kind):
    """Proportions, look and detail dice of one person: everything every facing shares."""
    p = body_plan(d, kind)
    L = choose_look(d, kind)
    # A hood or helmet replaces most of the hair.
    if L["head"] in ("hood", "helmet") and L["hair"] in ("long", "twintails", "bun",
                                                        "mohawk", "topknot", "spiky", "tuft"):
        L["hair"] = "short"
    return p, L, detail_rolls(d, kind, L)


def wizard_hat(cv, hx0, hx1, brim_y, tip, height, hat, band):
    """A pointed hat over the head hx0..hx1: its cone leans to x = tip, a band, a brim."""
    cv.paint(cv.poly([(hx0 + 0.5, brim_y), (hx1 - 0.5, brim_y),
                      (tip + 0.5, brim_y - height), (tip - 0.5, brim_y - height)]), hat)
    cv.paint(cv.rect(hx0 + 0.5, brim_y - 1, hx1 - 0.5, brim_y), band)
    cv.paint(cv.rbox(hx0 - 2, brim_y, hx1 + 2, brim_y + 1.6, 6), hat, cast=True)


def person_ramps(L):
    """The colour ramps of a person's look L: skin, cloth, accent, leather, pants, boots,
    metal, trim, hair. Every view of one character draws from these."""
    return (ramp(L["skin"]), ramp(L["cloth"]), ramp(L["accent"]), ramp(L["leather"]),
            ramp(L["pants"]), ramp(L["boots"]), ramp(METAL[L["metal"]]), ramp(METAL[L["trim"]]),
            ramp(L["hair_col"]))


def draw_person(cv, d, kind, facing="front"):
    """Draw a humanoid: every layer from back to front. facing "back" draws the back view
    as the front is laid out (the caller mirrors it); "side" faces the viewer's left with
    the character's left hand near; "side_far_left" the same with the hands swapped."""
    p, L, R = person_plan(d, kind)
    if facing.startswith("side"):
        return draw_person_side(cv, p, L, R, kind, swap=facing == "side_far_left")
    back = facing == "back"
    skin, cloth, accent, leather, pants, boots, metal, trim, hair = person_ramps(L)
    bony = kind == "skeleton"
    hip, sh, ht, hb, eye = p["hip"], p["sh"], p["ht"], p["hb"], p["eye"]
    hx0, hx1, tx0, tx1 = p["hx0"], p["hx1"], p["tx0"], p["tx1"]
    aw = 1 if bony else p["arm"]
    ax0 = tx0 - aw                   # left arm spans ax0..tx0
    hand_y = hip                     # hands occupy hand_y .. hand_y+2, below the belt

    # -- 1. things behind the body: cape, long hair ------------------------
    if L["cape"] and not back:
        cape = ramp(L["cape_col"])
        cv.paint(cv.poly([(tx0 - 1, sh), (tx1 + 1, sh), (tx1 + 3, FLOOR - 1),
                          (tx0 - 3, FLOOR - 1)]), cape)
        cv.darken(cv.rect(tx0 - 3, sh + 2, tx1 + 3, FLOOR))   # its inside is in shade
    if L["hair"] == "long" and not back:
        cv.paint(cv.rbox(hx0 - 1, ht - 1, hx1 + 1, sh + 4, 3), hair)
    if L["hair"] == "twintails":
        cv.paint(cv.mirror(cv.ellipse(hx0 - 1.5, eye + 1, 1.8, 3.2)), hair)
    if L["hair"] == "bun":
        cv.paint(cv.ellipse(CX, ht - 1.2, 2.2, 1.8), hair)
    if L["hair"] == "topknot":
        cv.paint(cv.ellipse(CX, ht - 1.5, 1.6, 2.0), hair)

    # -- 2. legs and boots ---------------------------------------------------
    if bony:
        cv.paint(cv.srect(CX - 3, hip, CX - 2, FLOOR), skin)             # shin bones
        cv.paint(cv.srect(CX - 4, FLOOR - 1, CX - 2, FLOOR), skin)      # foot bones
    else:
        # Two legs with a gap between them (the gap fills with outline colour,
        # which is what makes the legs read as two legs).
        gap = 2
        lw = 2 if p["tw"] <= 8 else 3
        left_leg = cv.rect(CX - gap / 2 - lw, hip, CX - gap / 2, FLOOR)
        right_leg = left_leg[:, ::-1]
        bare_legs = L["bottom"] == "shorts" or L["top"] == "dress"
        for leg in (left_leg, right_leg):
            cv.paint(leg, skin if bare_legs else pants)
        if L["bottom"] == "shorts":
            cv.paint(cv.srect(CX - gap / 2 - lw, hip, CX - gap / 2, hip + 2), pants)
        boot_h = R["boot_h"]
        for sgn in (-1, 1):
            x_in, x_out = CX + sgn * gap / 2, CX + sgn * (gap / 2 + lw)
            lo, hi_ = min(x_in, x_out), max(x_in, x_out)
            boot = cv.rect(lo, FLOOR - boot_h, hi_, FLOOR)
            # the sole pokes out one unit sideways: chunky cartoon shoes
            boot |= cv.rect(lo - (sgn < 0), FLOOR - 1, hi_ + (sgn > 0), FLOOR)
            cv.paint(boot, boots)

    # -- 3. torso ------------------------------------------------------------
    top = person_top(L, kind)
    torso = cv.rect(tx0, sh, tx1, hip + 1)
    if top == "ribs":
        cv.paint(cv.rect(CX - 1, sh, CX + 1, hip + 1), skin)                # spine
        for r in range(int(sh) + 1, int(hip) - 1, 2):
            cv.paint(cv.rect(tx0 + 0.5 * (r > sh + 3), r, tx1 - 0.5 * (r > sh + 3), r + 1), skin)
        cv.paint(cv.rect(CX - 3, hip, CX + 3, hip + 1.5), skin)             # pelvis
    elif top == "bare":
        cv.paint(torso, skin)
        cv.paint(cv.line(tx0 + 1, sh + 0.5, tx1 - 1, hip - 0.5, 1.3), leather)  # strap
    elif top == "armour":
        cv.paint(torso, metal)
        if not back:
            cv.paint(cv.rect(CX - 1, sh + 1, CX + 1, sh + 3), accent, tone=BASE)  # chest crest
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip + 1), metal)                    # fauld plates
        cv.darken(cv.rect(tx0, hip - 1, tx1, hip - 0.5))
    else:  # tunic, dress, robe
        cv.paint(torso, cloth)
        if R["collar"] and not back:                                # open collar
            cv.paint(cv.poly([(CX - 1.5, sh), (CX + 1.5, sh), (CX, sh + 2.2)]), skin)
        if R["vest"]:                                               # a vest over it
            cv.paint(cv.srect(tx0, sh, CX - 1, hip + 1), accent)
    # Skirts and robes hang over the legs.
    if top == "robe":
        cv.paint(cv.poly([(tx0, hip - 1), (tx1, hip - 1), (tx1 + 2, FLOOR - 1),
                          (tx0 - 2, FLOOR - 1)]), cloth, cast=True)
        cv.paint(cv.poly([(tx0 - 1.5, FLOOR - 2), (tx1 + 1.5, FLOOR - 2), (tx1 + 2, FLOOR - 1),
                          (tx0 - 2, FLOOR - 1)]), trim if R["hem_trim"] else accent)  # hem trim
        if not back:
            cv.paint(cv.rect(CX - 1, sh + 2, CX + 1, FLOOR - 2),
                     accent if R["stripe_accent"] else trim)
    elif top == "dress" or L["bottom"] == "skirt":
        col = cloth if top == "dress" else pants
        hem = hip + R["hem"]
        cv.paint(cv.poly([(tx0, hip - 0.5), (tx1, hip - 0.5), (tx1 + 1.5, hem),
                          (tx0 - 1.5, hem)]), col, cast=True)
    if L["belt"] and top not in ("ribs", "robe"):
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip), leather, cast=True)
        if not back:
            cv.paint(cv.rect(CX - 1, hip - 1, CX + 1, hip), trim, tone=HI)  # buckle
    elif top == "robe":
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip), accent)                   # sash

    # -- 4. arms ------------------------------------------------------------
    for sgn in (-1, 1):
        x_in = tx0 if sgn < 0 else tx1
        x_out = x_in + sgn * aw
        lo, hi_ = min(x_in, x_out), max(x_in, x_out)
        arm = cv.rect(lo, sh + (0 if not bony else 0.5), hi_, hand_y)
        hand = cv.rect(lo, hand_y, hi_, hand_y + 2)
        if bony:
            cv.paint(arm | hand, skin)
            continue
        if top in ("bare",) or (L["sleeves"] == "short" and top == "tunic") or top == "dress":
            cv.paint(arm, skin)
            cv.paint(arm & cv.rect(0, sh, 32, sh + 2), cloth if top != "bare" else skin)
        elif top == "armour":
            cv.paint(arm, cloth)
            cv.paint(arm & cv.rect(0, hand_y - 2, 32, hand_y), metal)        # bracer
        else:
            cv.paint(arm, cloth)
            if top == "robe":                                                # wide cuff
                cv.paint(cv.rect(lo - (sgn < 0) * 0.5, hand_y - 1, hi_ + (sgn > 0) * 0.5, hand_y), accent)
        cv.paint(hand, skin)
    if top == "armour":                                                      # pauldrons
        cv.paint(cv.ellipse(tx0 - aw / 2, sh + 1, aw / 2 + 1.1, 1.7), metal, cast=True)
        cv.paint(cv.ellipse(tx1 + aw / 2, sh + 1, aw / 2 + 1.1, 1.7), metal, cast=True)

    # -- 5. head and face ----------------------------------------------------
    if back and L["cape"]:                # from behind, the cape hangs over the body
        cv.paint(cv.poly([(tx0 - 1, sh), (tx1 + 1, sh), (tx1 + 3, FLOOR - 1),
                          (tx0 - 3, FLOOR - 1)]), ramp(L["cape_col"]), cast=True)
    head = cv.rbox(hx0, ht, hx1, hb, 3.5)
    if kind in ("elf", "goblin", "orc"):
        span, lift = {"elf": (2.5, 2.5), "goblin": (4, 1.5), "orc": (1.6, 1.2)}[kind]
        ear = cv.poly([(hx0 + 0.5, eye - 1), (hx0 - span, eye - 1 - lift), (hx0 + 0.5, eye + 1.5)])
        cv.paint(cv.mirror(ear), skin)
    elif kind in ("human", "dwarf"):
        cv.paint(cv.srect(hx0 - 0.5, eye, hx0 + 0.5, eye + 2), skin)
    cv.paint(head, skin, cast=True)
    if back:
        draw_back_of_head(cv, p, L, hair, skin, bony)
    elif bony:
        # skull: narrower jaw, dark eye sockets with a glint, nose hole, teeth
        cv.erase(cv.srect(hx0, hb - 2, hx0 + 1, hb))
        cv.paint(cv.srect(CX - 3, eye - 1, CX - 1, eye + 1), ramp(BLACK), tone=BASE)
        if L["glow"] != BLACK:
            cv.paint(cv.srect(CX - 2, eye - 1, CX - 1, eye), flat(L["glow"]))
        cv.paint(cv.rect(CX - 0.5 * cv_unit(cv), eye + 1, CX + 0.5 * cv_unit(cv), eye + 2),
                 ramp(BLACK), tone=BASE)
        for x in range(int(hx0) + 2, int(hx1) - 2, 2):
            cv.paint(cv.rect(x, hb - 1, x + 1, hb), skin, tone=DEEP)
    else:
        g = L["eye_gap"] if p["hw"] >= 10 else 1
        iris = ramp(L["iris"])
        if L["eyes"] == "big":
            cv.paint(cv.srect(CX - g - 2, eye, CX - g, eye + 2), iris, tone=BASE)
            cv.paint(cv.rect(CX - g - 2, eye, CX - g - 1, eye + 1), flat(WHITE))
            cv.paint(cv.rect(CX + g, eye, CX + g + 1, eye + 1), flat(WHITE))
        elif L["eyes"] == "sclera":                    # white of the eye on the outside
            cv.paint(cv.srect(CX - g - 2, eye, CX - g, eye + 2), flat(WHITE))
            cv.paint(cv.srect(CX - g - 1, eye, CX - g, eye + 2), iris, tone=BASE)
        elif L["eyes"] == "tall":
            cv.paint(cv.srect(CX - g - 1, eye, CX - g, eye + 2), iris, tone=BASE)
        else:
            cv.paint(cv.srect(CX - g - 1, eye + 1, CX - g, eye + 2), iris, tone=BASE)
        if kind == "orc":
            cv.paint(cv.srect(CX - g - 2, eye - 1, CX - g, eye), skin, tone=DEEP)   # brow
            cv.paint(cv.srect(CX - 3, hb - 3, CX - 2, hb - 1), flat(WHITE))        # tusks
        elif L["mouth"]:
            cv.paint(cv.rect(CX - 1, eye + 2.5, CX + 1, eye + 3), skin, tone=DEEP)
        if kind == "goblin":
            cv.paint(cv.rect(CX - 1, eye + 1, CX + 1, eye + 2), skin, tone=SHADOW)  # nose
        if L["blush"]:
            cv.paint(cv.srect(CX - g - 3, eye + 2, CX - g - 2, eye + 3), flat(BLUSH))
    if L["beard"] and not back:
        long_beard = R["long_beard"]
        bottom = (sh + 3.5) if long_beard else hb + 0.5
        beard = cv.poly([(hx0 + 0.5, eye + 2), (hx1 - 0.5, eye + 2), (hx1 - 0.5, hb - 1),
                         (CX + 1, bottom), (CX - 1, bottom), (hx0 + 0.5, hb - 1)])
        cv.paint(beard & ~cv.rect(CX - 1, eye + 2, CX + 1, eye + 3) & ~cv.srect(
            CX - 3, eye, CX - 1, eye + 2), hair)

    # -- 6. hair -------------------------------------------------------------
    style = L["hair"]
    hood = L["head"] == "hood"
    if back:
        pass  # draw_back_of_head did the hair
    elif style not in ("bald", "tuft", "mohawk", "topknot") and not hood:
        cap = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, ht + 5, 2.5) & cv.rect(0, 0, 32, ht + 2)
        # bangs: a zig-zag fringe along the forehead
        fringe = cv.rect(hx0, ht + 2, hx1, ht + 3)
        for x in range(int(hx0) + 1, int(hx1), 3):
            fringe &= ~cv.rect(x, ht + 2, x + 1, ht + 3)
        sides_to = {"short": eye, "spiky": eye, "bun": eye, "long": hb + 2,
                    "bob": hb, "twintails": eye + 1}[style]
        sides = cv.srect(hx0 - 1, ht + 1, hx0 + 1, sides_to)
        shape = cap | fringe | sides
        if style == "spiky":
            for x in np.arange(hx0 - 1, hx1, 2.5):
                shape |= cv.poly([(x, ht + 0.5), (x + 2.5, ht + 0.5), (x + 0.8, ht - 2.2)])
        cv.paint(shape, hair, cast=True)
    elif style == "mohawk":
        cv.paint(cv.rect(CX - 1, ht - 2.5, CX + 1, ht + 2), hair, cast=True)
    elif style == "tuft":
        cv.paint(cv.poly([(CX - 1.5, ht + 0.5), (CX + 1.5, ht + 0.5), (CX + 2, ht - 2.5),
                          (CX, ht - 1)]), hair)

    # -- 7. headgear ---------------------------------------------------------
    hg = L["head"]
    if hg == "wizard":
        hat, band = cloth, accent
        tip = CX + L["hat_tip"]
        brim_y = ht + 1
        wizard_hat(cv, hx0, hx1, brim_y, tip, L["hat_h"], hat, band)
    elif hg == "hood":
        hood_col = cloth if L["archetype"] != "noble" else ramp(L["cape_col"])
        outer = cv.rbox(hx0 - 1, ht - 1.5, hx1 + 1, hb + 1.5, 3)
        if L["hood_point"]:
            outer |= cv.poly([(CX - 2, ht - 1), (CX + 2, ht - 1), (CX + 3.5, ht - 3.5)])
        face = cv.rbox(hx0 + 1, ht + 2, hx1 - 1, hb + 0.5, 3)
        if back:
            face = np.zeros_like(face)     # from behind, the hood covers the whole head
        cv.paint(outer & ~face, hood_col, cast=True)
        cv.paint(cv.rect(tx0 - 1, sh, tx1 + 1, sh + 2) & ~head, hood_col, cast=True)  # mantle
        cv.darken(face & cv.rect(0, ht + 2, 32, ht + 3))   # shadow under the hood's rim
    elif hg == "helmet":
        kindh = L["helmet"]
        if kindh == "horned":
            horn = cv.poly([(hx0 + 1, ht + 2), (hx0 - 2.5, ht - 0.5), (hx0 - 1.5, ht - 3.5),
                            (hx0 - 1, ht + 0.5)])
            cv.paint(cv.mirror(horn), ramp(BONE[0]))
        if kindh == "plume":
            cv.paint(cv.ellipse(CX, ht - 1.5, 1.2, 2.6), accent)
        dome = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, eye + 1.5, 2.5) & cv.rect(0, 0, 32, eye)
        if kindh == "visor" or back:
            dome = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, hb + 0.5, 3)
        cv.paint(dome, metal, cast=True)
        cv.paint(cv.rect(hx0 - 1, eye - 1, hx1 + 1, eye), metal, tone=SHADOW)        # rim
        if kindh == "visor" and not back:
            cv.paint(cv.rect(hx0 + 1, eye, hx1 - 1, eye + 1), ramp(BLACK), tone=BASE)
            cv.paint(cv.rect(CX - 0.5 * cv_unit(cv), eye + 1, CX + 0.5 * cv_unit(cv), hb - 1),
                     ramp(BLACK), tone=BASE)
        if kindh == "spike":
            cv.paint(cv.poly([(CX - 1.5, ht - 0.5), (CX + 1.5, ht - 0.5), (CX, ht - 3.5)]),
                     metal)
    elif hg == "crown":
        gold = ramp(METAL["gold"])
        base_y = ht - (0 if style == "bald" else 1)
        crown = cv.rect(hx0 + 1, base_y - 1.5, hx1 - 1, base_y + 0.5)
        for x in (hx0 + 1, CX - 1, hx1 - 2):
            crown |= cv.rect(x, base_y - 3, x + (2 if x == CX - 1 else 1), base_y - 1)
        cv.paint(crown, gold, cast=True)
        cv.paint(cv.rect(CX - 1, base_y - 1, CX + 1, base_y), flat(L["gem"]))
    elif hg == "bandana":
        cv.paint(cv.rect(hx0 - 1, ht + 1, hx1 + 1, ht + 2.5), accent, cast=True)
        cv.paint(cv.poly([(hx1, ht + 1.5), (hx1 + 2.5, ht + 3.5), (hx1 + 1.5, ht + 4)]), accent)

    # -- 8. held items -------------------------------------------------------
    draw_left_item(cv, L, ax0, sh, hip, hand_y, ht, skin, aw)
    if L["right"] == "shield":
        inside = dict(L, emblem="none")  # the back of a shield: straps on wood, no emblem
        draw_shield(cv, inside if back else L, tx1 + aw, sh, hip, metal,
                    ramp(WOOD[1]) if back else accent, trim)
    if L["cape"] and not back:                           # clasp at the collarbone
        cv.paint(cv.srect(CX - 2.5, sh, CX - 1, sh + 1), trim, tone=HI)
    return dict(kind=kind, archetype=L["archetype"])


def draw_back_of_head(cv, p, L, hair, skin, bony):
    """The hair seen from behind: it covers the head (long hair down over the shoulders)."""
    style, ht, hb, sh, eye = L["hair"], p["ht"], p["hb"], p["sh"], p["eye"]
    hx0, hx1 = p["hx0"], p["hx1"]
    if bony or style == "bald" or L["head"] == "hood":
        return
    if style == "mohawk":
        cv.paint(cv.rect(CX - 1, ht - 2.5, CX + 1, hb - 1), hair, cast=True)
        return
    if style == "tuft":
        cv.paint(cv.poly([(CX - 1.5, ht + 0.5), (CX + 1.5, ht + 0.5), (CX + 2, ht - 2.5),
                          (CX, ht - 1)]), hair)
        return
    if style == "topknot":
        cv.paint(cv.ellipse(CX, ht - 1.5, 1.6, 2.0), hair)
        return
    bottom = {"short": hb - 1, "spiky": hb - 1, "bun": hb - 1, "long": sh + 4, "bob": hb,
              "twintails": hb - 1}[style]
    shape = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, bottom, 3 if style == "long" else 2.5)
    if style == "spiky":
        for x in np.arange(hx0 - 1, hx1, 2.5):
            shape |= cv.poly([(x, ht + 0.5), (x + 2.5, ht + 0.5), (x + 0.8, ht - 2.2)])
    cv.paint(shape, hair, cast=True)
    if style == "bun":
        cv.paint(cv.ellipse(CX, ht + 0.5, 2.2, 1.8), hair, tone=SHADOW)
    if style == "twintails":
        cv.paint(cv.mirror(cv.ellipse(hx0 - 1.5, eye + 1, 1.8, 3.2)), hair)


def draw_person_side(cv, p, L, R, kind, swap=False):
    """A person in profile, facing the viewer's left: one eye, the near arm over a torso
    seen edge-on, the far hand's item behind the body. The character's left hand is near
    (its shield, say); swap=True draws the other hand near, for the mirrored right view."""
    skin, cloth, accent, leather, pants, boots, metal, trim, hair = person_ramps(L)
    bony = kind == "skeleton"
    hip, sh, ht, hb, eye = p["hip"], p["sh"], p["ht"], p["hb"], p["eye"]
    hx0, hx1 = p["hx0"], p["hx1"]
    depth = 2 * max(2, round(p["tw"] * 0.3))        # a body is thinner than it is wide
    tx0, tx1 = CX - depth / 2, CX + depth / 2
    aw = 1 if bony else p["arm"]
    ax0 = CX - aw / 2
    near, far = (L["left"], L["right"]) if swap else (L["right"], L["left"])
    top = person_top(L, kind)

    # -- behind the body: the far hand's item, cape, hair at the back -------
    if far == "shield":
        cv.paint(cv.rbox(tx1 - 1, sh + 1, tx1 + 2, hip + 1.5, 4), trim)
    elif far != "none":
        draw_left_item(cv, dict(L, left=far), CX + 2, sh, hip, hip, ht, skin, aw)
    if L["cape"]:
        cv.paint(cv.poly([(tx1 - 1, sh), (tx1 + 1, sh), (tx1 + 4, FLOOR - 1),
                          (tx0, FLOOR - 1)]), ramp(L["cape_col"]))
        cv.darken(cv.rect(tx0, sh + 2, tx1 + 4, FLOOR))
    if L["hair"] == "long":
        cv.paint(cv.rbox(CX - 1, ht - 1, hx1 + 1, sh + 4, 3), hair)
    if L["hair"] == "twintails":
        cv.paint(cv.ellipse(hx1 + 0.5, eye + 1, 1.8, 3.2), hair)
    if L["hair"] == "bun":
        cv.paint(cv.ellipse(hx1 - 0.5, ht + 0.5, 2.2, 1.8), hair)
    if L["hair"] == "topknot":
        cv.paint(cv.ellipse(CX + 1, ht - 1.5, 1.6, 2.0), hair)
    draw_side_legs(cv, p, L, R, skin, pants, boots, bony)
    draw_side_torso(cv, p, L, R, top, (tx0, tx1), (skin, cloth, accent, leather, pants, metal,
                                                   trim))
    # -- the near arm ----------------------------------------------------------
    arm = cv.rect(ax0, sh + 0.5 * bony, ax0 + aw, hip)
    hand = cv.rect(ax0, hip, ax0 + aw, hip + 2)
    if bony:
        cv.paint(arm | hand, skin)
    else:
        if top == "bare" or (L["sleeves"] == "short" and top == "tunic") or top == "dress":
            cv.paint(arm, skin)
            cv.paint(arm & cv.rect(0, sh, 32, sh + 2), cloth if top != "bare" else skin)
        elif top == "armour":
            cv.paint(arm, cloth)
            cv.paint(arm & cv.rect(0, hip - 2, 32, hip), metal)
        else:
            cv.paint(arm, cloth)
            if top == "robe":
                cv.paint(cv.rect(ax0 - 0.5, hip - 1, ax0 + aw + 0.5, hip), accent)
        cv.paint(hand, skin)
    if top == "armour":
        cv.paint(cv.ellipse(CX, sh + 1, aw / 2 + 1.1, 1.7), metal, cast=True)
    draw_side_head(cv, p, L, R, kind, skin, hair)
    draw_side_headgear(cv, p, L, hair, (cloth, accent, metal, ramp(L["cape_col"])), (tx0, tx1))
    # -- the near hand's item, in front of everything ---------------------------
    if near == "shield":
        draw_shield(cv, L, CX + 0.5, sh, hip, metal, accent, trim)
    elif near != "none":
        draw_left_item(cv, dict(L, left=near), ax0, sh, hip, hip, ht, skin, aw)
    if L["cape"]:                                        # the clasp at the throat
        cv.paint(cv.rect(tx0, sh, tx0 + 1, sh + 1), trim, tone=HI)
    return dict(kind=kind, archetype=L["archetype"])


def draw_side_legs(cv, p, L, R, skin, pants, boots, bony):
    """Two legs in profile, the far one a step behind and in shade; toes point forward."""
    hip = p["hip"]
    if bony:
        cv.paint(cv.rect(CX, hip, CX + 1, FLOOR), skin)
        cv.darken(cv.rect(CX, hip, CX + 1, FLOOR))
        cv.paint(cv.rect(CX - 1, hip, CX, FLOOR), skin)
        cv.paint(cv.rect(CX - 3, FLOOR - 1, CX, FLOOR), skin)
        return
    lw = 2 if p["tw"] <= 8 else 3
    bare_legs = L["bottom"] == "shorts" or L["top"] == "dress"
    for shift in (1, 0):                                # far leg first
        x0, x1 = CX - lw + shift, CX + shift
        cv.paint(cv.rect(x0, hip, x1, FLOOR), skin if bare_legs else pants)
        if L["bottom"] == "shorts":
            cv.paint(cv.rect(x0, hip, x1, hip + 2), pants)
        boot = cv.rect(x0, FLOOR - R["boot_h"], x1, FLOOR) | cv.rect(x0 - 1, FLOOR - 1, x1, FLOOR)
        cv.paint(boot, boots)
        if shift:
            cv.darken(cv.rect(x0, hip, x1, FLOOR))


def draw_side_torso(cv, p, L, R, top, span, ramps):
    """The torso seen edge-on: the same garment, its front on the left."""
    skin, cloth, accent, leather, pants, metal, trim = ramps
    (tx0, tx1), hip, sh = span, p["hip"], p["sh"]
    torso = cv.rect(tx0, sh, tx1, hip + 1)
    if top == "ribs":
        cv.paint(cv.rect(tx1 - 1, sh, tx1, hip + 1), skin)                  # spine at the back
        for r in range(int(sh) + 1, int(hip) - 1, 2):
            cv.paint(cv.rect(tx0 + 0.5, r, tx1, r + 1), skin)
        cv.paint(cv.rect(tx0, hip, tx1, hip + 1.5), skin)
    elif top == "bare":
        cv.paint(torso, skin)
        cv.paint(cv.line(tx0 + 0.5, sh + 0.5, tx1 - 0.5, hip - 0.5, 1.3), leather)
    elif top == "armour":
        cv.paint(torso, metal)
        cv.paint(cv.rect(tx0, sh + 1, tx0 + 1, sh + 3), accent, tone=BASE)  # the crest's edge
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip + 1), metal)
        cv.darken(cv.rect(tx0, hip - 1, tx1, hip - 0.5))
    else:
        cv.paint(torso, cloth)
        if R["vest"]:
            cv.paint(cv.rect(CX, sh, tx1, hip + 1), accent)
        if R["collar"]:
            cv.paint(cv.rect(tx0, sh, tx0 + 1, sh + 1.5), skin)
    if top == "robe":
        cv.paint(cv.poly([(tx0, hip - 1), (tx1, hip - 1), (tx1 + 1.5, FLOOR - 1),
                          (tx0 - 1.5, FLOOR - 1)]), cloth, cast=True)
        cv.paint(cv.poly([(tx0 - 1, FLOOR - 2), (tx1 + 1, FLOOR - 2), (tx1 + 1.5, FLOOR - 1),
                          (tx0 - 1.5, FLOOR - 1)]), trim if R["hem_trim"] else accent)
        cv.paint(cv.rect(tx0 - 0.5, sh + 2, tx0 + 0.5, FLOOR - 2),
                 accent if R["stripe_accent"] else trim)
    elif top == "dress" or L["bottom"] == "skirt":
        hem = hip + R["hem"]
        cv.paint(cv.poly([(tx0, hip - 0.5), (tx1, hip - 0.5), (tx1 + 1, hem), (tx0 - 1, hem)]),
                 cloth if top == "dress" else pants, cast=True)
    if L["belt"] and top not in ("ribs", "robe"):
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip), leather, cast=True)
        cv.paint(cv.rect(tx0, hip - 1, tx0 + 1, hip), trim, tone=HI)       # the buckle, in front
    elif top == "robe":
        cv.paint(cv.rect(tx0, hip - 1, tx1, hip), accent)


def draw_side_head(cv, p, L, R, kind, skin, hair):
    """A head in profile: nose and one eye at the front (left), the ear behind them."""
    ht, hb, eye, sh = p["ht"], p["hb"], p["eye"], p["sh"]
    hx0, hx1 = p["hx0"], p["hx1"]
    dark = ramp(BLACK)
    cv.paint(cv.rbox(hx0, ht, hx1, hb, 3.5), skin, cast=True)
    if kind == "skeleton":
        cv.erase(cv.rect(hx1 - 1, hb - 2, hx1, hb))                           # the jaw
        cv.paint(cv.rect(hx0 + 1, eye - 1, hx0 + 3, eye + 1), dark, tone=BASE)
        if L["glow"] != BLACK:
            cv.paint(cv.rect(hx0 + 1, eye - 1, hx0 + 2, eye), flat(L["glow"]))
        cv.paint(cv.rect(hx0, eye + 1, hx0 + 1, eye + 2), dark, tone=BASE)  # nose hole
        cv.paint(cv.rect(hx0 + 1, hb - 1, hx0 + 2, hb), skin, tone=DEEP)
    else:
        nose = 2 if kind == "goblin" else 1
        cv.paint(cv.rect(hx0 - nose, eye + 1, hx0, eye + 2), skin, tone=BASE)
        iris = ramp(L["iris"])
        x = hx0 + 1
        if L["eyes"] == "big":
            cv.paint(cv.rect(x, eye, x + 2, eye + 2), iris, tone=BASE)
            cv.paint(cv.rect(x, eye, x + 1, eye + 1), flat(WHITE))
        elif L["eyes"] == "sclera":
            cv.paint(cv.rect(x, eye, x + 2, eye + 2), flat(WHITE))
            cv.paint(cv.rect(x, eye, x + 1, eye + 2), iris, tone=BASE)
        elif L["eyes"] == "tall":
            cv.paint(cv.rect(x, eye, x + 1, eye + 2), iris, tone=BASE)
        else:
            cv.paint(cv.rect(x, eye + 1, x + 1, eye + 2), iris, tone=BASE)
        if kind == "orc":
            cv.paint(cv.rect(x - 1, eye - 1, x + 2, eye), skin, tone=DEEP)       # brow
            cv.paint(cv.rect(x, hb - 3, x + 1, hb - 1), flat(WHITE))             # tusk
        elif L["mouth"]:
            cv.paint(cv.rect(hx0, eye + 2.5, hx0 + 1.5, eye + 3), skin, tone=DEEP)
        if L["blush"]:
            cv.paint(cv.rect(x + 1, eye + 2, x + 2, eye + 3), flat(BLUSH))
    if kind in ("elf", "goblin", "orc"):
        span, lift = {"elf": (2.5, 2.5), "goblin": (4, 1.5), "orc": (1.6, 1.2)}[kind]
        ear = cv.poly([(CX + 0.5, eye - 1), (CX + 1.5 + span, eye - 1 - lift),
                       (CX + 1.5, eye + 1.5)])
        cv.paint(ear, skin, tone=SHADOW)
    elif kind in ("human", "dwarf"):
        cv.paint(cv.rect(CX + 0.5, eye, CX + 1.5, eye + 2), skin, tone=SHADOW)
    if L["beard"]:
        bottom = (sh + 3.5) if R["long_beard"] else hb + 0.5
        cv.paint(cv.poly([(hx0, eye + 2), (CX + 1.5, eye + 2), (CX + 0.5, hb),
                          (hx0 + 1.5, bottom), (hx0, hb - 1)]), hair)
    style = L["hair"]
    if style not in ("bald", "tuft", "mohawk", "topknot") and L["head"] != "hood":
        sides_to = {"short": eye, "spiky": eye, "bun": eye, "long": hb + 2,
                    "bob": hb, "twintails": eye + 1}[style]
        shape = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, ht + 5, 2.5) & cv.rect(0, 0, 32, ht + 2)
        shape |= cv.rect(hx0, ht + 2, hx0 + 2, ht + 3) | cv.rect(CX + 1.5, ht + 1, hx1 + 1,
                                                                  sides_to)
        if style == "spiky":
            for x in np.arange(hx0 - 1, hx1, 2.5):
                shape |= cv.poly([(x, ht + 0.5), (x + 2.5, ht + 0.5), (x + 2.2, ht - 2.2)])
        cv.paint(shape, hair, cast=True)
    elif style == "mohawk":
        cv.paint(cv.rect(hx0 + 1, ht - 2.5, hx1 - 1, ht + 1), hair, cast=True)
    elif style == "tuft":
        cv.paint(cv.poly([(CX - 1.5, ht + 0.5), (CX + 1.5, ht + 0.5), (CX + 2, ht - 2.5),
                          (CX, ht - 1)]), hair)


def draw_side_headgear(cv, p, L, hair, ramps, span):
    """Hat, hood, helmet, crown or bandana in profile; points and tails lean back."""
    cloth, accent, metal, cape = ramps
    ht, hb, eye, sh = p["ht"], p["hb"], p["eye"], p["sh"]
    hx0, hx1 = p["hx0"], p["hx1"]
    hg = L["head"]
    if hg == "wizard":
        tip = CX + abs(L["hat_tip"]) + 1
        brim_y = ht + 1
        wizard_hat(cv, hx0, hx1, brim_y, tip, L["hat_h"], cloth, accent)
    elif hg == "hood":
        hood_col = cloth if L["archetype"] != "noble" else cape
        outer = cv.rbox(hx0 - 1, ht - 1.5, hx1 + 1, hb + 1.5, 3)
        if L["hood_point"]:
            outer |= cv.poly([(CX, ht - 1), (CX + 3, ht - 1), (hx1 + 2.5, ht - 3)])
        face = cv.rbox(hx0 - 1, ht + 2, CX + 0.5, hb + 0.5, 3)
        cv.paint(outer & ~face, hood_col, cast=True)
        cv.paint(cv.rect(span[0] - 1, sh, span[1] + 1, sh + 2) & ~face, hood_col, cast=True)
        cv.darken(face & cv.rect(0, ht + 2, 32, ht + 3))
    elif hg == "helmet":
        kindh = L["helmet"]
        if kindh == "horned":
            cv.paint(cv.poly([(CX - 1, ht + 1), (CX - 3, ht - 1), (CX - 2.5, ht - 3.5),
                              (CX, ht)]), ramp(BONE[0]))
        if kindh == "plume":
            cv.paint(cv.ellipse(CX + 1, ht - 1.5, 2.6, 1.2), accent)
        dome = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, eye + 1.5, 2.5) & cv.rect(0, 0, 32, eye)
        if kindh == "visor":
            dome = cv.rbox(hx0 - 1, ht - 1, hx1 + 1, hb + 0.5, 3)
        cv.paint(dome, metal, cast=True)
        cv.paint(cv.rect(hx0 - 1, eye - 1, hx1 + 1, eye), metal, tone=SHADOW)
        if kindh == "visor":
            cv.paint(cv.rect(hx0 - 1, eye, hx0 + 2, eye + 1), ramp(BLACK), tone=BASE)
        if kindh == "spike":
            cv.paint(cv.poly([(CX - 1.5, ht - 0.5), (CX + 1.5, ht - 0.5), (CX, ht - 3.5)]),
                     metal)
    elif hg == "crown":
        base_y = ht - (0 if L["hair"] == "bald" else 1)
        crown = cv.rect(hx0 + 2, base_y - 1.5, hx1 - 2, base_y + 0.5)
        for x in (hx0 + 2, CX - 0.5, hx1 - 3):
            crown |= cv.rect(x, base_y - 3, x + 1, base_y - 1)
        cv.paint(crown, ramp(METAL["gold"]), cast=True)
        cv.paint(cv.rect(hx0 + 2, base_y - 1, hx0 + 3, base_y), flat(L["gem"]))
    elif hg == "bandana":
        cv.paint(cv.rect(hx0 - 1, ht + 1, hx1 + 1, ht + 2.5), accent, cast=True)
        cv.paint(cv.poly([(hx1, ht + 1.5), (hx1 + 2.5, ht + 3.5), (hx1 + 1.5, ht + 4)]), accent)


def cv_unit(cv):
    """Width in design units of one canvas pixel (1 on grid 32, 0.5 on grid 64)."""
    return 1.0 / cv.scale


def draw_left_item(cv, L, ax0, sh, hip, hand_y, ht, skin, aw):
    """The item in the viewer's left hand, held just outside the arm."""
    item = L["left"]
    if item == "none":
        return
    x = ax0 - 1                        # the column the item's shaft runs along
    wood, metal = ramp(WOOD[0]), ramp(METAL["steel"])
    gold = ramp(METAL[L["trim"]])
    if item == "sword":
        cv.paint(cv.rect(x, hand_y - 8, x + 1, hand_y), metal)                  # blade
        cv.paint(cv.rect(x, hand_y - 8, x + 1, hand_y - 7), metal, tone=HI)     # tip glint
        cv.paint(cv.rect(x - 1, hand_y - 1, x + 2, hand_y), gold)               # guard
        cv.paint(cv.rect(x, hand_y + 2, x + 1, hand_y + 3), gold)                # pommel
    elif item == "dagger":
        cv.paint(cv.rect(x, hand_y - 4, x + 1, hand_y), metal)
        cv.paint(cv.rect(x - 0.5, hand_y - 1, x + 1.5, hand_y), gold)
    elif item == "axe":
        cv.paint(cv.rect(x, hand_y - 7, x + 1, hand_y + 3), wood)               # haft
        cv.paint(cv.poly([(x, hand_y - 7.5), (x - 3, hand_y - 9), (x - 3, hand_y - 4),
                          (x, hand_y - 5.5)]), metal)                           # head
    elif item == "staff":
        top = max(ht - 1, 4)
        if L["topper"] == "crook":
            cv.paint(cv.rect(x, top, x + 1, FLOOR), wood)
            cv.paint(cv.rect(x - 2, top - 1, x + 1, top), wood)
            cv.paint(cv.rect(x - 2, top, x - 1, top + 1.5), wood)
        else:
            cv.paint(cv.rect(x, top, x + 1, FLOOR), wood)
            if L["topper"] == "orb":
                cv.paint(cv.ellipse(x + 0.5, top - 1.2, 1.6, 1.6), ramp(L["gem"]))
            else:
                cv.paint(cv.poly([(x + 0.5, top - 4), (x + 2, top - 1.5), (x + 0.5, top + 0.5),
                                  (x - 1, top - 1.5)]), ramp(L["gem"]))
    elif item == "wand":
        cv.paint(cv.rect(x, hand_y - 4, x + 1, hand_y + 2), wood)
        cv.paint(cv.rect(x - 0.5, hand_y - 6, x + 1.5, hand_y - 4), flat(L["gem"]))
    elif item == "bow":
        top, bot = hand_y - 7, min(hip + 6, FLOOR - 1)
        mid = (top + bot) / 2
        bow = (cv.line(x + 0.5, top, x - 2, mid - 2.5, 1.2) | cv.line(x - 2, mid - 2.5, x - 2, mid + 2.5, 1.2)
               | cv.line(x - 2, mid + 2.5, x + 0.5, bot, 1.2))
        cv.paint(cv.rect(x, top, x + 1, bot), ramp("#e6e0cc"), tone=BASE)      # string
        cv.paint(bow, wood)
    # The hand is repainted on top, one unit wider, so it grips the item.
    cv.paint(cv.rect(x, hand_y, ax0 + aw, hand_y + 2), skin)


def draw_shield(cv, L, x_out, sh, hip, metal, accent, trim):
    """A shield strapped to the viewer's right arm."""
    cx = x_out - 0.5
    cy = (sh + hip) / 2 + 1
    shape = L["shield"]
    if shape == "round":
        outer = cv.ellipse(cx, cy, 3.1, 3.1)
        inner = cv.ellipse(cx, cy, 2.1, 2.1)
    elif shape == "heater":
        outer = cv.poly([(cx - 3, cy - 3.5), (cx + 3, cy - 3.5), (cx + 3, cy + 0.5),
                         (cx, cy + 4), (cx - 3, cy + 0.5)])
        inner = cv.poly([(cx - 2, cy - 2.5), (cx + 2, cy - 2.5), (cx + 2, cy + 0.3),
                         (cx, cy + 2.7), (cx - 2, cy + 0.3)])
    else:
        outer = cv.poly([(cx, cy - 4.5), (cx + 3, cy - 1.5), (cx, cy + 4.5), (cx - 3, cy - 1.5)])
        inner = cv.poly([(cx, cy - 3), (cx + 2, cy - 1.2), (cx, cy + 3), (cx - 2, cy - 1.2)])
    cv.paint(outer, trim)
    cv.paint(inner, accent)
    if L["emblem"] == "boss":
        cv.paint(cv.ellipse(cx, cy, 0.9, 0.9), metal, tone=HI)
    elif L["emblem"] == "cross":
        cv.paint((cv.rect(cx - 0.5, cy - 2, cx + 0.5, cy + 2) |
                  cv.rect(cx - 1.5, cy - 1, cx + 1.5, cy)) & inner, trim, tone=HI)
    elif L["emblem"] == "stripe":
        cv.paint(cv.line(cx - 2, cy - 2, cx + 2, cy + 2, 1.1) & inner, trim, tone=BASE)


# --------------------------------------------------------------------------
# Slimes
# --------------------------------------------------------------------------
def draw_slime(cv, d, facing="front"):
    """A jelly blob with a face; sometimes royal, sometimes wizardly. From the back it
    shows no face; in profile ("side"/"side_far_left") one eye near its front (left)."""
    side, back = facing.startswith("side"), facing == "back"
    body = ramp(d.pick(SLIME))
    w = d.pick([12, 14, 16, 18])
    h = d.pick([9, 10, 11, 12, 13])
    top = FLOOR - h
    shape = cv.ellipse(CX, FLOOR - h * 0.55, w / 2, h * 0.58, d.pick([2.0, 2.4, 3.0]))
    if d.chance(0.5):                                   # a teardrop tip
        shape |= cv.poly([(CX - 3, top + 2.5), (CX + 3, top + 2.5), (CX + 0.5, top - 2.5)])
        top -= 2.5
    if d.chance(0.5):                                   # drips at the sides
        shape |= cv.mirror(cv.ellipse(CX - w / 2 - 0.2, FLOOR - 1, 1.6, 1.2))
    cv.paint(shape, body, soft=2)
    # A bright specular glint on the top-left.
    gx, gy = CX - w / 4 - 0.5, FLOOR - h * 0.8
    cv.paint(cv.rect(gx, gy, gx + 2, gy + 1) | cv.rect(gx, gy + 1, gx + 1, gy + 2), flat(WHITE))
    # Face.
    eye = FLOOR - h * 0.45
    gap = d.pick([1, 2])
    style = d.pick(["big", "big", "happy", "tall"])
    dark = ramp(BLACK)
    ex = CX - w / 2 + 2                                 # the profile's eye column
    if back:
        pass
    elif side:
        draw_slime_profile_face(cv, ex, eye, style, dark)
    elif style == "big":
        cv.paint(cv.srect(CX - gap - 2, eye - 1, CX - gap, eye + 2), dark, tone=BASE)
        cv.paint(cv.rect(CX - gap - 2, eye - 1, CX - gap - 1, eye), flat(WHITE))
        cv.paint(cv.rect(CX + gap, eye - 1, CX + gap + 1, eye), flat(WHITE))
    elif style == "tall":
        cv.paint(cv.srect(CX - gap - 1, eye - 1, CX - gap, eye + 1), dark, tone=BASE)
    else:                                               # ^ ^ closed happy eyes
        cv.paint(cv.srect(CX - gap - 2, eye, CX - gap - 1, eye + 1) |
                 cv.srect(CX - gap - 1, eye - 1, CX - gap, eye), dark, tone=BASE)
    mouth = d.pick(["smile", "open", "none"])
    mx = ex - 1 if side else CX - 1                     # the mouth's left edge
    if back:
        pass
    elif mouth == "smile":
        cv.paint(cv.rect(mx, eye + 2.5, mx + 2, eye + 3), dark, tone=BASE)
    elif mouth == "open":
        cv.paint(cv.rect(mx, eye + 2, mx + 2, eye + 3.5), flat("#a83050"))
    blush = d.chance(0.4)
    if blush and side:
        cv.paint(cv.rect(ex + 2, eye + 1.5, ex + 4, eye + 2.5), flat(BLUSH))
    elif blush and not back:
        cv.paint(cv.srect(CX - gap - 4, eye + 1.5, CX - gap - 2, eye + 2.5), flat(BLUSH))
    # Headgear perched on top.
    gear = d.pick(["none", "none", "crown", "wizard", "helmet", "sprout", "bow"])
    if gear == "crown":
        gold = ramp(METAL["gold"])
        crown = cv.rect(CX - 3, top - 0.5, CX + 3, top + 1.5)
        for x in (CX - 3, CX - 1, CX + 2):
            crown |= cv.rect(x, top - 2, x + (2 if x == CX - 1 else 1), top)
        cv.paint(crown, gold, cast=True)
        cv.paint(cv.rect(CX - 1, top, CX + 1, top + 1), flat(d.pick(GEM)))
    elif gear == "wizard":
        hat = ramp(d.pick(CLOTH))
        tip = CX + d.pick([-3, 3, 2])
        cv.paint(cv.poly([(CX - 3, top + 1), (CX + 3, top + 1), (tip, top - 5)]), hat)
        cv.paint(cv.rbox(CX - 5, top + 0.5, CX + 5, top + 2, 6), hat, cast=True)
    elif gear == "helmet":
        cv.paint(cv.rbox(CX - 4, top - 1.5, CX + 4, top + 3.5, 2.5) & cv.rect(0, 0, 32, top + 2),
                 ramp(METAL[d.pick(["steel", "iron", "bronze"])]), cast=True)
    elif gear == "sprout":
        leaf = ramp("#62c44a")
        cv.paint(cv.rect(CX - 0.5 * cv_unit(cv), top - 2, CX + 0.5 * cv_unit(cv), top + 1), leaf)
        cv.paint(cv.mirror(cv.ellipse(CX - 1.6, top - 2.2, 1.5, 0.9)), leaf)
    elif gear == "bow":
        ribbon = ramp(d.pick(["#e04070", "#f070b0", "#4a90d9", "#e0b83a"]))
        cv.paint(cv.mirror(cv.poly([(CX, top + 1), (CX - 3, top - 1), (CX - 3, top + 2.5)])),
                 ribbon, cast=True)
        cv.paint(cv.rect(CX - 1, top, CX + 1, top + 1.5), ribbon, tone=SHADOW)
    return dict(kind="slime", archetype="slime")


def draw_slime_profile_face(cv, ex, eye, style, dark):
    """A slime's one visible eye, at column ex."""
    if style == "big":
        cv.paint(cv.rect(ex, eye - 1, ex + 2, eye + 2), dark, tone=BASE)
        cv.paint(cv.rect(ex, eye - 1, ex + 1, eye), flat(WHITE))
    elif style == "tall":
        cv.paint(cv.rect(ex, eye - 1, ex + 1, eye + 1), dark, tone=BASE)
    else:
        cv.paint(cv.rect(ex, eye, ex + 1, eye + 1) | cv.rect(ex + 1, eye - 1, ex + 2, eye), dark,
                 tone=BASE)


# --------------------------------------------------------------------------
# Robots
# --------------------------------------------------------------------------
def draw_robot(cv, d, facing="front"):
    """A boxy automaton: screen face, antenna, chest panel, jointed limbs. From the back
    its head and chest show vents; in profile ("side"/"side_far_left") a narrower box
    with one eye light at its front (left)."""
    side, back = facing.startswith("side"), facing == "back"
    shell = ramp(d.pick(ROBOT_BODY))
    joint = ramp(METAL["dark"])
    glow = flat(d.pick(GLOW))
    screen = ramp("#2a3040")
    hw = d.pick([8, 10, 10, 12])
    hh = d.pick([6, 7, 8])
    tw = d.pick([8, 10])
    th = d.pick([5, 6])
    legs = d.pick([4, 5, 6])
    treads = d.chance(0.2)
    if treads:
        legs = 4
    if side:                     # seen edge-on, the boxes are narrower
        hw, tw = hw - 2, tw - 4
    hip = FLOOR - legs
    sh = hip - th
    hb = sh                      # robots have a neck joint instead of a chin overlap
    ht = hb - hh - 1
    hx0, hx1 = CX - hw / 2, CX + hw / 2
    tx0, tx1 = CX - tw / 2, CX + tw / 2
    # Legs or treads.
    if treads:
        cv.paint(cv.rbox(CX - tw / 2 - 2, hip + 0.5, CX + tw / 2 + 2, FLOOR, 6), joint)
        for x in np.arange(CX - tw / 2 - 0.5, CX + tw / 2 + 1, 2.5):
            cv.paint(cv.ellipse(x, hip + 2.2, 0.8, 0.8), shell, tone=HI)
    elif side:
        cv.paint(cv.rect(CX - 1, hip, CX + 1, FLOOR - 2), joint)
        cv.paint(cv.rect(CX - 3, FLOOR - 2, CX + 1.5, FLOOR), shell)
    else:
        cv.paint(cv.srect(CX - 3, hip, CX - 1, FLOOR - 2), joint)
        cv.paint(cv.srect(CX - 4.5, FLOOR - 2, CX - 0.5, FLOOR), shell)
    # Torso with a chest panel of lights (a vent grille on the back).
    cv.paint(cv.rect(CX - 1, hb, CX + 1, sh + 1), joint)            # neck
    cv.paint(cv.rbox(tx0, sh, tx1, hip + 1, 6), shell, cast=True)
    panel = cv.rect(CX - 2, sh + 1.5, CX + 2, sh + 3.5)
    if side:
        panel = cv.rect(tx0, sh + 1.5, tx0 + 1, sh + 3.5)
    if not back:
        cv.paint(panel, screen, tone=BASE)
    else:
        cv.paint(cv.rect(CX - 2, sh + 1.5, CX + 2, sh + 2) | cv.rect(CX - 2, sh + 3, CX + 2,
                                                                     sh + 3.5), joint)
    for i, x in enumerate((CX - 1.5, CX + 0.5)):
        light = glow if i == 0 else flat(d.pick(GLOW))
        if not back and (not side or i == 0):
            cv.paint(cv.rect(tx0 if side else x, sh + 2, (tx0 if side else x) + 1, sh + 3), light)
    # Arms: shoulder ball, upper arm, elbow, forearm, claw (in profile, the near one).
    for sgn in ((0,) if side else (-1, 1)):
        x_in = tx0 if sgn < 0 else tx1
        lo, hi_ = (x_in - 2, x_in) if sgn < 0 else (x_in, x_in + 2)
        if side:
            lo, hi_ = CX - 1, CX + 1
        cv.paint(cv.rect(lo, sh + 1, hi_, sh + 3), shell)
        cv.paint(cv.rect(lo + 0.5, sh + 3, hi_ - 0.5, sh + 4), joint)
        cv.paint(cv.rect(lo, sh + 4, hi_, hip), shell)
        cv.paint(cv.rect(lo, hip, hi_, hip + 1.5), joint)
        cv.paint(cv.ellipse((lo + hi_) / 2, sh + 1, 1.6, 1.4), shell, cast=True)
    # Head: a box with a screen face and little bolts.
    if side:
        cv.paint(cv.rect(CX - 0.5, ht + 2, CX + 0.5, ht + 4), joint)     # the bolt, edge-on
    else:
        cv.paint(cv.srect(hx0 - 1, ht + 2, hx0, ht + 4), joint)
    cv.paint(cv.rbox(hx0, ht, hx1, hb, 5), shell, cast=True)
    scr = cv.rbox(hx0 + 1, ht + 2, hx1 - 1, hb - 1, 4)
    if side:
        scr = cv.rect(hx0, ht + 2, hx0 + 1.5, hb - 1)
    if back:
        for y in np.arange(ht + 2, hb - 1, 1.5):                       # the vents
            cv.paint(cv.rect(hx0 + 1.5, y, hx1 - 1.5, y + 0.5), joint)
    else:
        cv.paint(scr, screen, tone=BASE)
    face = d.pick(["dots", "band", "square"])
    ey = ht + 3
    if back:
        pass
    elif side:
        cv.paint(cv.rect(hx0, ey, hx0 + 1, ey + (1 if face == "band" else 2)), glow)
    elif face == "dots":
        cv.paint(cv.srect(CX - 3, ey, CX - 1, ey + 2), glow)
    elif face == "band":
        cv.paint(cv.rect(hx0 + 1.5, ey + 0.5, hx1 - 1.5, ey + 1.5), glow)
    else:
        cv.paint(cv.srect(CX - 3, ey, CX - 2, ey + 2), glow)
        cv.paint(cv.rect(CX - 1, ey + 2.5, CX + 1, ey + 3), glow)
    # Antennae.
    ant = d.pick(["one", "two", "none", "dish"])
    if ant == "one":
        cv.paint(cv.rect(CX - 0.5 * cv_unit(cv), ht - 3, CX + 0.5 * cv_unit(cv), ht), joint)
        cv.paint(cv.ellipse(CX, ht - 3.2, 1.1, 1.1), glow)
    elif ant == "two" and side:              # one behind the other
        cv.paint(cv.rect(CX - 0.5, ht - 2.5, CX + 0.5, ht), joint)
        cv.paint(cv.rect(CX - 1, ht - 3.5, CX + 1, ht - 2.5), glow)
    elif ant == "two":
        cv.paint(cv.srect(hx0 + 1, ht - 2.5, hx0 + 2, ht), joint)
        cv.paint(cv.srect(hx0 + 0.5, ht - 3.5, hx0 + 2.5, ht - 2.5), glow)
    elif ant == "dish":
        cv.paint(cv.rect(CX - 0.5, ht - 1.5, CX + 0.5, ht), joint)
        cv.paint(cv.ellipse(CX, ht - 2, 2.5 if not side else 1.0, 1.0), shell)
    # Sometimes armed: the blade in its right hand, the shield on its left arm.
    item = d.pick(["none", "none", "sword", "shield", "both"])
    blade = ramp(d.pick(GLOW[:3])) if item in ("sword", "both") else None
    L = None
    if item in ("shield", "both"):
        L = dict(shield=d.pick(["round", "heater"]), emblem=d.pick(["boss", "stripe"]))
        L["face"] = ramp(d.pick(GLOW))
    if side:
        draw_robot_side_items(cv, facing, blade, L, (sh, hip), shell, joint)
        return dict(kind="robot", archetype="robot")
    ax0 = tx0 - 2
    if blade is not None:
        x = ax0 - 1
        cv.paint(cv.rect(x, hip - 9, x + 1, hip), blade)                     # energy blade
        cv.paint(cv.rect(x - 1, hip - 1, x + 2, hip), joint)
        cv.paint(cv.rect(x, hip, ax0 + 2, hip + 1.5), joint)
    if L is not None:
        face_col = joint if back else L["face"]           # from behind: the shield's back
        draw_shield(cv, dict(L, emblem="none") if back else L, tx1 + 2, sh, hip, shell,
                    face_col, joint)
    return dict(kind="robot", archetype="robot")


def draw_robot_side_items(cv, facing, blade, L, levels, shell, joint):
    """A robot's blade and shield in profile: facing "side" has its left arm (the shield)
    near, "side_far_left" its right hand (the blade); the far one is drawn behind."""
    sh, hip = levels
    near_blade = facing == "side_far_left"
    if blade is not None:
        x = CX - 2 if near_blade else CX + 1
        under = cv.ramp_id >= 0                          # what the body already covers
        blade_mask = cv.rect(x, hip - 9, x + 1, hip)
        cv.paint(blade_mask if near_blade else blade_mask & ~under, blade)
        cv.paint(cv.rect(x - 1, hip - 1, x + 2, hip) & (~under | near_blade), joint)
    if L is not None:
        if near_blade:
            cv.paint(cv.rbox(CX + 1, sh + 1, CX + 4, hip + 1.5, 4) & ~(cv.ramp_id >= 0), joint)
        else:
            draw_shield(cv, L, CX + 0.5, sh, hip, shell, L["face"], joint)


# --------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------
def _rng(seed, index, attempt=0):
    """The random generator for sprite `index`: a function of (seed, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, attempt]))


def sprite_kind(seed, index, attempt=0):
    """The body kind of sprite `index` without drawing it (the first roll)."""
    return Dice(_rng(seed, index, attempt)).pick(KINDS, KIND_WEIGHTS)


def make_sprite(seed, index, grid=32, attempt=0, return_info=False, facing="front"):
    """Draw sprite `index` for `seed`: a (128, 128, 4) uint8 RGBA array.

    `attempt` is a sub-seed used only to redraw a sprite that would duplicate
    an earlier one (see generate()). With return_info=True, also returns a
    dict with the body kind and archetype. `facing` draws the same character
    from another side (see make_turnaround()); "front" is the built-in set.
    """
    d = Dice(_rng(seed, index, attempt))
    kind = d.pick(KINDS, KIND_WEIGHTS)
    cv = Canvas(grid)
    if kind == "slime":
        info = draw_slime(cv, d, facing)
    elif kind == "robot":
        info = draw_robot(cv, d, facing)
    else:
        info = draw_person(cv, d, kind, facing)
    img = cv.render()
    return (img, info) if return_info else img


# --------------------------------------------------------------------------
# Turnarounds: every character from four sides
# --------------------------------------------------------------------------
# The four views of a character replay the very same dice, so palette, gear and
# proportions agree by construction; only the drawing differs. The profile is
# drawn facing the viewer's left with the character's left hand near; the right
# view is that drawing with the other hand near, mirrored, so a sword in the
# right hand is near in the right view and behind the body in the left view.
# The back is drawn in the front's layout without a face and then mirrored, so
# the right hand is on the viewer's right as it must be from behind. (Mirroring
# also moves the light to the top-right in those two views.)
VIEWS = ("front", "left", "back", "right")
VIEW_FACING = {"front": ("front", False), "left": ("side", False),
               "back": ("back", True), "right": ("side_far_left", True)}  # (facing, mirror)


def make_turnaround(seed, index, grid=32, attempt=0):
    """Character `index` in the four VIEWS: a (4, 128, 128, 4) uint8 array whose front
    is make_sprite(seed, index, grid, attempt) exactly."""
    views = []
    for view in VIEWS:
        facing, mirrored = VIEW_FACING[view]
        img = make_sprite(seed, index, grid, attempt, facing=facing)
        views.append(img[:, ::-1] if mirrored else img)
    return np.ascontiguousarray(np.stack(views))


def unique_sprites(seed=0, count=2048, grid=32):
    """Yield (index, attempt, image, info) for the first `count` sprites (see generate())."""
    seen = set()
    for i in range(count):
        attempt = 0
        while True:
            img, info = make_sprite(seed, i, grid, attempt, return_info=True)
            key = hashlib.sha256(img.tobytes()).digest()
            if key not in seen:
                seen.add(key)
                break
            attempt += 1
        yield i, attempt, img, info


def generate(seed=0, count=2048, grid=32):
    """Yield (index, image, kind) for the first `count` sprites, never repeating one.

    If sprite i comes out pixel-identical to an earlier sprite, it is redrawn
    with attempt = 1, 2, ... until it is new. Only earlier sprites are
    compared, so the first N sprites are the same whatever `count` is.
    """
    for i, _, img, info in unique_sprites(seed, count, grid):
        yield i, img, info["kind"]


def turnarounds(seed=0, per_kind=64, grid=32):
    """Yield (index, kind, views (4, 128, 128, 4)) for the first `per_kind` characters of
    every kind among the built-in sprites, in index order."""
    taken = {kind: 0 for kind in KINDS}
    for i, attempt, _, info in unique_sprites(seed, 10**9, grid):
        if all(n >= per_kind for n in taken.values()):
            return
        if taken[info["kind"]] < per_kind:
            taken[info["kind"]] += 1
            yield i, info["kind"], make_turnaround(seed, i, grid, attempt)


def write_turnarounds(out, seed=0, per_kind=64, grid=32):
    """<out>/<kind>/c<index>/<k>_<view>.png at the art's native size (grid x grid): the
    trainer scales them up by nearest neighbour. Returns the number of characters."""
    n, k = 0, SIZE // grid
    for i, kind, views in turnarounds(seed, per_kind, grid):
        folder = out / kind / f"c{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for v, (name, img) in enumerate(zip(VIEWS, views)):
            save_png(np.ascontiguousarray(img[::k, ::k]), folder / f"{v}_{name}.png")
        n += 1
    return n


def save_png(img, path):
    """Write an RGBA array as a PNG with no metadata, so output is reproducible."""
    Image.fromarray(img, "RGBA").save(path, format="PNG", optimize=False, compress_level=9)


def contact_sheet(images, cols=8, gap=4):
    """Tile RGBA sprites on a light checkerboard so transparency is visible.

    Sprites fill the grid row by row, `cols` per row; a None entry leaves its
    cell empty (so rows can be padded to line up).
    """
    images = list(images)
    rows = (len(images) + cols - 1) // cols
    tile = SIZE
    w = cols * tile + (cols + 1) * gap
    h = rows * tile + (rows + 1) * gap
    sheet = Image.new("RGBA", (w, h), (250, 250, 252, 255))
    yy, xx = np.mgrid[0:tile, 0:tile]
    checker = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 238, 222).astype(np.uint8)
    board = np.dstack([checker, checker, checker + 6, np.full_like(checker, 255)])
    board_img = Image.fromarray(board, "RGBA")
    for n, img in enumerate(images):
        if img is None:
            continue
        x = gap + (n % cols) * (tile + gap)
        y = gap + (n // cols) * (tile + gap)
        cell = Image.alpha_composite(board_img, Image.fromarray(np.asarray(img), "RGBA"))
        sheet.paste(cell, (x, y))
    return sheet.convert("RGB")


def main(argv=None):
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2048, help="number of sprites (default 2048)")
    ap.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    ap.add_argument("--grid", type=int, default=32, choices=(32, 64),
                    help="logical pixel grid before upscaling to 128 (default 32)")
    ap.add_argument("--out", type=Path, default=here / "images",
                    help="output folder (default: images/ next to this script)")
    ap.add_argument("--flat", action="store_true",
                    help="write all PNGs straight into --out, without kind folders")
    ap.add_argument("--sheet", type=Path, default=None,
                    help="also write a contact sheet here: one row per kind, its first 8 sprites")
    ap.add_argument("--no-images", action="store_true",
                    help="only build the contact sheet (stops once it is full), write no PNG files")
    ap.add_argument("--turnarounds", type=Path, default=None, metavar="DIR",
                    help="instead, write --per-kind characters of every kind in 4 views "
                         "(front, left, back, right) to DIR, e.g. data/turnarounds")
    ap.add_argument("--per-kind", type=int, default=64,
                    help="characters per kind for --turnarounds (default 64)")
    args = ap.parse_args(argv)
    if args.turnarounds is not None:
        n = write_turnarounds(args.turnarounds, args.seed, args.per_kind, args.grid)
        where = args.turnarounds
        print(f"{n} characters x 4 views (seed {args.seed}, grid {args.grid}) -> {where}")
        return

    first = {kind: [] for kind in KINDS}     # the first 8 sprites of each kind
    i = -1                                   # (so --count 0 reports 0 sprites)
    for i, img, kind in generate(args.seed, args.count, args.grid):
        if not args.no_images:
            path = args.out / ("" if args.flat else kind) / f"sprite_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(img, path)
        if len(first[kind]) < 8:
            first[kind].append(img)
        if args.no_images and all(len(v) == 8 for v in first.values()):
            break                            # the sheet is full: nothing left to do
    if args.sheet is not None:
        cells = [img for kind in KINDS for img in (first[kind] + [None] * 8)[:8]]
        contact_sheet(cells).save(args.sheet, format="PNG", optimize=False)
    where = "no files" if args.no_images else str(args.out)
    print(f"{i + 1} sprites (seed {args.seed}, grid {args.grid}) -> {where}")
    if args.sheet is not None:
        print(f"contact sheet -> {args.sheet}")


if __name__ == "__main__":
    sys.exit(main())
