"""Embedding models behind one interface: a training checkpoint, or an exported model + sidecar.

    embedder = load_embedder(ckpt="output/run/checkpoints/best.pth")      # needs the training code
    embedder = load_embedder(model="model.onnx")                          # reads model.onnx.json
    vectors, kept = embed_images(embedder, paths, load_image)

Every embedder has `identity` (the sha256 of the checkpoint the weights come from, the
embedding dimension, its kind and file), `steps` (the test transform as data, see images.py)
and maps preprocessed (N, 3, H, W) float32 batches to (N, D) embeddings. An index built by one
embedder can be searched by another only if both identities name the same checkpoint: an
exported model's sidecar records the sha256 of its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from .images import ImageInputError, preprocess

SIDECAR_FORMAT = "xbm-exported-model"
SIDECAR_VERSION = 1
RUNTIMES = ("torchscript", "onnx")


class ModelInputError(ValueError):
    """A checkpoint, exported model or sidecar that cannot be used (the message names it)."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(model_file: str) -> str:
    return model_file + ".json"


class CheckpointEmbedder:
    """A training checkpoint: its config's model and test transform (imports the training code)."""

    kind = "checkpoint"

    def __init__(self, path: str, device: str = "auto", opts: list[str] | None = None):
        import torch

        from ..config import ConfigError
        from ..data.transforms import build_transforms
        from ..checkpoint.io import CheckpointError, load_checkpoint
        from ..checkpoint.config import config_of_checkpoint
        from ..modeling import build_model
        from ..data.transforms import input_geometry
        from .images import describe_transform

        if not os.path.isfile(path):
            raise ModelInputError(f"checkpoint {path} does not exist")
        try:
            self.cfg = config_of_checkpoint(path, opts)
            state = load_checkpoint(path)["model"]
        except ConfigError as err:
            raise ModelInputError(f"checkpoint {path}: {err}") from None
        except CheckpointError as err:  # names the file and what is wrong with it
            raise ModelInputError(str(err)) from None
        except KeyError as err:
            raise ModelInputError(f"checkpoint {path} has no {err} entry: is it a file written by xbm-train?") from None
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise ModelInputError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
        self.source = os.path.abspath(path)
        self.sha256 = sha256_file(path)
        self.device = _torch_device(device)
        self.model = build_model(self.cfg)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.transform = build_transforms(self.cfg, train=False)
        self.steps = describe_transform(self.transform)
        self.dim = int(self.model.dim)
        self.image_size = input_geometry(self.cfg).size
        self._torch = torch

    def preprocess(self, image) -> np.ndarray:
        return self.transform(image).numpy()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.model(self._torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    @property
    def identity(self) -> dict:
        return {"sha256": self.sha256, "dim": self.dim, "kind": self.kind, "source": self.source}


class ExportedEmbedder:
    """An exported model (TorchScript or ONNX) and its JSON sidecar; no training code needed."""

    def __init__(self, path: str, device: str = "auto"):
        if not os.path.isfile(path):
            raise ModelInputError(f"exported model {path} does not exist")
        meta = read_sidecar(path)
        self.kind = meta["runtime"]
        self.source = os.path.abspath(path)
        self.sha256 = meta["checkpoint_sha256"]
        self.dim = int(meta["output"]["dim"])
        self.steps = meta["input"]["steps"]
        self.image_size = int(meta["input"]["height"])
        if meta.get("file_sha256") and sha256_file(path) != meta["file_sha256"]:
            raise ModelInputError(
                f"{path} is not the file its sidecar {sidecar_path(path)} describes (sha256 differs); export again")
        self._run = _onnx_runner(path, device) if self.kind == "onnx" else _torchscript_runner(path, device)

    def preprocess(self, image) -> np.ndarray:
        return preprocess(image, self.steps)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)

    @property
    def identity(self) -> dict:
        return {"sha256": self.sha256, "dim": self.dim, "kind": self.kind, "source": self.source}


