"""Rebuild the two real-art measurement sets of the lab record (data/figures/README.md).

Neither set ships with SpriteFlow. Each comes from a public repository that vendors a
CC-BY pixel-art pack; fetch (clone) that repository, then cut its sheets into frames:

    python data/real/build_sets.py dawnlike  PATH/TO/CppRogueLike        OUT/A
    python data/real/build_sets.py antifarea PATH/TO/stardew-style-engine OUT/B

PATH may be a work tree or a bare git directory; files are read at the commit the lab
record names (git show COMMIT:PATH), so the frames are the same on every machine.

    A  DawnLike v1.81 creatures, 16x16 (CC-BY 4.0, DragonDePlatino; palette DawnBringer)
       autoexecbatman/CppRogueLike @ 1c252d3b6599db7e69535975babd30a3f0365938
       one subfolder per creature sheet, both animation frames: 8 classes, 1,019 frames
    B  Antifarea "18x20 characters walk/attack/cast" (CC-BY 3.0; sheet by Rhimlock)
       hiddenwaffle/stardew-style-engine @ aa8a9e7031f8457422553b202445af035e021aac
       a flat folder: 1,512 frames

A cell becomes a frame unless it has fewer than 10 opaque pixels or repeats an earlier
frame of its class exactly. Transparent pixels get RGB 0, as the trainer stores them.
"""

import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DAWNLIKE = "1c252d3b6599db7e69535975babd30a3f0365938"
ANTIFAREA = "aa8a9e7031f8457422553b202445af035e021aac"
# class -> (DawnLike sheet, rows kept in pixels or None): the Reptile sheet ends in a text box
DAWNLIKE_CLASSES = {"player": ("Player", None), "humanoid": ("Humanoid", None),
                    "undead": ("Undead", None), "demon": ("Demon", None),
                    "avian": ("Avian", None), "reptile": ("Reptile", 208),
                    "quadruped": ("Quadraped", None), "pest": ("Pest", None)}
MIN_OPAQUE = 10


def read_png(repo, commit, path):
    """A PNG from the repository at `commit`, as an RGBA array (H, W, 4)."""
    git_dir = repo if (Path(repo) / "HEAD").is_file() else str(Path(repo) / ".git")
    blob = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"],
                          check=True, capture_output=True).stdout
    return np.array(Image.open(io.BytesIO(blob)).convert("RGBA"))


def cut(sheet, cell_w, cell_h, out, prefix, seen):
    """Write every new, non-empty cell of the sheet to out/PREFIX_rRR_cCC.png; returns the count."""
    written = 0
    for y in range(0, sheet.shape[0] - cell_h + 1, cell_h):
        for x in range(0, sheet.shape[1] - cell_w + 1, cell_w):
            cell = sheet[y:y + cell_h, x:x + cell_w].copy()
            cell[cell[..., 3] == 0] = 0
            key = hashlib.sha1(cell.tobytes()).hexdigest()
            if (cell[..., 3] > 0).sum() < MIN_OPAQUE or key in seen:
                continue
            seen.add(key)
            name = f"{prefix}_r{y // cell_h:02d}_c{x // cell_w:02d}.png"
            Image.fromarray(cell, "RGBA").save(out / name)
            written += 1
    return written


def build_dawnlike(repo, out):
    for cls, (sheet_name, rows) in DAWNLIKE_CLASSES.items():
        (out / cls).mkdir(parents=True)
        seen, count = set(), 0
        for frame in "01":  # the two animation frames of every creature
            sheet = read_png(repo, DAWNLIKE, f"DawnLike/Characters/{sheet_name}{frame}.png")
            count += cut(sheet[:rows], 16, 16, out / cls, f"{sheet_name}{frame}", seen)
        print(f"{cls}: {count} frames")


def build_antifarea(repo, out):
    out.mkdir(parents=True)
    sheet = read_png(repo, ANTIFAREA, "src/external/image/antifarea_18x20chars.png")
    print(f"{cut(sheet, 18, 20, out, 'antifarea', set())} frames")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("dawnlike", "antifarea"):
        sys.exit(__doc__)
    which, repo, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if out.exists():
        shutil.rmtree(out)
    (build_dawnlike if which == "dawnlike" else build_antifarea)(repo, out)
