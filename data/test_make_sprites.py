"""Tests for the built-in sprite set (data/images) and its generator.

Run from the repository root with `python -m pytest -q`. The whole file reads
the ~2,000 committed PNGs once and takes a few seconds.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_sprites  # noqa: E402  (imported by path, see sys.path above)

IMAGES = HERE / "images"
FILES = sorted(IMAGES.glob("*/sprite_*.png"), key=lambda f: f.name)   # index order


def index(f):
    """The global sprite index in a file name: sprite_00042.png -> 42."""
    return int(f.stem.split("_")[1])


@lru_cache(maxsize=1)
def committed():
    """All committed sprites as one (N, 128, 128, 4) uint8 array."""
    return np.stack([np.asarray(Image.open(f)) for f in FILES])


def test_there_are_enough_committed_images():
    """At least 2,000 PNGs are committed in kind folders, numbered 0..N-1 without holes."""
    assert len(FILES) >= 2000
    assert [f.name for f in FILES] == [f"sprite_{i:05d}.png" for i in range(len(FILES))]
    assert not list(IMAGES.glob("*.png")), "no loose files above the kind folders"


def test_every_kind_has_a_folder():
    """data/images holds exactly one non-empty folder per body kind."""
    folders = {d.name for d in IMAGES.iterdir() if d.is_dir()}
    assert folders == set(make_sprites.KINDS)
    assert all(any((IMAGES / k).glob("sprite_*.png")) for k in make_sprites.KINDS)


def test_files_sit_in_the_folder_of_their_kind():
    """For the first 100 sprites, the folder name is the kind make_sprite() drew.

    The attempt (sub-seed) is the one whose drawing matches the committed
    pixels, so a sprite redrawn to avoid a duplicate is checked correctly too.
    """
    for f in FILES[:100]:
        for attempt in range(4):
            img, info = make_sprites.make_sprite(0, index(f), attempt=attempt, return_info=True)
            if np.array_equal(img, committed()[index(f)]):
                break
        else:
            pytest.fail(f"{f.name} matches no attempt")
        assert f.parent.name == info["kind"], f.name


def test_make_sprite_is_deterministic():
    """The same (seed, index) always gives the identical array; other indices differ."""
    a = make_sprites.make_sprite(0, 7)
    b = make_sprites.make_sprite(0, 7)
    assert a.dtype == np.uint8 and a.shape == (128, 128, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, make_sprites.make_sprite(0, 8))
    assert not np.array_equal(a, make_sprites.make_sprite(1, 7))


def run_cli(*args):
    subprocess.run([sys.executable, str(HERE / "make_sprites.py"), *args],
                   check=True, capture_output=True)


def test_cli_reproduces_committed_files_byte_for_byte(tmp_path):
    """`make_sprites.py --count 12` writes exactly the first 12 committed files, same folders."""
    run_cli("--count", "12", "--out", str(tmp_path))
    made = sorted(tmp_path.rglob("*.png"), key=lambda f: f.name)
    assert [f.relative_to(tmp_path) for f in made] == [f.relative_to(IMAGES) for f in FILES[:12]]
    for new, old in zip(made, FILES):
        assert new.read_bytes() == old.read_bytes(), new.name


def test_cli_flat_option(tmp_path):
    """`--flat` writes the same files straight into --out, with no kind folders."""
    run_cli("--count", "3", "--flat", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in FILES[:3]]
    assert all((tmp_path / f.name).read_bytes() == f.read_bytes() for f in FILES[:3])


def test_committed_images_are_clean_rgba():
    """Every image is 128x128 RGBA, alpha is 0 or 255, and RGB is 0 where alpha is 0."""
    for f in FILES[:50]:
        im = Image.open(f)
        assert im.mode == "RGBA" and im.size == (128, 128), f.name
    x = committed()
    alpha = x[..., 3]
    assert np.isin(alpha, (0, 255)).all()
    assert (x[..., :3][alpha == 0] == 0).all()


def test_opaque_area_is_sensible():
    """Each sprite covers between 8% and 60% of the image: a character, not a speck or a wall."""
    frac = (committed()[..., 3] > 0).mean(axis=(1, 2))
    assert frac.min() >= 0.08, frac.min()
    assert frac.max() <= 0.60, frac.max()


def test_no_duplicate_images():
    """No two committed sprites are pixel-identical."""
    x = committed()
    hashes = {hashlib.sha256(img.tobytes()).hexdigest() for img in x}
    assert len(hashes) == len(x)


def test_images_are_made_of_4x4_blocks():
    """On the default 32 grid each logical pixel is a constant 4x4 block."""
    x = committed()
    blocks = x.reshape(len(x), 32, 4, 32, 4, 4)
    assert (blocks == blocks[:, :, :1, :, :1, :]).all()


def test_grid_64_gives_2x2_blocks():
    """A --grid 64 sprite is a valid 128x128 RGBA image built from 2x2 blocks."""
    img = make_sprites.make_sprite(0, 3, grid=64)
    assert img.shape == (128, 128, 4)
    blocks = img.reshape(64, 2, 64, 2, 4)
    assert (blocks == blocks[:, :1, :, :1, :]).all()
    # ...and it really is finer than the 32 grid: some 4x4 blocks are not constant
    coarse = img.reshape(32, 4, 32, 4, 4)
    assert not (coarse == coarse[:, :1, :, :1, :]).all()


def test_feet_share_one_baseline():
    """The lowest opaque row is the same for every sprite: they all stand on one floor."""
    alpha = committed()[..., 3] > 0
    rows = alpha.any(axis=2)                                   # (N, 128)
    lowest = 127 - np.argmax(rows[:, ::-1], axis=1)
    assert lowest.max() - lowest.min() <= 2, np.unique(lowest)


def test_sprites_are_roughly_centred():
    """Each sprite's bounding box is horizontally centred to within one logical pixel."""
    alpha = committed()[..., 3] > 0
    cols = alpha.any(axis=1)                                   # (N, 128)
    left = np.argmax(cols, axis=1)
    right = 127 - np.argmax(cols[:, ::-1], axis=1)
    assert np.abs((left + right) - 127).max() <= 4


