"""The shared machinery of every image dataset read from disk as downloaded.

A dataset class only says how to read its own list files into `Record`s, and registers
itself under its DATA.NAME (`@DATASET_REGISTRY.register(...)`, xbm/data/datasets/build.py);
the base class `ImageListDataset` does the rest the same way for all of them:

* checks that the root folder and each list file exist, with an error that names
  the missing file and the dataset's download page; when the file is instead found
  one folder up or in a sub-folder of DATA.ROOT (a root pointed one level off), the
  error names that folder ("did you mean DATA.ROOT <folder>?");
* reads every text file through `open_text`, which drops a UTF-8 byte-order mark
  (files saved by some Windows editors start with one; it would otherwise stick
  to the first field and spoil the header or the first integer);
* refuses list paths that would leave the root (absolute paths, `..`);
* turns the raw class keys (ints or strings) into contiguous int64 labels
  0..C-1 (sorted by key, so the mapping is the same on every run). Query and
  gallery splits of one evaluation task share one mapping, built over both,
  because the evaluation compares labels across them;
* loads images with PIL as RGB, optionally cropped to a box.

Undecodable images (policy `bad_images`):
  "error" (default) - `ds[i]` raises an OSError naming the file.
  "skip"  - `ds[i]` substitutes the next decodable image of the same class
            (cyclically, in list order), counts the bad file and logs a warning
            the first time each bad file is met. Decoding all images up front
            would take minutes on 100k+ images, so bad files are found lazily.
            With DataLoader workers the count is per worker process.
  If every image of the class is undecodable, `ds[i]` raises in both modes.

Every listed image is checked for existence at construction (one os.scandir per folder, so
SOP's 120k files take about a second): a missing file stops the run before its first step with
the count and the first paths, not with an error at some later iteration or after training (a
test image). With "skip", missing files are reported once and treated as undecodable ones.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Hashable, Iterator, Sequence, TextIO

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ...input_convention import InputConvention
from ..image_steps import natural_image_steps

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Record:
    """One item of a split: image path relative to the image folder, raw class key, optional crop box."""

    path: str
    key: Hashable
    box: tuple[int, int, int, int] | None = None


class DatasetFormatError(ValueError):
    """A list file that does not follow its documented format (names the file and line)."""


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a text file for reading as UTF-8, dropping a leading byte-order mark if there is one."""
    return open(path, encoding="utf-8-sig")


def read_lines(list_file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for every non-blank line of a text file."""
    with open_text(list_file) as handle:
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if stripped:
                yield number, stripped


def parse_int(token: str, list_file: Path, line_no: int, what: str) -> int:
    """int(token), or a DatasetFormatError naming the file, the line and the field."""
    try:
        return int(token)
    except ValueError:
        raise DatasetFormatError(f"{list_file}, line {line_no}: {what} {token!r} is not an integer") from None


def split_fields(line: str, count: int, list_file: Path, line_no: int, layout: str) -> list[str]:
    """Whitespace-separated fields of a line that must have exactly `count` of them."""
    fields = line.split()
    if len(fields) != count:
        raise DatasetFormatError(
            f"{list_file}, line {line_no}: expected {count} fields ({layout}), found {len(fields)}: {line!r}"
        )
    return fields


def check_relative_path(path: str, list_file: Path | str, line_no: int | None) -> str:
    """The path in POSIX form, refusing absolute paths and `..` (they would read outside the dataset)."""
    where = f"{list_file}, line {line_no}" if line_no is not None else str(list_file)
    posix = PurePosixPath(path.replace("\\", "/"))
    if not path or posix.is_absolute() or Path(path).is_absolute() or ".." in posix.parts:
        raise DatasetFormatError(
            f"{where}: image path {path!r} must be relative to the dataset folder and must not contain '..'"
        )
    return str(posix)


def load_rgb(path: str | os.PathLike, box: Sequence[int] | None = None) -> Image.Image:
    """Decode an image file as RGB (and crop it to `box` = x1, y1, x2, y2, clamped to the image)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot decode image {path}: {err}") from err
    if box is None:
        return image
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(image.width, int(box[2])), min(image.height, int(box[3]))
    if x2 <= x1 or y2 <= y1:
        raise OSError(f"crop box {tuple(box)} is empty inside image {path} of size {image.width}x{image.height}")
    return image.crop((x1, y1, x2, y2))


def contiguous_labels(keys: Sequence[Hashable], universe: Sequence[Hashable]) -> np.ndarray:
    """Map each key to its rank among the sorted distinct keys of `universe` (int64)."""
    ordered = sorted(set(universe), key=lambda k: (str(type(k)), k))
    index = {key: i for i, key in enumerate(ordered)}
    return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))


