"""The Glyphs generator (xbm.data.glyphs) and dataset class, on a few fonts and ~30 code points."""
import filecmp
import functools
import json
import logging
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import ft2font
from PIL import Image

from xbm.data import glyphs as gen
from xbm.data.datasets import glyphs as glyphs_module
from xbm.data.datasets.glyphs import Glyphs

# DejaVuSans and its Oblique share the upright "+", "=" and other symbols: within-class twins.
FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf", "STIXGeneral.ttf", "cmr10.ttf",
]
# Latin capitals with their Greek / Cyrillic look-alikes, lower case, digits, symbols, a space.
CODEPOINTS = list("ABEHKMOPTXYaeo01") + ["\u0391", "\u0392", "\u0395", "\u039f", "\u0410", "\u0415", "\u041e"]
CODEPOINTS += [" ", "+", "=", "\u2211", "\u222b", "\u2192", "\u00c5"]
MIN_FONTS = 3
SIZE = 32
LINE = re.compile(r"^images/U\+([0-9A-F]{4,6})/([A-Za-z0-9_\-]+)\.png,(\d+)$")


def generate(root, **overrides):
    args = dict(min_fonts=MIN_FONTS, image_size=SIZE, fonts=FONTS, codepoints=CODEPOINTS, progress=False)
    args.update(overrides)
    return gen.generate_glyphs(root, **args)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs_small")
    summary = generate(root)
    return root, summary


def read_list(path):
    return [line.rstrip("\n") for line in open(path, encoding="utf-8")]


def disk_images(root):
    """{(codepoint, font stem): pixels} of every listed image, with its split."""
    images, split_of = {}, {}
    for split in ("train", "test"):
        for line in read_list(root / f"{split}.txt"):
            match = LINE.match(line)
            key = (int(match.group(3)), match.group(2))
            images[key] = np.asarray(Image.open(root / line.rsplit(",", 1)[0]))
            split_of[key[0]] = split
    return images, split_of


def reference_drawers(codepoint):
    """Fonts of FONTS whose own glyph lookup finds `codepoint` and draws some ink (plain loop)."""
    drawers = []
    for name in FONTS:
        if name.startswith("cm") and not (chr(codepoint).isascii() and chr(codepoint).isalnum()):
            continue  # TeX-encoded fonts contribute ASCII letters and digits only
        font = ft2font.FT2Font(str(gen.font_dir() / name))
        if font.get_char_index(codepoint) == 0:
            continue
        font.set_size(24, 72)
        font.set_text(chr(codepoint))
        font.draw_glyphs_to_bitmap()
        if np.asarray(font.get_image()).any():
            drawers.append(Path(name).stem)
    return drawers


# -- generator -------------------------------------------------------------------------------------


