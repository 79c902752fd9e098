"""Glyphs: the bundled dataset of characters rendered from matplotlib's fonts (no download)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..glyphs import GENERATOR_VERSION, LIST_FILES, META_FILE, generate_glyphs
from .list_dataset import read_path_label_list

logger = logging.getLogger(__name__)


class Glyphs(Dataset):
    """Characters rendered from the fonts bundled with matplotlib; class = Unicode code point.

    The dataset is generated into `root` on first use (about 10 s; see
    xbm.data.glyphs for how) unless `generate` is False. The images of the
    split are held in memory as one uint8 array `images` of shape (N, H, W).

    Attributes: `labels` (int64, 0..C-1 within the split), `class_ids` (the
    code point of each label), `paths` (image paths relative to `image_root`,
    which is the root; `full_path(i)` joins them), `meta` (the generator's
    meta.json). `ds[i]` is (PIL image of mode "L", label), or
    (transform(image), label).

    Under torchrun, ranks that find no dataset wait on a file lock while one
    of them generates it (POSIX only; elsewhere generate it once beforehand).
    """

    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}  # task -> (query split, gallery split or None: leave-one-out)
    RECALL_KS = (1, 10, 100)
    DOWNLOAD_URL = None

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform=None,
        min_fonts: int = 8,
        image_size: int = 32,
        generate: bool = True,
    ):
        if split not in self.SPLITS:
            raise ValueError(f"Glyphs split {split!r} is not one of {self.SPLITS}")
        self.root = Path(root).expanduser()
        self.image_root = self.root
        self.split = split
        self.transform = transform
        self.meta = self._finished_meta(min_fonts, image_size, generate)
        self._check_parameters(min_fonts, image_size)

        list_file = self.root / LIST_FILES[split]
        if not list_file.is_file():
            raise FileNotFoundError(f"Glyphs list file {list_file} is missing; delete {self.root} to regenerate")
        entries = read_path_label_list(list_file)
        codepoints = [cp for _, cp in entries]
        self.paths = np.array([path for path, _ in entries])
        self.class_ids = sorted(set(codepoints))
        label_of = {cp: label for label, cp in enumerate(self.class_ids)}
        self.labels = np.array([label_of[cp] for cp in codepoints], dtype=np.int64)
        self.images = self._load_images(list_file, image_size)

    def _finished_meta(self, min_fonts: int, image_size: int, generate: bool) -> dict:
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            if not generate:
                raise FileNotFoundError(
                    f"no finished Glyphs dataset in {self.root} ({meta_path} is missing): create it with "
                    f"Glyphs({str(self.root)!r}, generate=True) or "
                    f"xbm.data.glyphs.generate_glyphs({str(self.root)!r}, min_fonts={min_fonts}, "
                    f"image_size={image_size})"
                )
            with self._generation_lock():
                if not meta_path.is_file():  # another process may have finished it while we waited
                    start = time.perf_counter()
                    summary = generate_glyphs(self.root, min_fonts=min_fonts, image_size=image_size)
                    logger.info(
                        "generated Glyphs in %s: %d classes, %d images, %.1f s",
                        self.root, summary["classes"], summary["images"], time.perf_counter() - start,
                    )
        with open(meta_path, encoding="utf-8") as handle:
            return json.load(handle)

    @contextlib.contextmanager
    def _generation_lock(self):
        """Let one process generate while others (e.g. the ranks of a torchrun job) wait for it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".generate.lock", "w") as handle:
            if fcntl is not None:  # no lock where fcntl is missing (Windows): generate from one process there
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _check_parameters(self, min_fonts: int, image_size: int) -> None:
        asked = {"min_fonts": min_fonts, "image_size": image_size, "generator_version": GENERATOR_VERSION}
        for key, value in asked.items():
            found = self.meta.get(key)
            if found != value:
                raise ValueError(
                    f"the Glyphs dataset in {self.root} was generated with {key}={found}, but {key}={value} "
                    f"is asked: point DATA.ROOT at another folder, or delete {self.root} to regenerate it"
                )

    def _load_images(self, list_file: Path, image_size: int) -> np.ndarray:
        images = np.empty((len(self.paths), image_size, image_size), dtype=np.uint8)
        for i in range(len(self.paths)):
            path = self.full_path(i)
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {path} listed in {list_file} is missing; delete {self.root} to regenerate"
                )
            with Image.open(path) as image:
                if image.mode != "L" or image.size != (image_size, image_size):
                    raise ValueError(
                        f"image {path} is {image.mode} {image.size[0]}x{image.size[1]}, "
                        f"expected L {image_size}x{image_size}"
                    )
                images[i] = np.asarray(image)
        return images

    def full_path(self, index: int) -> Path:
        return self.image_root / str(self.paths[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"Glyphs(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes})"
        )