def misplaced_root(
    root: Path, candidates: Sequence[str | os.PathLike], exists: Callable[[Path], bool]
) -> tuple[Path, str | os.PathLike] | None:
    """(folder, candidate) when a candidate path exists under root's parent or under a sub-folder of root.

    These are the two usual slips: DATA.ROOT set to the folder that holds the
    unpacked dataset, or to a folder inside it. Only this one level is searched
    (listing root's immediate sub-folders is cheap; a deeper walk of a dataset
    folder with 100k+ images is not).
    """
    neighbours = [root.parent] if root.parent != root else []
    try:
        neighbours += sorted(child for child in root.iterdir() if child.is_dir())
    except OSError:  # an unreadable root: only the parent is searched
        pass
    for folder in neighbours:
        for candidate in candidates:
            if exists(folder / candidate):
                return folder, candidate
    return None


class ImageListDataset(Dataset, ABC):
    """Base class: a list of (image, class) records of one split, read from a dataset folder.

    Subclasses set the class attributes and implement `_read_records(split)`, which
    returns the split's `Record`s (paths relative to `image_root`). Items are
    `(image, label)` with `image` a PIL RGB image, or `transform(image)`.
    """

    NAME = "dataset"
    SPLITS: tuple[str, ...] = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS: dict[str, tuple[str, str | None]] = {"test": ("test", None)}
    RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)
    DOWNLOAD_URL = ""
    # How pixels are normalised for the network: None = as the backbone's weights expect
    # (xbm.data.transforms.input_convention); a dataset whose images need their own convention sets it.
    INPUT_CONVENTION: InputConvention | None = None

    # -- how the config builds it (build_dataset calls these; a subclass overrides what differs) --
    @classmethod
    def from_config(cls, cfg, split: str, transform: Callable | None = None) -> "ImageListDataset":
        """Split `split` of the dataset in DATA.ROOT (checked first), with DATA.BAD_IMAGES."""
        cls.check_root(cfg.DATA.ROOT)
        return cls(cfg.DATA.ROOT, split, transform=transform, bad_images=cfg.DATA.BAD_IMAGES)

    @classmethod
    def check_root(cls, root: str | os.PathLike) -> None:
        """A downloaded dataset's root must exist and hold something, before any file is parsed."""
        if not os.path.isdir(root) or not os.listdir(root):
            where = f" (download it from {cls.DOWNLOAD_URL})" if cls.DOWNLOAD_URL else ""
            state = "does not exist" if not os.path.isdir(root) else "is empty"
            raise FileNotFoundError(
                f"DATA.ROOT {str(root)!r} {state}: point DATA.ROOT at the unpacked {cls.__name__} folder{where}; "
                "see the dataset table in README.md"
            )

    @classmethod
    def transform_steps(cls, cfg, train: bool) -> list:
        """The image steps before the input convention (xbm.data.transforms): natural-image augmentation."""
        return natural_image_steps(cfg, train)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable | None = None,
        bad_images: str = "error",
    ):
        self._check_split(split)
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.NAME} folder {self.root} does not exist; point DATA.ROOT at the unpacked dataset "
                f"folder ({self.source_hint()})"
            )
        self.split = split
        self.transform = transform
        self.bad_images = bad_images
        self.image_root = self.root
        records = self._read_records(split)
        if not records:
            raise ValueError(f"{self.NAME}: split {split!r} under {self.root} has no images")
        universe = [
            r.key for other in self._label_sharing_splits(split)
            for r in (records if other == split else self._read_records(other))
        ]
        self.labels = contiguous_labels([r.key for r in records], universe)
        self.paths = np.array([r.path for r in records])
        boxes = [r.box for r in records]
        self.boxes = None if all(b is None for b in boxes) else np.array(boxes, dtype=np.int64)
        self.bad_image_count = 0
        self._bad_paths: set[str] = set()
        self._class_members: dict[int, np.ndarray] | None = None
        self._check_images_exist()

    # -- what subclasses provide ------------------------------------------------------------
    @abstractmethod
    def _read_records(self, split: str) -> list[Record]:
        """The records of `split`, paths relative to `self.image_root` (which it may set)."""

    # -- shared behaviour ----------------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"{self.NAME}: split {split!r} is not one of {self.SPLITS}")

    def _label_sharing_splits(self, split: str) -> tuple[str, ...]:
        """The splits whose labels must agree with this one's: query and gallery of one task."""
        for query, gallery in self.EVAL_TASKS.values():
            if gallery is not None and split in (query, gallery):
                return (query, gallery)
        return (split,)

    def source_hint(self) -> str:
        """Where the data comes from, for error messages."""
        return f"download: {self.DOWNLOAD_URL}"

    def require_file(self, relative: str | os.PathLike, *alternatives: str | os.PathLike) -> Path:
        """root/relative (or the first root/alternative that exists), else one FileNotFoundError.

        The error names root/relative and the download page, or, when one of the
        candidates sits one folder up or in a sub-folder of the root, that folder.
        """
        candidates = (relative, *alternatives)
        for candidate in candidates:
            if (self.root / candidate).is_file():
                return self.root / candidate
        raise self._not_found(candidates, Path.is_file)

    def require_dir(self, relative: str | os.PathLike) -> Path:
        """root/relative, or a FileNotFoundError as `require_file`'s."""
        path = self.root / relative
        if not path.is_dir():
            raise self._not_found((relative,), Path.is_dir, "folder ")
        return path

    def _not_found(
        self, candidates: Sequence[str | os.PathLike], exists: Callable[[Path], bool], kind: str = ""
    ) -> FileNotFoundError:
        """The error for a missing root/candidates[0] (or any of the others), with a near miss if there is one."""
        relative = Path(candidates[0])
        found = misplaced_root(self.root, candidates, exists)
        if found is not None:
            folder, candidate = found
            return FileNotFoundError(
                f"{self.NAME}: {kind}{self.root / relative} not found, but {folder / candidate} exists; "
                f"did you mean DATA.ROOT {folder}?"
            )
        others = "".join(f" (or {c})" for c in candidates[1:])
        return FileNotFoundError(
            f"{self.NAME}: {kind}{self.root / relative}{others} not found; DATA.ROOT must be the unpacked dataset "
            f"folder ({self.source_hint()})"
        )

    def _check_images_exist(self) -> None:
        missing = missing_files(self.image_root, self.paths, f"{self.NAME} {self.split}: checking images")
        if not missing:
            return
        examples = ", ".join(str(self.image_root / p) for p in missing[:3])
        summary = (f"{self.NAME}: {len(missing)} of {len(self.paths)} images listed for split {self.split!r} "
                   f"do not exist, e.g. {examples}")
        if self.bad_images == "skip":
            self._bad_paths.update(missing)
            logger.warning("%s; DATA.BAD_IMAGES skip: another image of the same class replaces each", summary)
            return
        raise FileNotFoundError(
            f"{summary}; check that the images were unpacked under {self.image_root} ({self.source_hint()}), "
            "or set DATA.BAD_IMAGES skip to train without them"
        )

    def full_path(self, index: int) -> Path:
        return self.image_root / str(self.paths[index])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        label = int(self.labels[index])
        image = self._load(index) if self.bad_images == "error" else self._load_or_substitute(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def _load(self, index: int) -> Image.Image:
        box = None if self.boxes is None else self.boxes[index]
        return load_rgb(self.full_path(index), box)

    def _load_or_substitute(self, index: int) -> Image.Image:
        members = self._members_of(int(self.labels[index]))
        start = int(np.searchsorted(members, index))
        for step in range(len(members)):
            candidate = int(members[(start + step) % len(members)])
            if str(self.paths[candidate]) in self._bad_paths:
                continue
            try:
                return self._load(candidate)
            except OSError as err:
                self._bad_paths.add(str(self.paths[candidate]))
                self.bad_image_count += 1
                logger.warning(
                    "%s: skipping undecodable image (%d so far in this process): %s",
                    self.NAME, self.bad_image_count, err,
                )
        raise OSError(
            f"{self.NAME}: every image of class {int(self.labels[index])} is undecodable, e.g. {self.full_path(index)}"
        )

    def _members_of(self, label: int) -> np.ndarray:
        if self._class_members is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
            groups = np.split(order, bounds)
            self._class_members = {int(self.labels[g[0]]): g for g in groups}
        return self._class_members[label]

    def class_name(self, label: int) -> str:
        """How a label is shown to people (retrieval grids, the embedding projector): the label itself."""
        return str(label)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"classes={len(np.unique(self.labels))})"
        )


def missing_files(root: Path, paths: Sequence[str], description: str = "checking images") -> list[str]:
    """The `paths` (POSIX, relative to `root`) that do not exist, in list order.

    One os.scandir per folder instead of a stat per file: on a network file system 120k stats take
    minutes, 12 folder listings a second. A name the listing lacks is stat-ed on its own before it
    counts as missing (case-insensitive file systems).
    """
    by_folder: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        folder, _, name = str(path).rpartition("/")
        by_folder[folder].add(name)
    present: dict[str, set[str]] = {}
    with tqdm(total=len(paths), desc=description, unit="img", delay=2.0, leave=False) as bar:
        for folder, names in by_folder.items():
            try:
                with os.scandir(Path(root) / folder) as entries:
                    present[folder] = {entry.name for entry in entries}
            except (FileNotFoundError, NotADirectoryError):
                present[folder] = set()
            bar.update(len(names))
    missing = []
    for path in paths:
        folder, _, name = str(path).rpartition("/")
        if name not in present[folder] and not (Path(root) / str(path)).is_file():
            missing.append(str(path))
    return missing
