"""Stanford Cars (Cars196, Krause et al. 2013), read from the files as downloaded.

DATA.ROOT is the folder holding the all-in-one annotation file and the images:

    cars_annos.mat     struct array `annotations` with fields relative_im_path
                       ('car_ims/000001.jpg'), bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                       class (1..196) and test (0/1), plus `class_names`
    car_ims/000001.jpg ...

The metric-learning protocol splits by class, ignoring the `test` flag: classes
1-98 train (8,054 images), 99-196 test (8,131 images, leave-one-out). Whole
images are used (no bounding-box crop), as in the papers. Needs scipy.
"""
from __future__ import annotations

import numpy as np

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path


class Cars196(ImageListDataset):
    """Cars196: classes 1-98 train, 99-196 test."""

    NAME = "Cars196"
    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}
    RECALL_KS = (1, 2, 4, 8)
    DOWNLOAD_URL = "http://ai.stanford.edu/~jkrause/cars/car_dataset.html"
    TRAIN_CLASSES = range(1, 99)
    TEST_CLASSES = range(99, 197)

    def _read_records(self, split: str) -> list[Record]:
        from scipy.io import loadmat  # imported here: scipy is only needed for this dataset

        mat_file = self.require_file("cars_annos.mat")
        try:
            mat = loadmat(str(mat_file), squeeze_me=True)
        except Exception as err:  # scipy raises several types for a damaged file
            raise DatasetFormatError(f"{mat_file}: cannot read it as a MATLAB file ({err})") from err
        if "annotations" not in mat:
            raise DatasetFormatError(f"{mat_file}: no 'annotations' struct array (found {sorted(mat)})")
        annotations = np.atleast_1d(mat["annotations"])
        fields = annotations.dtype.names or ()
        for field in ("relative_im_path", "class"):
            if field not in fields:
                raise DatasetFormatError(f"{mat_file}: 'annotations' has no field {field!r} (fields: {fields})")
        wanted = self.TRAIN_CLASSES if split == "train" else self.TEST_CLASSES
        records = []
        for number, entry in enumerate(annotations, start=1):
            where = f"{mat_file} annotation {number}"
            try:
                class_id = int(entry["class"])
            except (TypeError, ValueError):
                raise DatasetFormatError(f"{where}: class {entry['class']!r} is not an integer") from None
            if class_id in wanted:
                path = check_relative_path(str(entry["relative_im_path"]), where, None)
                records.append(Record(path, class_id))
        return records
