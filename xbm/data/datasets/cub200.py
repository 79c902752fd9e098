"""Caltech-UCSD Birds 200-2011, read from the files as downloaded.

DATA.ROOT is the unpacked `CUB_200_2011/` folder:

    images.txt               <image_id> <path relative to images/>
    image_class_labels.txt   <image_id> <class_id 1..200>
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...

The metric-learning protocol splits by class: classes 1-100 train (5,864 images),
101-200 test (5,924 images, leave-one-out). The official train_test_split.txt is
for classification and is not used.
"""
from __future__ import annotations

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path, parse_int, read_lines, split_fields
from .build import DATASET_REGISTRY


@DATASET_REGISTRY.register("cub200")
class CUB200(ImageListDataset):
    """CUB-200-2011: classes 1-100 train, 101-200 test."""

    NAME = "CUB-200-2011"
    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}
    RECALL_KS = (1, 2, 4, 8)
    DOWNLOAD_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
    TRAIN_CLASSES = range(1, 101)
    TEST_CLASSES = range(101, 201)

    def _read_records(self, split: str) -> list[Record]:
        images_file = self.require_file("images.txt")
        labels_file = self.require_file("image_class_labels.txt")
        self.image_root = self.root / "images"
        paths: dict[int, str] = {}
        for line_no, line in read_lines(images_file):
            image_id, path = split_fields(line, 2, images_file, line_no, "image_id path")
            paths[parse_int(image_id, images_file, line_no, "image_id")] = check_relative_path(
                path, images_file, line_no
            )
        wanted = self.TRAIN_CLASSES if split == "train" else self.TEST_CLASSES
        records = []
        for line_no, line in read_lines(labels_file):
            image_id, class_id = split_fields(line, 2, labels_file, line_no, "image_id class_id")
            image_id = parse_int(image_id, labels_file, line_no, "image_id")
            class_id = parse_int(class_id, labels_file, line_no, "class_id")
            if image_id not in paths:
                raise DatasetFormatError(f"{labels_file}, line {line_no}: image_id {image_id} is not in {images_file}")
            if class_id in wanted:
                records.append(Record(paths[image_id], class_id))
        return records
