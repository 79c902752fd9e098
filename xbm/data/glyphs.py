"""Generator of the bundled Glyphs dataset: characters rendered from matplotlib's fonts.

Glyphs is a small metric-learning dataset that needs no download: it is drawn
from the TrueType fonts that ship inside matplotlib (DejaVu, STIX, Computer
Modern), with matplotlib's own FreeType binding.

- A class is a Unicode code point drawn by at least ``min_fonts`` fonts; an
  instance is that character in one font.
- Rendering: white glyph on black (the FreeType coverage as is), no hinting.
  Every glyph is drawn at one em size, ``EM_FRACTION`` of the image size, so
  relative sizes survive ("o" is smaller than "O", "." smaller than "o"); a
  glyph whose ink does not fit in the image minus ``MARGIN`` pixels on each
  side (big operators, wide arrows) is drawn smaller until it fits. The ink's
  bounding box is then centred in the square.
- Fonts left out: LastResortHE (a placeholder box for every code point), and
  cmsy10 / cmex10, whose character map is a TeX encoding with no Unicode
  meaning. The other Computer Modern fonts also use TeX encodings, where only
  ASCII letters and digits sit at their Unicode code points, so they
  contribute only those. Private-use and control code points are skipped:
  they mean nothing shared across fonts.
- Filters, in order: code points in at least ``min_fonts`` character maps;
  blank renderings dropped; classes still drawn by at least ``min_fonts``
  fonts; within a class, one copy of each pixel-identical image (the font
  first in name order); an image identical to one in another class (Latin A,
  Greek Alpha, Cyrillic A) is kept only in the lowest code point among the
  classes that end with at least ``MIN_IMAGES_PER_CLASS`` images, so no two
  classes share an image and Recall@1 can reach 1; finally classes with fewer
  than ``MIN_IMAGES_PER_CLASS`` images go (a class needs a positive pair).
- Split: the surviving code points in increasing order, alternately to train
  (0th, 2nd, ...) and test (1st, 3rd, ...): class-disjoint halves that share
  every script's range.

Layout under ``root``: ``images/U+0041/DejaVuSans.png``, ``train.txt`` and
``test.txt`` (``relative/path,codepoint`` per line, paths relative to the
list file) and ``meta.json`` (parameters and counts), written last so that an
interrupted generation is never mistaken for a finished one. The same
parameters with the same matplotlib give byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
from matplotlib import ft2font
from PIL import Image
from tqdm import tqdm

GENERATOR_VERSION = 1
EM_FRACTION = 0.75
MARGIN = 1
MIN_IMAGES_PER_CLASS = 2
PNG_COMPRESS_LEVEL = 6
LIST_FILES = {"train": "train.txt", "test": "test.txt"}
META_FILE = "meta.json"

EXCLUDED_FONTS = {
    "LastResortHE-Regular": "draws a placeholder box for every code point",
    "cmsy10": "TeX symbol encoding: its character codes are not Unicode",
    "cmex10": "TeX extension encoding: its character codes are not Unicode",
}
# Computer Modern text fonts: TeX encodings agree with Unicode on these only.
TEX_ENCODED_FONTS = ("cmb10", "cmmi10", "cmr10", "cmss10", "cmti10", "cmtt10")
ASCII_LETTERS_AND_DIGITS = frozenset(
    [*range(ord("0"), ord("9") + 1), *range(ord("A"), ord("Z") + 1), *range(ord("a"), ord("z") + 1)]
)
_PRIVATE_USE = ((0xE000, 0xF8FF), (0xF0000, 0x10FFFF))
_CONTROL = ((0x0000, 0x001F), (0x007F, 0x009F))
_MAX_SHRINK_STEPS = 8


def font_dir() -> Path:
    """The folder of TrueType fonts bundled with matplotlib."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def bundled_fonts() -> list[str]:
    """File names of the usable bundled fonts, sorted (EXCLUDED_FONTS left out)."""
    return sorted(p.name for p in font_dir().glob("*.ttf") if p.stem not in EXCLUDED_FONTS)