def test_regeneration_is_byte_identical(small, tmp_path):
    root, _ = small
    generate(tmp_path / "again")
    first = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    second = sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert first == second and len(first) > 20
    match, mismatch, errors = filecmp.cmpfiles(root, tmp_path / "again", first, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(first)


def test_list_files_parse_and_point_at_their_code_point(small):
    root, summary = small
    total = 0
    for split in ("train", "test"):
        lines = read_list(root / f"{split}.txt")
        assert lines == sorted(lines, key=lambda l: (int(l.rsplit(",", 1)[1]), l))
        for line in lines:
            match = LINE.match(line)
            assert match, line
            assert int(match.group(1), 16) == int(match.group(3))
            assert (root / line.rsplit(",", 1)[0]).is_file()
        total += len(lines)
    assert total == summary["images"]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["min_fonts"] == MIN_FONTS and meta["image_size"] == SIZE and meta["fonts"] == sorted(FONTS)
    assert meta["counts"]["images"] == total


def test_blank_glyphs_are_dropped(small):
    root, summary = small
    images, _ = disk_images(root)
    assert all(img.any() for img in images.values())
    assert not any(cp == 0x20 for cp, _ in images)
    assert not (root / "images" / "U+0020").exists()
    fonts_with_space = [n for n in FONTS if ft2font.FT2Font(str(gen.font_dir() / n)).get_char_index(0x20) != 0]
    assert summary["dropped_blank_images"] >= len(fonts_with_space) - 1  # cmr10 is letters and digits only


def test_images_are_grayscale_centred_and_inside_the_margin(small):
    root, _ = small
    for (cp, font), img in disk_images(root)[0].items():
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
        rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
        assert rows[0] >= gen.MARGIN and rows[-1] <= SIZE - 1 - gen.MARGIN, (cp, font)
        assert cols[0] >= gen.MARGIN and cols[-1] <= SIZE - 1 - gen.MARGIN, (cp, font)
        # Ink box centred to within half a pixel (integer placement).
        assert abs((rows[0] + rows[-1]) / 2 - (SIZE - 1) / 2) <= 0.5, (cp, font)
        assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 0.5, (cp, font)


def test_splits_are_class_disjoint_alternating_halves(small):
    root, _ = small
    _, split_of = disk_images(root)
    ordered = sorted(split_of)
    assert [split_of[cp] for cp in ordered] == ["train" if i % 2 == 0 else "test" for i in range(len(ordered))]
    train = {int(l.rsplit(",", 1)[1]) for l in read_list(root / "train.txt")}
    test = {int(l.rsplit(",", 1)[1]) for l in read_list(root / "test.txt")}
    assert train and test and not train & test


def test_every_class_was_drawn_by_min_fonts_and_keeps_two_images(small):
    root, _ = small
    images, _ = disk_images(root)
    per_class = {}
    for cp, font in images:
        per_class.setdefault(cp, []).append(font)
    for cp, fonts in per_class.items():
        assert len(fonts) >= gen.MIN_IMAGES_PER_CLASS
        drawers = reference_drawers(cp)
        assert len(drawers) >= MIN_FONTS and set(fonts) <= set(drawers), (hex(cp), fonts, drawers)


def test_no_two_listed_images_are_pixel_identical(small):
    root, summary = small
    images, _ = disk_images(root)
    keys = list(images)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not np.array_equal(images[keys[i]], images[keys[j]]), (keys[i], keys[j])
    # The chosen code points do hold twins, so the filters had work to do.
    assert summary["dropped_duplicates_within_class"] > 0
    assert summary["dropped_twins_across_classes"] > 0


def test_every_left_out_drawing_has_a_twin_that_was_kept(small):
    """A drawing missing from a kept class is identical to a kept image of that class or of a lower code point."""
    root, _ = small
    images, _ = disk_images(root)
    kept_classes = sorted({cp for cp, _ in images})
    for cp in kept_classes:
        for name in FONTS:
            stem = Path(name).stem
            if (cp, stem) in images or stem not in reference_drawers(cp):
                continue
            drawing = gen.render_glyph(ft2font.FT2Font(str(gen.font_dir() / name)), cp, SIZE)
            twins = [key for key, img in images.items() if np.array_equal(img, drawing)]
            assert twins, (hex(cp), stem)
            assert all(c <= cp for c, _ in twins), (hex(cp), stem, twins)


def test_latin_capital_a_keeps_the_shape_it_shares_with_alpha_and_cyrillic_a(small):
    root, _ = small
    images, _ = disk_images(root)
    font = ft2font.FT2Font(str(gen.font_dir() / "DejaVuSans.ttf"))
    latin, alpha, cyrillic = (gen.render_glyph(font, ord(c), SIZE) for c in "A\u0391\u0410")
    assert np.array_equal(latin, alpha) and np.array_equal(latin, cyrillic)  # the premise
    assert np.array_equal(images[(ord("A"), "DejaVuSans")], latin)
    assert (0x391, "DejaVuSans") not in images and (0x410, "DejaVuSans") not in images


def test_default_fonts_leave_out_last_resort_and_tex_symbol_fonts(tmp_path):
    summary = gen.generate_glyphs(tmp_path, min_fonts=2, codepoints="AZaz09", progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    excluded = {"LastResortHE-Regular.ttf", "cmsy10.ttf", "cmex10.ttf"}
    assert not excluded & set(meta["fonts"])
    assert set(meta["fonts"]) == {p.name for p in gen.font_dir().glob("*.ttf")} - excluded
    written = {p.stem for p in (tmp_path / "images").rglob("*.png")}
    assert written and not {"LastResortHE-Regular", "cmsy10", "cmex10"} & written
    assert summary["classes"] == 6
    with pytest.raises(ValueError, match="LastResortHE"):
        gen.generate_glyphs(tmp_path / "x", fonts=["LastResortHE-Regular.ttf"], codepoints="A", progress=False)


def test_wide_glyphs_shrink_to_fit_and_sizes_stay_relative():
    sans = ft2font.FT2Font(str(gen.font_dir() / "DejaVuSans.ttf"))
    brace = gen.render_glyph(ft2font.FT2Font(str(gen.font_dir() / "STIXSizFiveSymReg.ttf")), 0x23DE, SIZE)
    cols = np.flatnonzero(brace.any(0))
    assert cols[0] >= gen.MARGIN and cols[-1] <= SIZE - 1 - gen.MARGIN and cols[-1] - cols[0] + 1 >= SIZE - 6

    def ink_height(ch):
        return np.flatnonzero(gen.render_glyph(sans, ord(ch), SIZE).any(1)).size

    assert ink_height(".") < ink_height("o") < ink_height("O")
    assert not gen.render_glyph(sans, 0x20, SIZE).any()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_fonts"):
        gen.generate_glyphs(tmp_path, min_fonts=0, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        gen.generate_glyphs(tmp_path, image_size=4, progress=False)
    with pytest.raises(ValueError, match="NoSuchFont"):
        gen.generate_glyphs(tmp_path, fonts=["NoSuchFont.ttf"], progress=False)
    with pytest.raises(ValueError, match="survive"):
        gen.generate_glyphs(tmp_path, min_fonts=3, fonts=FONTS, codepoints="A", progress=False)
    assert not (tmp_path / "meta.json").exists()


def test_an_interrupted_generation_leaves_no_finished_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original_save(self, *args, **kwargs)

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path)
    assert not (tmp_path / "meta.json").exists()
    assert os.listdir(tmp_path) == []  # the staging folder is cleaned up
    with pytest.raises(FileNotFoundError):
        Glyphs(tmp_path, min_fonts=MIN_FONTS, generate=False)


# -- dataset class ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_dataset_items_match_the_files(small, split):
    root, _ = small
    ds = Glyphs(root, split, min_fonts=MIN_FONTS, image_size=SIZE, generate=False)
    lines = read_list(root / f"{split}.txt")
    assert len(ds) == len(lines) == len(ds.labels) == len(ds.paths) == ds.images.shape[0]
    assert ds.images.shape[1:] == (SIZE, SIZE) and ds.images.dtype == np.uint8
    codepoints = [int(l.rsplit(",", 1)[1]) for l in lines]
    assert ds.class_ids == sorted(set(codepoints))
    assert sorted(set(ds.labels.tolist())) == list(range(len(ds.class_ids))) and ds.labels.dtype == np.int64
    for i, line in enumerate(lines):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "L" and isinstance(label, int)
        assert ds.class_ids[label] == codepoints[i] and ds.class_name(label) == f"U+{codepoints[i]:04X}"
        assert ds.paths[i] == line.rsplit(",", 1)[0]
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / ds.paths[i])))


