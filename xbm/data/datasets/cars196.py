"""Stanford Cars (Cars196, Krause et al. 2013), read from the files as downloaded.

DATA.ROOT is the dataset folder in either of the two layouts it is distributed in,
detected automatically:

  all-in-one (the original page's cars_annos.mat + car_ims.tgz):
    cars_annos.mat       struct array `annotations` with fields relative_im_path
                         ('car_ims/000001.jpg'), bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                         class (1..196) and test (0/1), plus `class_names`
    car_ims/000001.jpg ...

  devkit (car_devkit.tgz + cars_train.tgz + cars_test.tgz, what most mirrors and
  torchvision's StanfordCars use today):
    devkit/cars_train_annos.mat             struct array `annotations` with fields
                                            bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    devkit/cars_test_annos_withlabels.mat   the same for the test images (also accepted
                                            beside devkit/, where torchvision looks for it)
    devkit/cars_meta.mat                    class names (not needed here)
    cars_train/00001.jpg ...   cars_test/00001.jpg ...
                               (or cars_train/cars_train/..., as the Kaggle copy unpacks)

  The devkit's field names are those of its README.txt (fname, class, bbox_x1...) and of
  torchvision's reader (torchvision/datasets/stanford_cars.py, which reads
  annotation["fname"] and annotation["class"] from these two files). Its
  devkit/cars_test_annos.mat has no `class` field: the labelled test file is a separate
  download. The all-in-one layout is used when cars_annos.mat is a real MATLAB file;
  if it is an HTML page (a failed download) and the devkit is there, the devkit is read.

The metric-learning protocol splits by class over all 16,185 images, ignoring the
classification split (the `test` flag, or which devkit file an image is in): classes
1-98 train (8,054 images), 99-196 test (8,131 images, leave-one-out). Whole images are
used (no bounding-box crop), as in the papers. Needs scipy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path
from .build import DATASET_REGISTRY

ALL_IN_ONE = "cars_annos.mat"
DEVKIT_TRAIN = "devkit/cars_train_annos.mat"
DEVKIT_TEST = ("devkit/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat")
DEVKIT_TEST_UNLABELLED = "devkit/cars_test_annos.mat"
# The original download links now often answer with an HTML error page; this torchvision
# issue collects the working copies (Kaggle images, car_devkit.tgz, the labelled test file).
MIRRORS = "https://github.com/pytorch/vision/issues/7545"
NUM_CLASSES = 196


def is_html(path: Path) -> bool:
    """True for a file that starts like an HTML page (a MATLAB file starts with 'MATLAB')."""
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith(b"<") and b"html" in head


def load_annotations(mat_file: Path, fields: tuple[str, ...]) -> np.ndarray:
    """The `annotations` struct array of a Cars .mat file, checked to have `fields`."""
    from scipy.io import loadmat  # imported here: scipy is only needed for this dataset

    if is_html(mat_file):
        raise DatasetFormatError(
            f"{mat_file} is an HTML page, not a MATLAB file, so its download failed; get the devkit layout "
            f"(devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat) from the copies listed at {MIRRORS}"
        )
    try:
        mat = loadmat(str(mat_file), squeeze_me=True)
    except Exception as err:  # scipy raises several types for a damaged file
        raise DatasetFormatError(f"{mat_file}: cannot read it as a MATLAB file ({err})") from err
    if "annotations" not in mat:
        raise DatasetFormatError(f"{mat_file}: no 'annotations' struct array (found {sorted(mat)})")
    annotations = np.atleast_1d(mat["annotations"])
    present = annotations.dtype.names or ()
    for field in fields:
        if field not in present:
            raise DatasetFormatError(f"{mat_file}: 'annotations' has no field {field!r} (fields: {present})")
    return annotations


def class_of(entry, where: str) -> int:
    """The 1-based class id of one annotation, checked to be an integer in 1..196."""
    try:
        value = entry["class"]
        class_id = int(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{where}: class {entry['class']!r} is not an integer") from None
    if class_id != value or not 1 <= class_id <= NUM_CLASSES:
        raise DatasetFormatError(f"{where}: class {value!r} is not an integer in 1..{NUM_CLASSES}")
    return class_id


@DATASET_REGISTRY.register("cars196")
class Cars196(ImageListDataset):
    """Cars196: classes 1-98 train, 99-196 test, from cars_annos.mat or the devkit layout."""

    NAME = "Cars196"
    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}
    RECALL_KS = (1, 2, 4, 8)
    DOWNLOAD_URL = "http://ai.stanford.edu/~jkrause/cars/car_dataset.html"
    TRAIN_CLASSES = range(1, 99)
    TEST_CLASSES = range(99, 197)

    def source_hint(self) -> str:
        return f"download: {self.DOWNLOAD_URL}, or the copies listed at {MIRRORS}"

    def _read_records(self, split: str) -> list[Record]:
        wanted = self.TRAIN_CLASSES if split == "train" else self.TEST_CLASSES
        entries = self._all_in_one() if self.layout() == "all-in-one" else self._devkit()
        return [Record(path, class_id) for path, class_id in entries if class_id in wanted]

    def layout(self) -> str:
        """'all-in-one' or 'devkit', whichever is under the root (all-in-one first, unless it is HTML)."""
        all_in_one, devkit = self.root / ALL_IN_ONE, self.root / DEVKIT_TRAIN
        if all_in_one.is_file() and not (devkit.is_file() and is_html(all_in_one)):
            return "all-in-one"
        if devkit.is_file():
            return "devkit"
        raise self._not_found((ALL_IN_ONE, DEVKIT_TRAIN), Path.is_file)

    def _all_in_one(self) -> list[tuple[str, int]]:
        mat_file = self.root / ALL_IN_ONE
        entries = []
        for number, entry in enumerate(load_annotations(mat_file, ("relative_im_path", "class")), start=1):
            where = f"{mat_file} annotation {number}"
            path = check_relative_path(str(entry["relative_im_path"]), where, None)
            entries.append((path, class_of(entry, where)))
        return entries

    def _devkit(self) -> list[tuple[str, int]]:
        test_file = next((self.root / c for c in DEVKIT_TEST if (self.root / c).is_file()), None)
        if test_file is None:
            unlabelled = " (devkit/cars_test_annos.mat has no class labels)" if (
                self.root / DEVKIT_TEST_UNLABELLED).is_file() else ""
            raise FileNotFoundError(
                f"{self.NAME}: {self.root / DEVKIT_TEST[0]} not found{unlabelled}; get "
                f"cars_test_annos_withlabels.mat from the copies listed at {MIRRORS} and put it in devkit/"
            )
        entries = []
        for mat_file, folder in ((self.root / DEVKIT_TRAIN, "cars_train"), (test_file, "cars_test")):
            annotations = load_annotations(mat_file, ("fname", "class"))
            folder = self._image_folder(folder, str(annotations[0]["fname"]) if len(annotations) else "")
            for number, entry in enumerate(annotations, start=1):
                where = f"{mat_file} annotation {number}"
                name = check_relative_path(str(entry["fname"]), where, None)
                entries.append((f"{folder}/{name}", class_of(entry, where)))
        return entries

    def _image_folder(self, folder: str, first_name: str) -> str:
        """cars_train (or cars_test), or the doubled cars_train/cars_train of the Kaggle copy."""
        nested = f"{folder}/{folder}"
        if not (self.root / folder / first_name).is_file() and (self.root / nested / first_name).is_file():
            return nested
        return folder
