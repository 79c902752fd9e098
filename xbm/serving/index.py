"""A gallery index on disk: a faiss index of unit embeddings plus what is needed to use it.

Layout of an index folder::

    INDEX_DIR/index.json                  the manifest (written last, atomically)
    INDEX_DIR/vectors-<generation>.faiss  the faiss index the manifest names

The manifest holds the format version, the embedding model's identity (the sha256 of the
checkpoint it came from, the embedding dimension), the test-time transform, the faiss
index-factory string and search parameters, and one path (plus a label or null) per vector.

Writing is atomic: the new faiss file is written under a fresh generation name and fsynced,
then the manifest is written to a temporary file, fsynced and renamed over index.json. A kill
at any point leaves index.json naming a complete faiss file: the old index until the rename,
the new one after it. Files of unfinished or replaced generations are removed by the next
write.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import faiss
import numpy as np

from ..utils.files import TEMP_PREFIX, write_atomically

FORMAT_NAME = "xbm-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
_VECTOR_FILE = re.compile(r"^vectors-[0-9a-f]{16}\.faiss$")

# Index types by name; {nlist} and {pq} are filled in from the gallery's size and dimension.
# Any other value of --index-type is taken as a faiss index-factory string.
INDEX_TYPES = {
    "flat": "Flat",
    "ivf-flat": "IVF{nlist},Flat",
    "ivf-pq": "IVF{nlist},PQ{pq}",
    "hnsw": "HNSW32",
}
# IVF k-means wants at least 39 training points per list (faiss warns below that).
_POINTS_PER_LIST = 39


class IndexFolderError(ValueError):
    """An index folder that cannot be read or written as asked (the message names it)."""


def default_nlist(num_vectors: int) -> int:
    """Inverted lists for an IVF index: a power of two near 4 sqrt(N), with >= 39 points per list."""
    target = 4 * math.sqrt(max(num_vectors, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * _POINTS_PER_LIST > num_vectors:
        nlist //= 2
    return nlist


def default_pq_bytes(dim: int) -> int:
    """Sub-quantizers of a PQ code: one byte per 4 dimensions (the largest divisor of dim <= dim / 4)."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def factory_string(index_type: str, num_vectors: int, dim: int) -> str:
    """The faiss index-factory string of --index-type (a name of INDEX_TYPES or a factory string)."""
    template = INDEX_TYPES.get(index_type.lower(), index_type)
    return template.format(nlist=default_nlist(num_vectors), pq=default_pq_bytes(dim))


def default_search_params(factory: str) -> str:
    """Search-time parameters for an index type (a faiss ParameterSpace string, '' for none).

    nprobe = nlist / 64 and efSearch = 256: on the clustered galleries of
    benchmarks/bench_index.py (1M x 128, 100k x 512) IVF-Flat kept recall@10 1.000 of exact search
    at >= 13x its speed on 2 cores, HNSW32 >= 0.959 (efSearch 128 fell to 0.931 on 1M x 128; see
    BENCHMARKS.md). Real embeddings are less neatly clustered:
    check recall on your own gallery and raise them with --search-params if it falls short.
    """
    match = re.search(r"IVF(\d+)", factory)
    if match:
        return f"nprobe={max(1, int(match.group(1)) // 64)}"
    if "HNSW" in factory:
        return "efSearch=256"
    return ""


def new_faiss_index(factory: str, dim: int):
    """An empty inner-product faiss index of the factory string, or a ValueError naming the string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(
            f"--index-type {factory!r} is neither one of {sorted(INDEX_TYPES)} nor a faiss index-factory "
            "string for inner-product search (e.g. Flat, IVF1024,Flat, IVF1024,PQ32, HNSW32)"
        ) from None


def train_sample(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """At most `size` rows of `vectors`, drawn without replacement (all of them if there are fewer)."""
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return vectors[rows]


def build_faiss_index(vectors: np.ndarray, factory: str, train_size: int = 100_000, seed: int = 0):
    """A faiss index of the factory string holding `vectors`, trained on a sample of them if it needs it."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_faiss_index(factory, vectors.shape[1])
    if not index.is_trained:
        sample = train_sample(vectors, train_size, seed)
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(
                f"index type {factory!r} cannot be trained on {len(sample)} vectors ({_faiss_reason(err)}): "
                "index more images, pick smaller parameters or use Flat"
            ) from None
    index.add(vectors)
    return index


def set_search_params(index, params: str) -> None:
    """Apply a faiss ParameterSpace string such as 'nprobe=32' or 'efSearch=128' ('' does nothing)."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as err:
        raise ValueError(f"search parameters {params!r} do not apply to this index ({_faiss_reason(err)})") from None


def _faiss_reason(err: RuntimeError) -> str:
    """The last line of a faiss error, without the C++ location."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text.split("failed: ")[-1].split("Error: ")[-1].strip()