def test_dataset_transform_and_split_names(small):
    root, _ = small
    ds = Glyphs(root, "test", transform=lambda im: np.asarray(im).sum(), min_fonts=MIN_FONTS, generate=False)
    value, label = ds[3]
    assert value == int(np.asarray(Image.open(ds.full_path(3)), dtype=np.int64).sum()) and label == ds.labels[3]
    assert Glyphs.SPLITS == ("train", "test") and Glyphs.TRAIN_SPLIT == "train"
    assert Glyphs.EVAL_TASKS == {"test": ("test", None)} and Glyphs.RECALL_KS == (1, 10, 100)
    assert Glyphs.DOWNLOAD_URL is None
    with pytest.raises(ValueError, match="'train', 'test'"):
        Glyphs(root, "query", min_fonts=MIN_FONTS, generate=False)


def test_dataset_refuses_other_parameters(small):
    root, _ = small
    with pytest.raises(ValueError, match="min_fonts=3, but min_fonts=8"):
        Glyphs(root, "train", generate=False)
    with pytest.raises(ValueError, match="image_size=32, but image_size=64"):
        Glyphs(root, "train", min_fonts=MIN_FONTS, image_size=64)


def test_dataset_without_data_and_generate_false(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Glyphs(missing, "train", generate=False)
    assert not missing.exists()


def test_dataset_generates_on_first_use(tmp_path, monkeypatch, caplog):
    restricted = functools.partial(gen.generate_glyphs, fonts=FONTS, codepoints=CODEPOINTS, progress=False)
    monkeypatch.setattr(glyphs_module, "generate_glyphs", restricted)
    with caplog.at_level(logging.INFO, logger=glyphs_module.__name__):
        ds = Glyphs(tmp_path / "new", "train", min_fonts=MIN_FONTS)
    assert len(ds) > 0 and (tmp_path / "new" / "meta.json").is_file()
    assert any(str(tmp_path / "new") in r.getMessage() and "generated" in r.getMessage() for r in caplog.records)


def _open_train_split(root):
    Glyphs(root, "train", min_fonts=MIN_FONTS)


@pytest.mark.skipif(glyphs_module.fcntl is None or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fcntl and fork")
def test_concurrent_first_use_generates_once(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    calls.mkdir()

    def counting_generate(root, **kwargs):
        (calls / str(os.getpid())).touch()
        return gen.generate_glyphs(root, fonts=FONTS, codepoints=CODEPOINTS, progress=False, **kwargs)

    monkeypatch.setattr(glyphs_module, "generate_glyphs", counting_generate)
    context = multiprocessing.get_context("fork")  # the children inherit the patch
    workers = [context.Process(target=_open_train_split, args=(tmp_path / "shared",)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(os.listdir(calls)) == 1


def test_dataset_reports_malformed_lines_and_missing_images(small, tmp_path):
    root, _ = small
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    lines = read_list(copy / "train.txt")
    lines[2] = lines[2].replace(",", ";")
    (copy / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.txt, line 3"):
        Glyphs(copy, "train", min_fonts=MIN_FONTS, generate=False)
    victim = read_list(copy / "test.txt")[1].rsplit(",", 1)[0]
    (copy / victim).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / victim))):
        Glyphs(copy, "test", min_fonts=MIN_FONTS, generate=False)


# The whole default dataset (15 s of one core): what `make demo` generates first; make test-all runs it.
@pytest.mark.heavy
def test_full_default_generation(tmp_path):
    summary = gen.generate_glyphs(tmp_path, progress=False)
    assert 2500 <= summary["classes"] <= 3500 and 25000 <= summary["images"] <= 45000
    assert summary["images_per_class"]["min"] >= 2
    test = Glyphs(tmp_path, "test", generate=False)
    flat = test.images.reshape(len(test), -1)
    assert len(np.unique(flat, axis=0)) == len(test)  # no pixel-identical twins left