def read_sidecar(model_file: str) -> dict:
    path = sidecar_path(model_file)
    if not os.path.isfile(path):
        raise ModelInputError(f"{model_file} has no sidecar {path}: export the model with xbm-export")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelInputError(f"sidecar {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ModelInputError(f"{path} is not an xbm-export sidecar")
    if meta.get("version") != SIDECAR_VERSION:
        raise ModelInputError(
            f"sidecar {path} has format version {meta.get('version')!r}, but this xbm reads version "
            f"{SIDECAR_VERSION}; export the model again")
    for key in ("runtime", "checkpoint_sha256", "input", "output"):
        if key not in meta:
            raise ModelInputError(f"sidecar {path} lacks the key {key!r}; export the model again")
    if meta["runtime"] not in RUNTIMES:
        raise ModelInputError(f"sidecar {path}: runtime {meta['runtime']!r} is not one of {RUNTIMES}")
    return meta


def _torch_device(name: str):
    from ..utils.env import resolve_device

    try:
        return resolve_device(name, key="--device")
    except ValueError as err:
        raise ModelInputError(str(err)) from None


def _torchscript_runner(path: str, device: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    dev = _torch_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            module = torch.jit.load(path, map_location=dev).eval()
    except (RuntimeError, ValueError) as err:
        raise ModelInputError(f"cannot load TorchScript model {path}: {str(err).splitlines()[0]}") from None

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(batch).to(dev)).float().cpu().numpy()

    return run


def _onnx_runner(path: str, device: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        import onnxruntime
    except ImportError:
        raise ModelInputError(
            f"{path} is an ONNX model, but onnxruntime is not installed: pip install 'xbm[serve]'") from None
    available = onnxruntime.get_available_providers()
    want_gpu = (device or "auto").lower() != "cpu" and "CUDAExecutionProvider" in available
    providers = (["CUDAExecutionProvider"] if want_gpu else []) + ["CPUExecutionProvider"]
    try:
        session = onnxruntime.InferenceSession(path, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise ModelInputError(f"cannot load ONNX model {path}: {str(err).splitlines()[0]}") from None
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0]

    return run


def load_embedder(ckpt: str | None = None, model: str | None = None, device: str = "auto",
                  opts: list[str] | None = None):
    """The embedder of a checkpoint (`ckpt`) or of an exported model file (`model`)."""
    if (ckpt is None) == (model is None):
        raise ModelInputError("give exactly one of a checkpoint (--ckpt) and an exported model (--model)")
    if ckpt is not None:
        return CheckpointEmbedder(ckpt, device, opts)
    return ExportedEmbedder(model, device)


def embed_images(embedder, items: Sequence, load: Callable, batch_size: int = 64, workers: int = 4,
                 skip_bad: bool = False, progress: bool = True, desc: str = "embedding"):
    """Embed `items` (decoded by `load(item)` into PIL images) in batches.

    Decoding and preprocessing run in `workers` threads (PIL releases the GIL while decoding).
    Returns (vectors (n, D) float32, kept): `kept` lists the positions of the items embedded.
    An undecodable image raises ImageInputError naming it, unless `skip_bad`, which leaves it
    out (and names the skipped files on stderr).
    """
    from tqdm import tqdm

    if len(items) == 0:
        raise ImageInputError("there are no images to embed")

    def prepared(item):
        try:
            return embedder.preprocess(load(item)), None
        except ImageInputError as err:
            return None, str(err)

    chunks, kept, bad = [], [], []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch_items = items[start:start + batch_size]
            arrays = []
            for offset, (array, error) in enumerate(pool.map(prepared, batch_items)):
                if error is None:
                    arrays.append(array)
                    kept.append(start + offset)
                elif skip_bad:
                    bad.append(error)
                else:
                    raise ImageInputError(error)
            if arrays:
                chunks.append(embedder(np.stack(arrays)))
            bar.update(len(batch_items))
    if bad:
        import sys

        print(f"skipped {len(bad)} undecodable image(s): " + "; ".join(bad[:5]), file=sys.stderr)
    if not chunks:
        raise ImageInputError(f"none of the {len(items)} images could be decoded")
    return np.concatenate(chunks).astype(np.float32, copy=False), kept
