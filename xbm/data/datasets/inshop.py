"""DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016), read from the files as downloaded.

DATA.ROOT is the benchmark folder holding the partition file and the images:

    Eval/list_eval_partition.txt      (list_eval_partition.txt at the root is accepted too)
    img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...   (or Img/img/..., as in the download)

The partition file: line 1 the number of images, line 2 the header
`image_name item_id evaluation_status`, then `img/... id_000xxxxx train|query|gallery`.
Train: 25,882 images of 3,997 items; query 14,218 and gallery 12,612 images of
3,985 items, evaluated query -> gallery. The label is the item id; query and gallery
share one label mapping.
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path, parse_int, read_lines, split_fields
from .build import DATASET_REGISTRY

_HEADER = ["image_name", "item_id", "evaluation_status"]


@DATASET_REGISTRY.register("inshop")
class InShop(ImageListDataset):
    """In-Shop Clothes Retrieval: splits train / query / gallery; the label is the item id."""

    NAME = "In-Shop"
    SPLITS = ("train", "query", "gallery")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("query", "gallery")}
    RECALL_KS = (1, 10, 20, 30, 40, 50)
    DOWNLOAD_URL = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"

    def _partition_file(self) -> Path:
        return self.require_file("Eval/list_eval_partition.txt", "list_eval_partition.txt")

    def _read_records(self, split: str) -> list[Record]:
        list_file = self._partition_file()
        entries = self._read_partition(list_file)
        records = [Record(path, key) for path, key, status in entries if status == split]
        if records and not (self.root / records[0].path).is_file() and (self.root / "Img" / records[0].path).is_file():
            self.image_root = self.root / "Img"  # the download keeps img/ inside Img/
        return records

    @staticmethod
    def _read_partition(list_file: Path) -> list[tuple[str, str, str]]:
        lines = read_lines(list_file)
        count_line = next(lines, None)
        if count_line is None:
            raise DatasetFormatError(f"{list_file} is empty")
        expected = parse_int(count_line[1], list_file, count_line[0], "image count")
        header = next(lines, None)
        if header is None or header[1].split() != _HEADER:
            raise DatasetFormatError(f"{list_file}, line 2: expected the header {' '.join(_HEADER)!r}")
        entries = []
        for line_no, line in lines:
            path, item_id, status = split_fields(line, 3, list_file, line_no, " ".join(_HEADER))
            if status not in InShop.SPLITS:
                raise DatasetFormatError(
                    f"{list_file}, line {line_no}: evaluation_status {status!r} is not one of {InShop.SPLITS}"
                )
            entries.append((check_relative_path(path, list_file, line_no), item_id, status))
        if len(entries) != expected:
            raise DatasetFormatError(
                f"{list_file}: line 1 announces {expected} images but {len(entries)} are listed (truncated file?)"
            )
        return entries
