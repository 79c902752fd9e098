"""DeepFashion2 consumer-to-shop retrieval (Ge et al. 2019), read from the files as downloaded.

DATA.ROOT is the unpacked folder holding the train and validation sets:

    train/image/000001.jpg ...        train/annos/000001.json ...
    validation/image/000001.jpg ...   validation/annos/000001.json ...

Each JSON holds `source` (user | shop), `pair_id`, and items `item1`, `item2`, ...
with `category_id`, `style` and `bounding_box` [x1, y1, x2, y2]. Every item is one
dataset entry: its image cropped to the ground-truth box.

Identity follows the official retrieval evaluation of the DeepFashion2 repository
(github.com/switchablenorms/DeepFashion2 at commit fdf5ac3,
deepfashion2_api/PythonAPI/deepfashion2_retrieval_test.py): a query item is evaluated
only if its style is > 0 (line 134), and its correct gallery items are those with the
same pair_id and the same style (lines 146-147); the category is not compared, and the
gallery ground truth (evaluation/evaluation.md: gallery_gt.json holds gallery_image_id,
style, pair_id, bbox) does not even carry it. So the label here is (pair_id, style) for
style > 0, and a style-0 item is never a positive. This matters: in the official query
ground truth (evaluation/query_gt.json as added at commit a5182f6, since removed from the
repository), 95 of the 3,043 (pair_id, style) identities have items of two or three
categories (e.g. pair 29, style 1: categories 1 and 5), covering 1,092 of the 12,550
queries with style > 0.

Splits:
  train   - items of train/ with style > 0 (user and shop), label (pair_id, style).
            Style-0 items are left out: they can never form a positive pair, and a class
            of one image cannot fill an m-per-class batch.
  gallery - all shop items of validation/: the official gallery is every shop image of the
            validation set (data/val/list_gallery.txt at commit e013db1 lists 21,438 images,
            48 more than have an item in gallery_gt.json, which lists style > 0 items only).
            A style-0 item gets a label of its own (a distractor that matches no query).
  query   - user items of validation/ with style > 0 (the README's consumer-to-shop task:
            consumer items are the queries) that have at least one positive in the
            gallery; the others are dropped (their recall is undefined). The official
            evaluation asserts that every query has one (line 152), so on the official data
            none should be dropped.

The official protocol scores detected boxes (a retrieved item counts when its IoU with
a correct gallery item is >= 0.5); here the ground-truth boxes are used for query and
gallery, as in the rows of the repository README's Table 9 evaluated on ground-truth boxes.

Reading ~200k JSON files takes minutes, so they are read once into a compact index,
`<subset>.tsv`, one line per item. It is looked for in `index_dir` if given, else in
DATA.ROOT/xbm_index/, then in ~/.cache/xbm/deepfashion2-<hash of the root>/. When none
exists it is built on first use into the first writable of those folders; or build it
beforehand with `python scripts/prepare_deepfashion2.py --root DATA.ROOT` (do that
before a multi-process run, so the processes do not each build it). Delete the index
(or pass --force to the script) after changing the annotation files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .base import DatasetFormatError, ImageListDataset, Record, misplaced_root, open_text
from .build import DATASET_REGISTRY

logger = logging.getLogger(__name__)

SUBSETS = ("train", "validation")
INDEX_VERSION = "xbm-deepfashion2-index v1"
INDEX_COLUMNS = ("image", "source", "pair_id", "item", "category_id", "style", "x1", "y1", "x2", "y2")
_ITEM_KEY = re.compile(r"item(\d+)$")


@dataclass(frozen=True)
class ItemRow:
    """One clothing item of one image, as stored in the index."""

    image: str
    source: str
    pair_id: int
    item: int
    category_id: int
    style: int
    box: tuple[int, int, int, int]


# -- building the index -------------------------------------------------------------------------
def _require_int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise DatasetFormatError(f"{where}: {field} {value!r} is not an integer")
    return int(value)


def read_annotation(json_file: Path) -> list[ItemRow]:
    """The items of one DeepFashion2 annotation file (boxes rounded to whole pixels)."""
    try:
        with open_text(json_file) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise DatasetFormatError(f"{json_file}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_file}: expected a JSON object")
    source = data.get("source")
    if source not in ("user", "shop"):
        raise DatasetFormatError(f"{json_file}: source {source!r} is not 'user' or 'shop'")
    pair_id = _require_int(data.get("pair_id"), str(json_file), "pair_id")
    rows = []
    for key, item in data.items():
        match = _ITEM_KEY.match(key)
        if match is None:
            continue
        where = f"{json_file} {key}"
        if not isinstance(item, dict):
            raise DatasetFormatError(f"{where}: expected an object")
        box = item.get("bounding_box")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise DatasetFormatError(f"{where}: bounding_box {box!r} is not [x1, y1, x2, y2]")
        rows.append(
            ItemRow(
                image=json_file.stem,
                source=source,
                pair_id=pair_id,
                item=int(match.group(1)),
                category_id=_require_int(item.get("category_id"), where, "category_id"),
                style=_require_int(item.get("style"), where, "style"),
                box=tuple(int(round(v)) for v in box),
            )
        )
    return rows


def _format_row(row: ItemRow) -> str:
    return "\t".join(map(str, (row.image, row.source, row.pair_id, row.item, row.category_id, row.style, *row.box)))


def build_index(
    root: str | os.PathLike,
    subset: str,
    out_file: str | os.PathLike,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, int]:
    """Read every `root/subset/annos/*.json` into `out_file` (written atomically). Returns counts.

    Items whose box is empty (x2 <= x1 or y2 <= y1) are left out and counted.
    """
    annos = Path(root) / subset / "annos"
    if not annos.is_dir():
        found = misplaced_root(Path(root), [f"{subset}/annos"], Path.is_dir)
        if found is not None:
            raise FileNotFoundError(
                f"DeepFashion2: folder {annos} not found, but {found[0] / found[1]} exists; "
                f"did you mean DATA.ROOT {found[0]}?"
            )
        raise FileNotFoundError(
            f"DeepFashion2: {annos} not found; DATA.ROOT must hold train/ and validation/ as unpacked "
            f"(download: {DeepFashion2.DOWNLOAD_URL})"
        )
    files = sorted(annos.glob("*.json"))
    if not files:
        raise ValueError(f"DeepFashion2: {annos} holds no .json annotation files")
    if workers > 1:
        import multiprocessing

        with multiprocessing.Pool(workers) as pool:
            per_file = pool.imap(read_annotation, files, chunksize=256)
            per_file = list(progress(per_file) if progress else per_file)
    else:
        per_file = [read_annotation(f) for f in (progress(files) if progress else files)]
    rows = [row for rows_of_file in per_file for row in rows_of_file]
    kept = [r for r in rows if r.box[2] > r.box[0] and r.box[3] > r.box[1]]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f"{out_file.name}.{os.getpid()}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(f"# {INDEX_VERSION} subset={subset} annotations={len(files)} items={len(kept)}\n")
        handle.write("\t".join(INDEX_COLUMNS) + "\n")
        handle.writelines(_format_row(r) + "\n" for r in kept)
    os.replace(partial, out_file)  # atomic: a reader never sees a half-written index
    return {"annotations": len(files), "items": len(kept), "empty_boxes": len(rows) - len(kept)}


def _parse_index_line(line: str) -> ItemRow | None:
    fields = line.rstrip("\n").split("\t")
    if len(fields) != len(INDEX_COLUMNS):
        return None
    try:
        pair_id, item, category_id, style, *box = (int(v) for v in fields[2:])
    except ValueError:
        return None
    return ItemRow(fields[0], fields[1], pair_id, item, category_id, style, tuple(box))


def read_index(index_file: Path) -> list[ItemRow]:
    """The rows of an index written by `build_index`."""
    rows = []
    with open(index_file, encoding="utf-8") as handle:
        if not handle.readline().startswith(f"# {INDEX_VERSION}"):
            raise DatasetFormatError(f"{index_file}, line 1: not a {INDEX_VERSION} file; delete it to rebuild it")
        handle.readline()  # column names
        for line_no, line in enumerate(handle, start=3):
            row = _parse_index_line(line)
            if row is None:
                raise DatasetFormatError(f"{index_file}, line {line_no}: malformed; delete the index to rebuild it")
            rows.append(row)
    return rows


def default_index_dirs(root: str | os.PathLike) -> list[Path]:
    """Where the index is looked for and built, in order: beside the data, then the user cache."""
    absolute = str(Path(root).expanduser().resolve())
    digest = hashlib.sha1(absolute.encode("utf-8")).hexdigest()[:12]
    return [Path(absolute) / "xbm_index", Path.home() / ".cache" / "xbm" / f"deepfashion2-{digest}"]


# -- the dataset --------------------------------------------------------------------------------
@DATASET_REGISTRY.register("deepfashion2")
class DeepFashion2(ImageListDataset):
    """DeepFashion2 consumer-to-shop: items cropped by their box; splits train / query / gallery."""

    NAME = "DeepFashion2"
    SPLITS = ("train", "query", "gallery")
    TRAIN_SPLIT = "train"
    EVAL_TASKS = {"test": ("query", "gallery")}
    RECALL_KS = (1, 10, 20)
    DOWNLOAD_URL = "https://github.com/switchablenorms/DeepFashion2"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable | None = None,
        bad_images: str = "error",
        index_dir: str | os.PathLike | None = None,
    ):
        self.index_dir = None if index_dir is None else Path(index_dir).expanduser()
        self._rows_cache: dict[str, list[ItemRow]] = {}
        super().__init__(root, split, transform=transform, bad_images=bad_images)

    def _index_rows(self, subset: str) -> list[ItemRow]:
        if subset not in self._rows_cache:
            self._rows_cache[subset] = read_index(self._index_file(subset))
        return self._rows_cache[subset]

    def _index_file(self, subset: str) -> Path:
        folders = [self.index_dir] if self.index_dir is not None else default_index_dirs(self.root)
        for folder in folders:
            if (folder / f"{subset}.tsv").is_file():
                return folder / f"{subset}.tsv"
        self.require_dir(f"{subset}/annos")
        for folder in folders:
            try:
                logger.warning("DeepFashion2: building the %s index once into %s (reads every JSON)", subset, folder)
                stats = build_index(self.root, subset, folder / f"{subset}.tsv")
                logger.warning("DeepFashion2: %s index done: %s", subset, stats)
                return folder / f"{subset}.tsv"
            except OSError as err:  # a read-only folder: try the next one
                logger.warning("DeepFashion2: cannot write the index into %s (%s)", folder, err)
        raise PermissionError(
            f"DeepFashion2: cannot write the {subset} index into any of {[str(f) for f in folders]}; run "
            f"python scripts/prepare_deepfashion2.py --root {self.root} --out DIR and pass index_dir=DIR"
        )

    def _read_records(self, split: str) -> list[Record]:
        if split == "train":
            return [self._record("train", r) for r in self._index_rows("train") if r.style > 0]
        rows = self._index_rows("validation")
        gallery = [self._record("validation", r) for r in rows if r.source == "shop"]
        if split == "gallery":
            return gallery
        gallery_keys = {record.key for record in gallery}
        queries = (self._record("validation", r) for r in rows if r.source == "user" and r.style > 0)
        return [record for record in queries if record.key in gallery_keys]

    @staticmethod
    def _record(subset: str, row: ItemRow) -> Record:
        return Record(f"{subset}/image/{row.image}.jpg", identity(row), row.box)


def identity(row: ItemRow) -> str:
    """The class key of an item: its (pair_id, style) as the official evaluation matches them.

    A style-0 item matches nothing, so it gets a key no other item has.
    """
    if row.style > 0:
        return f"{row.pair_id:08d}/{row.style}"
    return f"style0/{row.image}/{row.item}"


def multi_category_identities(rows: Iterable[ItemRow]) -> dict[str, set[int]]:
    """The identities (style > 0) whose items span more than one category, with those categories."""
    categories: dict[str, set[int]] = {}
    for row in rows:
        if row.style > 0:
            categories.setdefault(identity(row), set()).add(row.category_id)
    return {key: cats for key, cats in categories.items() if len(cats) > 1}