def test_set_is_varied():
    """Many distinct silhouettes and every body kind occurs among the sprites."""
    alpha = committed()[..., 3] > 0
    masks = {np.packbits(a).tobytes() for a in alpha}
    assert len(masks) >= 0.6 * len(alpha), len(masks)
    assert {f.parent.name for f in FILES} == set(make_sprites.KINDS)
    # the first 64 already show a good mix
    assert len({f.parent.name for f in FILES[:64]}) >= 6


def test_contact_sheet_function():
    """contact_sheet() tiles sprites 8 per row on an opaque checkerboard image."""
    imgs = [make_sprites.make_sprite(0, i) for i in range(10)]
    sheet = make_sprites.contact_sheet(imgs, cols=8)
    assert sheet.mode == "RGB"
    assert sheet.width > 8 * 128 and 2 * 128 < sheet.height < 3 * 128
    # None leaves a cell empty: same size, and that cell is plain background
    holed = make_sprites.contact_sheet(imgs[:9] + [None], cols=8)
    assert holed.size == sheet.size and holed.getpixel((4 + 128 + 4 + 64, 4 + 128 + 4 + 64)) == (250, 250, 252)


def test_committed_contact_sheet_is_reproducible(tmp_path):
    """`--no-images --sheet` rebuilds data/contact_sheet.png byte for byte: 8 rows, one per kind."""
    run_cli("--no-images", "--sheet", str(tmp_path / "sheet.png"))
    assert (tmp_path / "sheet.png").read_bytes() == (HERE / "contact_sheet.png").read_bytes()
    assert Image.open(HERE / "contact_sheet.png").size == (8 * 128 + 9 * 4,) * 2


# --------------------------------------------------------------------------
# Turnarounds: the same characters in four views (data/turnarounds)
# --------------------------------------------------------------------------
TURNAROUNDS = HERE / "turnarounds"


def person_hands(index):
    """(kind, left-hand item, right-hand item) of character `index` (first attempt)."""
    d = make_sprites.Dice(make_sprites._rng(0, index, 0))
    kind = d.pick(make_sprites.KINDS, make_sprites.KIND_WEIGHTS)
    if kind in ("slime", "robot"):
        return kind, None, None
    _, look, _ = make_sprites.person_plan(d, kind)
    return kind, look["left"], look["right"]


