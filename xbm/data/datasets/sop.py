"""Stanford Online Products (Song et al. 2016), read from the files as downloaded.

DATA.ROOT is the unpacked `Stanford_Online_Products/` folder:

    Ebay_train.txt   Ebay_test.txt   bicycle_final/...   cabinet_final/...   ...

Each list file has the header `image_id class_id super_class_id path`, then one
space-separated line per image; paths are relative to the root. Train: classes
1-11,318 (59,551 images); test: 11,319-22,634 (60,502 images), evaluated
leave-one-out.
"""
from __future__ import annotations

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path, parse_int, read_lines, split_fields
from .build import DATASET_REGISTRY

_HEADER = ["image_id", "class_id", "super_class_id", "path"]


@DATASET_REGISTRY.register("sop")
class SOP(ImageListDataset):
    """Stanford Online Products: 22,634 products, 120,053 images; the label is `class_id`."""

    NAME = "SOP"
    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}
    RECALL_KS = (1, 10, 100, 1000)
    DOWNLOAD_URL = "https://cvgl.stanford.edu/projects/lifted_struct/"

    def _read_records(self, split: str) -> list[Record]:
        list_file = self.require_file(f"Ebay_{split}.txt")
        lines = read_lines(list_file)
        first = next(lines, None)
        if first is None or first[1].split() != _HEADER:
            raise DatasetFormatError(f"{list_file}, line 1: expected the header {' '.join(_HEADER)!r}")
        records = []
        for line_no, line in lines:
            _, class_id, _, path = split_fields(line, 4, list_file, line_no, " ".join(_HEADER))
            key = parse_int(class_id, list_file, line_no, "class_id")
            records.append(Record(check_relative_path(path, list_file, line_no), key))
        return records
