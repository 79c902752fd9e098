"""Any folder of images, described by list files of `relative/path,label` lines.

    ListDataset("data/mine/train.txt")            # one list file (split = its stem)
    ListDataset("data/mine", split="train")       # a folder holding train.txt and test.txt

Paths are relative to the folder of the list file; the label is any integer (it is
relabelled to 0..C-1). The path is everything before the last comma, so paths may
contain commas. Blank lines are ignored. DATA.NAME list reads DATA.ROOT/<split>.txt;
the test split is evaluated leave-one-out.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .base import DatasetFormatError, ImageListDataset, Record, check_relative_path, parse_int, read_lines
from .build import DATASET_REGISTRY


@DATASET_REGISTRY.register("list")
class ListDataset(ImageListDataset):
    """Images listed as `relative/path,label` lines in `<root>/<split>.txt` or in one given list file."""

    NAME = "list"
    SPLITS = ("train", "test")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("test", None)}
    RECALL_KS = (1, 2, 4, 8)
    DOWNLOAD_URL = ""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        transform: Callable | None = None,
        bad_images: str = "error",
    ):
        root = Path(root).expanduser()
        self._single_file = root.is_file()
        if self._single_file:
            self.list_file = root
            folder, split = root.parent, (split if split is not None else root.stem)
        else:
            if split is None:
                raise ValueError(
                    f"ListDataset: {root} is not a list file; to read a folder pass split "
                    f"(one of {self.SPLITS}) and put <split>.txt in it"
                )
            self.list_file = root / f"{split}.txt"
            folder = root
        super().__init__(folder, split, transform=transform, bad_images=bad_images)

    def _check_split(self, split: str) -> None:
        if not self._single_file:  # a single list file may be called anything
            super()._check_split(split)

    def source_hint(self) -> str:
        return "write one 'relative/path,label' line per image, paths relative to the list file"

    def _read_records(self, split: str) -> list[Record]:
        list_file = self.list_file if self._single_file else self.require_file(f"{split}.txt")
        return [Record(path, label) for path, label in read_path_label_list(list_file)]


def read_path_label_list(list_file: Path) -> list[tuple[str, int]]:
    """(relative path, integer label) of every `relative/path,label` line (blank lines skipped).

    A malformed line, a non-integer label or a path leaving the list's folder is a
    DatasetFormatError naming the file and the line. Glyphs' list files use this format too.
    """
    entries = []
    for line_no, line in read_lines(list_file):
        path, comma, label = line.rpartition(",")
        if not comma or not path.strip():
            raise DatasetFormatError(
                f"{list_file}, line {line_no}: expected 'relative/path,label', found {line!r}"
            )
        entries.append((check_relative_path(path.strip(), list_file, line_no),
                        parse_int(label.strip(), list_file, line_no, "label")))
    return entries
