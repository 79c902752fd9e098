"""What xbm-index and xbm-search do, as functions: build or extend an index, search it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from ..utils.files import write_atomically
from .images import ImageInputError, image_paths, load_image
from .index import (
    GalleryIndex,
    IndexFolderError,
    build_faiss_index,
    check_writable,
    default_search_params,
    factory_string,
    load_index,
    new_faiss_index,
    save_index,
    set_search_params,
)
from .models import ModelInputError, load_embedder

SPLIT_NEEDS_CHECKPOINT = "--split reads the checkpoint's dataset config, so it needs --ckpt (not --model)"


@dataclass
class GallerySource:
    """The images to index: absolute paths, labels (None when unknown) and how to decode item i."""

    paths: list[str]
    labels: list
    load: Callable[[int], object]

    def __len__(self) -> int:
        return len(self.paths)


def images_source(folder: str) -> GallerySource:
    """Every image under a folder, without labels."""
    if not os.path.isdir(folder):
        raise ImageInputError(f"image folder {folder} does not exist")
    paths = image_paths(folder)
    return GallerySource(paths, [None] * len(paths), lambda i: load_image(paths[i]))


def list_source(list_file: str) -> GallerySource:
    """A `relative/path,label` list file, the format of DATA.NAME list (paths relative to the file)."""
    from pathlib import Path

    from ..data.datasets.list_dataset import read_path_label_list

    if not os.path.isfile(list_file):
        raise ImageInputError(f"list file {list_file} does not exist")
    entries = read_path_label_list(Path(list_file))
    if not entries:
        raise ImageInputError(f"list file {list_file} lists no images")
    folder = os.path.dirname(os.path.abspath(list_file))
    paths = [os.path.join(folder, p) for p, _ in entries]
    return GallerySource(paths, [int(label) for _, label in entries], lambda i: load_image(paths[i]))


def split_source(embedder, split: str) -> GallerySource:
    """A split of the checkpoint's dataset, read by the dataset's own code (its crops, its labels)."""
    from ..data.datasets import build_dataset

    if not hasattr(embedder, "cfg"):
        raise ModelInputError(SPLIT_NEEDS_CHECKPOINT)
    dataset = build_dataset(embedder.cfg, split, transform=None)
    paths = [os.path.abspath(str(dataset.full_path(i))) for i in range(len(dataset))]
    return GallerySource(paths, [int(v) for v in dataset.labels], lambda i: dataset[i][0])


def build_index(embedder, source: GallerySource, out: str, index_type: str = "flat", train_size: int = 100_000,
                search_params: str | None = None, add: bool = False, overwrite: bool = False,
                batch_size: int = 64, workers: int = 4, skip_bad: bool = False, progress: bool = True) -> str:
    """Embed the source's images and write (or, with `add`, extend) the index at `out`.

    Returns a one-line summary. Nothing is written when any check or image fails.
    """
    existing = None
    if add:
        existing = load_index(out)
        check_same_model(existing, embedder, out)
    else:
        check_writable(out)
        if os.path.isfile(os.path.join(out, "index.json")) and not overwrite:
            raise IndexFolderError(
                f"{out} already holds an index: pass --add to append to it or --overwrite to replace it")
    seen, todo = set(existing.paths) if existing else set(), []
    for i, path in enumerate(source.paths):  # each file once; with --add, only files not yet indexed
        if path not in seen:
            seen.add(path)
            todo.append(i)
    if not todo:
        return f"{out}: all {len(source)} images are already in the index; nothing written"
    if existing is None:  # a string faiss cannot parse fails before the images are embedded
        new_faiss_index(factory_string(index_type, len(todo), embedder.dim), embedder.dim)
    vectors, kept = embed_images_of(embedder, source, todo, batch_size, workers, skip_bad, progress)
    if vectors.shape[1] != (existing.dim if existing else embedder.dim):
        raise ModelInputError(f"the model returned {vectors.shape[1]}-d embeddings, not {embedder.dim}-d as it says")
    paths = [source.paths[todo[j]] for j in kept]
    labels = [source.labels[todo[j]] for j in kept]
    if existing is not None:
        existing.add(vectors, paths, labels)
        gallery = existing
    else:
        factory = factory_string(index_type, len(vectors), vectors.shape[1])
        params = default_search_params(factory) if search_params is None else search_params
        index = build_faiss_index(vectors, factory, train_size=train_size)
        set_search_params(index, params)  # fail before writing if the parameters do not apply
        gallery = GalleryIndex(index=index, model=embedder.identity, transform={"steps": embedder.steps},
                               factory=factory, search_params=params, paths=paths, labels=labels)
    save_index(gallery, out)
    verb = "added" if existing is not None else "indexed"
    return (f"{out}: {verb} {len(paths)} images ({len(gallery)} in all, {gallery.dim}-d, {gallery.factory}"
            f"{', ' + gallery.search_params if gallery.search_params else ''})")


def embed_images_of(embedder, source: GallerySource, positions: list[int], batch_size: int, workers: int,
                    skip_bad: bool, progress: bool):
    from .models import embed_images

    return embed_images(embedder, positions, source.load, batch_size=batch_size, workers=workers,
                        skip_bad=skip_bad, progress=progress)


def check_same_model(gallery: GalleryIndex, embedder, index_dir: str) -> None:
    """Refuse a model other than the one that built the index: another dimension, checkpoint or transform."""
    built_by = gallery.model
    if embedder.dim != gallery.dim:
        raise ModelInputError(
            f"the model {embedder.source} embeds into {embedder.dim} dimensions, but index {index_dir} holds "
            f"{gallery.dim}-dimensional vectors of another model ({built_by.get('source')}); use that model")
    if embedder.sha256 != built_by.get("sha256"):
        raise ModelInputError(
            f"index {index_dir} was built by the model of checkpoint sha256 {str(built_by.get('sha256'))[:12]}... "
            f"({built_by.get('source')}), but {embedder.source} comes from checkpoint sha256 "
            f"{embedder.sha256[:12]}...; search with the model that built it or rebuild the index")
    if gallery.transform.get("steps") != embedder.steps:
        raise ModelInputError(
            f"the model {embedder.source} preprocesses images differently from the one that built index "
            f"{index_dir} (compare 'transform' in its index.json); use the same input settings")


def model_of_index(gallery: GalleryIndex, index_dir: str, device: str):
    """The embedder recorded in the index (the checkpoint or exported file that built it)."""
    source, kind = gallery.model.get("source"), gallery.model.get("kind")
    if not source or not os.path.isfile(source):
        raise ModelInputError(
            f"the model that built index {index_dir} ({source}) is not there any more; pass --ckpt or --model")
    if kind == "checkpoint":
        return load_embedder(ckpt=source, device=device)
    return load_embedder(model=source, device=device)


@dataclass
class Match:
    rank: int
    path: str
    score: float
    label: object


def search_images(gallery: GalleryIndex, embedder, queries: list[str], topk: int, params: str | None = None,
                  batch_size: int = 64, workers: int = 4, progress: bool = False) -> list[list[Match]]:
    """The top-k matches of each query image, best first (decoding all queries before searching)."""
    from .models import embed_images

    if topk < 1:
        raise ValueError(f"--topk must be at least 1, got {topk}")
    vectors, _ = embed_images(embedder, queries, load_image, batch_size=batch_size, workers=workers,
                              progress=progress, desc="queries")
    scores, ids = gallery.search(vectors, topk, params)
    results = []
    for row_scores, row_ids in zip(scores, ids):
        results.append([Match(rank + 1, gallery.paths[i], float(s), gallery.labels[i])
                        for rank, (s, i) in enumerate(zip(row_scores.tolist(), row_ids.tolist())) if i >= 0])
    return results


def label_of(gallery: GalleryIndex, path: str):
    """The label of a query that is itself in the gallery (else None): lets --plot mark hits and misses."""
    try:
        return gallery.labels[gallery.paths.index(path)]
    except ValueError:
        return None


def format_results(queries: list[str], results: list[list[Match]]) -> str:
    lines = []
    for query, matches in zip(queries, results):
        lines.append(f"query {query}")
        for m in matches:
            label = "" if m.label is None else f"  label {m.label}"
            lines.append(f"  {m.rank:>3}  {m.score:8.4f}  {m.path}{label}")
    return "\n".join(lines)


def write_json(path: str, index_dir: str, gallery: GalleryIndex, embedder, queries: list[str],
               results: list[list[Match]], topk: int) -> None:
    """The results as JSON, written atomically."""
    document = {
        "index": os.path.abspath(index_dir),
        "model": embedder.identity,
        "topk": topk,
        "search_params": gallery.search_params,
        "results": [{"query": q, "matches": [m.__dict__ for m in matches]} for q, matches in zip(queries, results)],
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_atomically(path, json.dumps(document, indent=1).encode("utf-8"))


MAX_PLOT_ROWS = 20


def plot_results(path: str, gallery: GalleryIndex, queries: list[str], results: list[list[Match]]) -> int:
    """Draw the first MAX_PLOT_ROWS queries and their matches; returns the number of rows drawn."""
    from ..utils.retrieval_grid import QUERY_COLOR, draw_retrieval_grid, result_color

    rows = []
    for query, matches in list(zip(queries, results))[:MAX_PLOT_ROWS]:
        query_label = label_of(gallery, query)
        cells = [(load_image(query), QUERY_COLOR, f"query {os.path.basename(query)}")]
        for m in matches:
            try:
                image = load_image(m.path)
            except ImageInputError:
                image = None  # the file moved since indexing: an empty cell, still with its score
            cells.append((image, result_color(query_label, m.label), f"#{m.rank}  {m.score:.3f}"))
        rows.append(cells)
    draw_retrieval_grid(rows, path)
    return len(rows)