def _select_fonts(fonts: Iterable[str] | None) -> list[str]:
    available = bundled_fonts()
    if fonts is None:
        return available
    if isinstance(fonts, str):
        raise TypeError(f"fonts must be a list of font file names, not the string {fonts!r}")
    chosen = set()
    for name in fonts:
        file_name = name if name.endswith(".ttf") else f"{name}.ttf"
        stem = file_name[: -len(".ttf")]
        if stem in EXCLUDED_FONTS:
            raise ValueError(f"font {name!r} is excluded from Glyphs: it {EXCLUDED_FONTS[stem]}")
        if file_name not in available:
            raise ValueError(f"font {name!r} is not among matplotlib's bundled fonts: {available}")
        chosen.add(file_name)
    if not chosen:
        raise ValueError("fonts is empty: give at least one font file name, or None for all")
    return sorted(chosen)


def _select_codepoints(codepoints: Iterable[int | str] | None) -> list[int] | None:
    if codepoints is None:
        return None
    chosen = set()
    for cp in codepoints:
        if isinstance(cp, str) and len(cp) == 1:
            cp = ord(cp)
        if not isinstance(cp, (int, np.integer)) or isinstance(cp, bool) or not 0 <= cp <= 0x10FFFF:
            raise ValueError(f"codepoints must hold ints in 0..0x10FFFF or single characters, got {cp!r}")
        chosen.add(int(cp))
    return sorted(chosen)


def _has_shared_meaning(cp: int) -> bool:
    return not any(lo <= cp <= hi for lo, hi in _PRIVATE_USE + _CONTROL)


def usable_codepoints(font: ft2font.FT2Font, font_name: str) -> set[int]:
    """Code points the font maps to a real glyph (not .notdef) with a Unicode meaning."""
    mapped = {cp for cp, glyph in font.get_charmap().items() if glyph != 0 and _has_shared_meaning(cp)}
    if Path(font_name).stem in TEX_ENCODED_FONTS:
        mapped &= ASCII_LETTERS_AND_DIGITS
    return mapped


