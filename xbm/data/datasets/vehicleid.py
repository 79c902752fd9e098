"""PKU VehicleID (Liu et al. 2016), read from the files as downloaded.

DATA.ROOT is the unpacked `VehicleID_V1.0/` folder:

    train_test_split/train_list.txt                       <image_name> <vehicle_id> per line
    train_test_split/test_list_800.txt, _1600, _2400      the Small / Medium / Large test sets
    image/<image_name>.jpg

Test protocol (one task per test size: small, medium, large): for every vehicle
id of the test list, one image is drawn as its gallery image and all its other
images are queries. The draw is deterministic: for each id it is made by a
`random.Random` seeded with "<gallery_seed>:<vehicle_id>" over the id's images
sorted by name, so it does not depend on the order of the list, and an id shared
by two test sizes gets the same gallery image in both. Ids with a single image
are gallery-only (they add distractors, no query). Recall@1/5.
"""
from __future__ import annotations

import os
import random
from collections import defaultdict
from typing import Callable

from .base import ImageListDataset, Record, check_relative_path, parse_int, read_lines, split_fields
from .build import DATASET_REGISTRY

TEST_SIZES = {"small": 800, "medium": 1600, "large": 2400}


@DATASET_REGISTRY.register("vehicleid")
class VehicleID(ImageListDataset):
    """VehicleID: train split plus query/gallery splits for the Small, Medium and Large test sets."""

    NAME = "VehicleID"
    SPLITS = ("train",) + tuple(f"{part}_{size}" for size in TEST_SIZES for part in ("query", "gallery"))
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {size: (f"query_{size}", f"gallery_{size}") for size in TEST_SIZES}
    RECALL_KS = (1, 5)
    DOWNLOAD_URL = "https://www.pkuml.org/resources/pku-vehicleid.html"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable | None = None,
        bad_images: str = "error",
        gallery_seed: int = 0,
    ):
        self.gallery_seed = int(gallery_seed)
        super().__init__(root, split, transform=transform, bad_images=bad_images)

    def _read_list(self, name: str) -> list[Record]:
        list_file = self.require_file(f"train_test_split/{name}")
        records = []
        for line_no, line in read_lines(list_file):
            image, vehicle = split_fields(line, 2, list_file, line_no, "image_name vehicle_id")
            key = parse_int(vehicle, list_file, line_no, "vehicle_id")
            records.append(Record(check_relative_path(f"{image}.jpg", list_file, line_no), key))
        return records

    def _read_records(self, split: str) -> list[Record]:
        self.image_root = self.root / "image"
        if split == "train":
            return self._read_list("train_list.txt")
        part, size = split.split("_")
        by_vehicle: dict[int, list[Record]] = defaultdict(list)
        for record in self._read_list(f"test_list_{TEST_SIZES[size]}.txt"):
            by_vehicle[record.key].append(record)
        chosen = []
        for vehicle, records in by_vehicle.items():
            records.sort(key=lambda r: r.path)
            gallery_index = random.Random(f"{self.gallery_seed}:{vehicle}").randrange(len(records))
            if part == "gallery":
                chosen.append(records[gallery_index])
            else:
                chosen.extend(r for i, r in enumerate(records) if i != gallery_index)
        return chosen