def colour_histogram(img):
    """Normalised histogram of the opaque pixels' colours, 8 levels per channel."""
    rgb = img[img[..., 3] > 0][:, :3].astype(int) // 32
    cells = np.bincount((rgb[:, 0] * 8 + rgb[:, 1]) * 8 + rgb[:, 2], minlength=512)
    return cells / max(cells.sum(), 1)


def test_turnaround_front_is_the_built_in_sprite_and_views_are_deterministic():
    """make_turnaround gives 4 views (front, left, back, right); its front is exactly
    make_sprite's sprite, so the single-view set is the turnarounds' front row; the same
    (seed, index) gives the same views and the views differ from one another."""
    for i in (0, 5, 11):
        views = make_sprites.make_turnaround(0, i)
        assert views.shape == (4, 128, 128, 4) and views.dtype == np.uint8
        assert np.array_equal(views[0], make_sprites.make_sprite(0, i))
        assert np.array_equal(views, make_sprites.make_turnaround(0, i))
        assert not np.array_equal(views[0], views[2])
    assert make_sprites.VIEWS == ("front", "left", "back", "right")


def test_left_is_the_mirror_of_right_when_the_hands_are_empty():
    """Body, head and hair are drawn once in profile: with nothing in either hand (slimes,
    unarmed people), the right view is the left view mirrored pixel for pixel. A person with
    a shield is not symmetric: the shield arm is near in one profile and far in the other."""
    symmetric = asymmetric = 0
    for i in range(60):
        kind, left, right = person_hands(i)
        if kind == "robot":
            continue
        views = make_sprites.make_turnaround(0, i)
        mirrored = np.array_equal(views[1], views[3][:, ::-1])
        if kind == "slime" or (left == "none" and right == "none"):
            assert mirrored, i
            symmetric += 1
        elif right == "shield":
            assert not mirrored, i
            asymmetric += 1
    assert symmetric >= 3 and asymmetric >= 3


def test_the_views_of_one_character_share_its_palette():
    """Every view of a character is drawn from the same dice: its views' colour histograms
    (8 levels per channel) are much closer to each other than to another character's."""
    chars = [make_sprites.make_turnaround(0, i) for i in range(24)]
    hists = [[colour_histogram(v) for v in c] for c in chars]
    tv = lambda a, b: 0.5 * np.abs(a - b).sum()  # noqa: E731
    own = np.mean([tv(h[k], h[m]) for h in hists for k in range(4) for m in range(k + 1, 4)])
    strangers = np.mean([tv(hists[i][0], hists[i - 1][m]) for i in range(24) for m in range(4)])
    assert own < 0.5 * strangers, (own, strangers)


def test_the_back_of_a_slime_shows_no_face():
    """A slime's front shows its eyes in the dark face colour; its back shows none of it."""
    dark = np.array(make_sprites.ramp(make_sprites.BLACK)[make_sprites.BASE])
    found = 0
    for i in range(80):
        if person_hands(i)[0] != "slime":
            continue
        views = make_sprites.make_turnaround(0, i)
        has_dark = [(v[..., :3] == dark).all(-1).any() for v in views]
        assert has_dark[0] and not has_dark[2], i
        found += 1
    assert found >= 3


def test_committed_turnarounds_are_complete_and_reproducible(tmp_path):
    """data/turnarounds holds 64 characters per kind, each a folder of 4 native-size (32x32)
    RGBA views named 0_front.png .. 3_right.png; `--turnarounds DIR --per-kind 1` rewrites
    the first character of every kind byte for byte."""
    folders = sorted(TURNAROUNDS.glob("*/c*"))
    assert {f.parent.name for f in folders} == set(make_sprites.KINDS)
    assert all(len(list((TURNAROUNDS / k).iterdir())) == 64 for k in make_sprites.KINDS)
    names = ["0_front.png", "1_left.png", "2_back.png", "3_right.png"]
    for f in folders[::37]:
        assert sorted(p.name for p in f.iterdir()) == names
        with Image.open(f / names[2]) as im:
            assert im.size == (32, 32) and im.mode == "RGBA"
    run_cli("--turnarounds", str(tmp_path), "--per-kind", "1")
    made = sorted(tmp_path.rglob("*.png"))
    assert len(made) == 8 * 4
    for new in made:
        assert new.read_bytes() == (TURNAROUNDS / new.relative_to(tmp_path)).read_bytes(), new