def _rasterize(font: ft2font.FT2Font, cp: int, em_px: float) -> np.ndarray | None:
    """The glyph's ink cropped to its bounding box, or None when it draws nothing."""
    font.set_size(em_px, 72)  # 72 dpi: points are pixels
    glyph = font.load_char(cp, ft2font.LoadFlags.NO_HINTING)
    xmin, ymin, xmax, ymax = glyph.bbox  # 26.6 fixed point
    pad = 2  # antialiasing may spill one pixel past the control box
    width = (xmax + 63) // 64 - xmin // 64 + 2 * pad
    height = (ymax + 63) // 64 - ymin // 64 + 2 * pad
    canvas = np.zeros((max(height, 1), max(width, 1)), dtype=np.uint8)
    # The binding adds the bitmap's left bearing (floor(xmin)) to x; y is the bitmap's top row.
    font.draw_glyph_to_bitmap(canvas, pad - xmin // 64, pad, glyph)
    rows = np.flatnonzero(canvas.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(canvas.any(axis=0))
    return canvas[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def render_glyph(font: ft2font.FT2Font, cp: int, image_size: int) -> np.ndarray:
    """`cp` in `font` as a uint8 (image_size, image_size) image, white on black, centred.

    Drawn at an em of EM_FRACTION * image_size pixels, or smaller where its ink
    would not fit in image_size - 2 * MARGIN pixels. All zeros when blank.
    """
    fit = image_size - 2 * MARGIN
    em_px = EM_FRACTION * image_size
    ink = _rasterize(font, cp, em_px)
    image = np.zeros((image_size, image_size), dtype=np.uint8)
    if ink is None:
        return image
    for _ in range(_MAX_SHRINK_STEPS):
        if max(ink.shape) <= fit:
            break
        # Antialiased extents grow by up to a pixel past the scaled outline; aim one pixel short.
        em_px *= (fit - 1) / max(ink.shape)
        ink = _rasterize(font, cp, em_px)
        if ink is None:
            return image
    else:
        raise RuntimeError(f"glyph U+{cp:04X} of {font.fname} does not shrink into {fit} pixels")
    height, width = ink.shape
    top, left = (image_size - height) // 2, (image_size - width) // 2
    image[top:top + height, left:left + width] = ink
    return image


def _render_candidates(
    faces: dict[str, ft2font.FT2Font], fonts_of: dict[int, list[str]], image_size: int, progress: bool
) -> tuple[dict[int, list[tuple[str, np.ndarray]]], int]:
    """Render every (code point, font) pair; returns the non-blank images by class and the blank count."""
    rendered: dict[int, list[tuple[str, np.ndarray]]] = {}
    blank = 0
    for cp in tqdm(sorted(fonts_of), desc="rendering glyphs", unit="class", disable=not progress):
        instances = []
        for name in fonts_of[cp]:
            image = render_glyph(faces[name], cp, image_size)
            if image.any():
                instances.append((name, image))
            else:
                blank += 1
        rendered[cp] = instances
    return rendered, blank


def _dedupe_within_classes(classes: dict[int, list[tuple[str, np.ndarray]]]) -> int:
    """Keep one copy of each pixel-identical image per class (fonts are in name order)."""
    dropped = 0
    for cp, instances in classes.items():
        seen: set[bytes] = set()
        kept = []
        for name, image in instances:
            key = image.tobytes()
            if key not in seen:
                seen.add(key)
                kept.append((name, image))
        dropped += len(instances) - len(kept)
        classes[cp] = kept
    return dropped


def _resolve_cross_class_twins(
    classes: dict[int, list[tuple[str, np.ndarray]]]
) -> tuple[dict[int, list[tuple[str, np.ndarray]]], int, int]:
    """Give each image shared by several classes to the lowest surviving code point only.

    Repeats until stable, because dropping a class that falls below
    MIN_IMAGES_PER_CLASS hands its shared images to the next class in line.
    Returns the final classes, the images dropped as cross-class twins, and
    the classes dropped as too small.
    """
    alive = set(classes)
    while True:
        owner: dict[bytes, int] = {}
        for cp in sorted(alive):
            for _, image in classes[cp]:
                owner.setdefault(image.tobytes(), cp)
        kept = {cp: [(n, im) for n, im in classes[cp] if owner[im.tobytes()] == cp] for cp in alive}
        too_small = {cp for cp, instances in kept.items() if len(instances) < MIN_IMAGES_PER_CLASS}
        if not too_small:
            break
        alive -= too_small
    twins_dropped = sum(len(classes[cp]) - len(kept[cp]) for cp in alive)
    return kept, twins_dropped, len(classes) - len(alive)


def _split_classes(codepoints: list[int]) -> dict[str, list[int]]:
    ordered = sorted(codepoints)
    return {"train": ordered[0::2], "test": ordered[1::2]}


def image_relpath(cp: int, font_name: str) -> str:
    """Path of one image relative to the dataset root (and to the list files)."""
    return f"images/U+{cp:04X}/{Path(font_name).stem}.png"


def _write_dataset(
    staging: Path,
    classes: dict[int, list[tuple[str, np.ndarray]]],
    split_of: dict[str, list[int]],
    meta: dict,
    progress: bool,
) -> None:
    total = sum(len(v) for v in classes.values())
    with tqdm(total=total, desc="writing glyphs", unit="img", disable=not progress) as bar:
        for split, codepoints in split_of.items():
            lines = []
            for cp in codepoints:
                (staging / "images" / f"U+{cp:04X}").mkdir(parents=True, exist_ok=True)
                for name, image in classes[cp]:
                    relpath = image_relpath(cp, name)
                    # Fixed options and no metadata chunks: byte-identical on regeneration.
                    Image.fromarray(image).save(
                        staging / relpath, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL
                    )
                    lines.append(f"{relpath},{cp}\n")
                    bar.update(1)
            (staging / LIST_FILES[split]).write_text("".join(lines), encoding="utf-8")
    (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _publish(staging: Path, root: Path) -> None:
    """Move the finished files from `staging` into `root`, meta.json last."""
    (root / META_FILE).unlink(missing_ok=True)  # from here on the old dataset no longer counts
    for name in ("images", *LIST_FILES.values()):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)
    os.replace(staging / META_FILE, root / META_FILE)
    staging.rmdir()


def _count_stats(counts: list[int]) -> dict[str, float]:
    if not counts:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(counts), "median": statistics.median(counts), "max": max(counts)}


def generate_glyphs(
    root: str | os.PathLike,
    min_fonts: int = 8,
    image_size: int = 32,
    fonts: Iterable[str] | None = None,
    codepoints: Iterable[int | str] | None = None,
    progress: bool = True,
) -> dict:
    """Render the Glyphs dataset into `root` and return its summary (the counts in meta.json).

    `fonts` (bundled font file names) and `codepoints` (ints or characters)
    restrict the generation, e.g. for tests; None means all. Existing Glyphs
    files in `root` are replaced; other files there are left alone.
    """
    if isinstance(min_fonts, bool) or not isinstance(min_fonts, int) or min_fonts < 1:
        raise ValueError(f"min_fonts must be a positive int, got {min_fonts!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels), got {image_size!r}")
    start = time.perf_counter()
    font_names = _select_fonts(fonts)
    wanted = _select_codepoints(codepoints)
    faces = {name: ft2font.FT2Font(str(font_dir() / name)) for name in font_names}

    fonts_of: dict[int, list[str]] = defaultdict(list)
    for name in font_names:  # sorted, so each class's font list is sorted too
        usable = usable_codepoints(faces[name], name)
        if wanted is not None:
            usable &= set(wanted)
        for cp in usable:
            fonts_of[cp].append(name)
    in_cmaps = len(fonts_of)
    fonts_of = {cp: names for cp, names in fonts_of.items() if len(names) >= min_fonts}
    candidate_images = sum(len(names) for names in fonts_of.values())

    classes, blank = _render_candidates(faces, fonts_of, image_size, progress)
    few_fonts = {cp for cp, instances in classes.items() if len(instances) < min_fonts}
    few_fonts_images = sum(len(classes[cp]) for cp in few_fonts)
    classes = {cp: instances for cp, instances in classes.items() if cp not in few_fonts}
    drawn_classes, drawn_images = len(classes), sum(len(v) for v in classes.values())
    within_dupes = _dedupe_within_classes(classes)
    classes, twins, too_small_classes = _resolve_cross_class_twins(classes)
    split_of = _split_classes(list(classes))
    if not split_of["test"]:
        raise ValueError(
            f"only {len(classes)} class(es) survive the filters (min_fonts={min_fonts}, {len(font_names)} fonts, "
            f"{'all' if wanted is None else len(wanted)} code points); train and test need one each: "
            "lower min_fonts or allow more fonts / code points"
        )

    per_class = [len(v) for v in classes.values()]
    counts = {
        "codepoints_in_charmaps": in_cmaps,
        "candidate_classes": len(fonts_of),
        "candidate_images": candidate_images,
        "dropped_blank_images": blank,
        "dropped_classes_below_min_fonts": len(few_fonts),
        "dropped_images_in_classes_below_min_fonts": few_fonts_images,
        "classes_drawn_by_min_fonts": drawn_classes,
        "images_drawn": drawn_images,
        "dropped_duplicates_within_class": within_dupes,
        "dropped_twins_across_classes": twins,
        "dropped_classes_below_min_images": too_small_classes,
        "dropped_images_in_classes_below_min_images": drawn_images - within_dupes - twins - sum(per_class),
        "classes": len(classes),
        "images": sum(per_class),
        "images_per_class": _count_stats(per_class),
        **{
            f"{split}_{what}": value
            for split, cps in split_of.items()
            for what, value in (("classes", len(cps)), ("images", sum(len(classes[cp]) for cp in cps)))
        },
    }
    meta = {
        "generator_version": GENERATOR_VERSION,
        "min_fonts": min_fonts,
        "image_size": image_size,
        "fonts": font_names,
        "excluded_fonts": EXCLUDED_FONTS,
        "codepoints": wanted,
        "matplotlib_version": matplotlib.__version__,
        "freetype_version": ft2font.__freetype_version__,
        "rendering": {
            "polarity": "white glyph on black",
            "hinting": "none",
            "em_pixels": EM_FRACTION * image_size,
            "margin_pixels": MARGIN,
            "placement": "ink bounding box centred; shrunk to fit when larger than the image minus margins",
        },
        "min_images_per_class": MIN_IMAGES_PER_CLASS,
        "split": "classes sorted by code point, alternately train (even ranks) and test (odd ranks)",
        "counts": counts,
    }

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".generating-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        _write_dataset(staging, classes, split_of, meta, progress)
        _publish(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**counts, "seconds": time.perf_counter() - start, "root": str(root)}