@dataclass
class GalleryIndex:
    """A faiss index and its manifest fields: the model, the transform and one path/label per vector."""

    index: object
    model: dict  # sha256, dim, kind, source
    transform: dict
    factory: str
    search_params: str = ""
    paths: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)
    created: str = ""

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, paths: list[str], labels: list) -> None:
        """Append vectors (already embedded) with their paths and labels."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"the new vectors have shape {vectors.shape}, but the index holds {self.dim}-d vectors")
        if not (len(vectors) == len(paths) == len(labels)):
            raise ValueError("vectors, paths and labels differ in length")
        self.index.add(vectors)
        self.paths.extend(paths)
        self.labels.extend(labels)

    def search(self, queries: np.ndarray, k: int, params: str | None = None):
        """(scores, ids) of the k best items per query, best first; ids -1 where fewer were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"the query model embeds into {queries.shape[-1]} dimensions, but the index holds "
                f"{self.dim}-dimensional vectors"
            )
        set_search_params(self.index, self.search_params if params is None else params)
        return self.index.search(queries, max(1, min(k, len(self))))

    def manifest(self, vector_file: str) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": self.model,
            "dim": self.dim,
            "transform": self.transform,
            "index": {"factory": self.factory, "metric": "inner_product", "search_params": self.search_params,
                      "file": vector_file, "count": len(self)},
            "paths": self.paths,
            "labels": self.labels,
        }


def check_writable(folder: str) -> None:
    """Refuse to write an index into an existing folder that holds something other than an index."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise IndexFolderError(f"index folder {folder} is a file; choose a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST)):
        raise IndexFolderError(
            f"{folder} is not empty and holds no {MANIFEST}: it is not an xbm index, so nothing is written "
            "there; choose a new or empty folder"
        )


def save_index(gallery: GalleryIndex, folder: str) -> None:
    """Write the index atomically (see the module docstring), then remove stale generations."""
    check_writable(folder)
    os.makedirs(folder, exist_ok=True)
    vector_file = f"vectors-{uuid.uuid4().hex[:16]}.faiss"
    write_atomically(os.path.join(folder, vector_file), faiss.serialize_index(gallery.index).tobytes())
    manifest = json.dumps(gallery.manifest(vector_file), indent=1).encode("utf-8")
    write_atomically(os.path.join(folder, MANIFEST), manifest)
    _fsync_folder(folder)
    _remove_stale_files(folder, keep=vector_file)


def _fsync_folder(folder: str) -> None:
    """Make the renames durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_files(folder: str, keep: str) -> None:
    for name in os.listdir(folder):
        if name != keep and (_VECTOR_FILE.match(name) or name.startswith(TEMP_PREFIX)):
            os.remove(os.path.join(folder, name))


def load_index(folder: str) -> GalleryIndex:
    """Read an index folder, or raise IndexFolderError with one sentence that says what is wrong with it."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise IndexFolderError(f"index folder {folder} does not exist; build one with xbm-index")
    if not os.path.isfile(manifest_path):
        raise IndexFolderError(f"{folder} is not an xbm index folder ({MANIFEST} is missing); build one with xbm-index")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFolderError(f"{manifest_path} is not valid JSON ({err}); rebuild the index with xbm-index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFolderError(f"{manifest_path} is not an xbm index manifest; rebuild the index with xbm-index")
    if manifest.get("version") != FORMAT_VERSION:
        raise IndexFolderError(
            f"index {folder} was written in index format version {manifest.get('version')!r}, but this xbm "
            f"reads version {FORMAT_VERSION}; rebuild it with this version's xbm-index"
        )
    try:
        info, paths, labels = manifest["index"], manifest["paths"], manifest["labels"]
        vector_path = os.path.join(folder, info["file"])
        model, transform, dim = manifest["model"], manifest["transform"], int(manifest["dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise IndexFolderError(f"{manifest_path} lacks the field {err}; rebuild the index with xbm-index") from None
    if not os.path.isfile(vector_path):
        raise IndexFolderError(f"{vector_path}, named by {manifest_path}, is missing; rebuild the index with xbm-index")
    try:
        index = faiss.read_index(vector_path)
    except RuntimeError as err:
        raise IndexFolderError(f"{vector_path} is not a readable faiss index ({_faiss_reason(err)})") from None
    if index.ntotal != len(paths) or len(paths) != len(labels) or index.d != dim:
        raise IndexFolderError(
            f"{manifest_path} lists {len(paths)} paths, {len(labels)} labels and dim {dim}, but {vector_path} "
            f"holds {index.ntotal} vectors of dim {index.d}; rebuild the index with xbm-index"
        )
    return GalleryIndex(index=index, model=model, transform=transform, factory=info.get("factory", ""),
                        search_params=info.get("search_params", ""), paths=list(paths), labels=list(labels),
                        created=manifest.get("created", ""))
