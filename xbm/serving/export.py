"""xbm-export: a checkpoint's embedding model (backbone + head + L2 normalisation) as a
TorchScript or ONNX file, with a JSON sidecar FILE.json that says how to feed it and what it returns.

Both files are written atomically (temporary file in the same folder, fsync, rename), the
model first and the sidecar last, so a sidecar always describes a complete model file.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch

from ..utils.files import readable_mode, write_atomically
from .images import input_summary
from .models import RUNTIMES, SIDECAR_FORMAT, SIDECAR_VERSION, CheckpointEmbedder, sha256_file, sidecar_path

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


def export_model(ckpt: str, runtime: str, out: str, opts: list[str] | None = None) -> dict:
    """Export the checkpoint's model to `out` (+ `out`.json); returns the sidecar's content."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--format {runtime!r} is not one of {RUNTIMES}")
    source = CheckpointEmbedder(ckpt, device="cpu", opts=opts)
    model = source.model.float().eval()
    example = torch.zeros(2, 3, source.image_size, source.image_size)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(out)[1], dir=folder)
    os.close(fd)
    try:
        if runtime == "torchscript":
            _write_torchscript(model, example, tmp)
        else:
            _write_onnx(model, example, tmp)
        _fsync(tmp)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "runtime": runtime,
        "file": os.path.basename(out),
        "file_sha256": sha256_file(out),
        "checkpoint": source.source,
        "checkpoint_sha256": source.sha256,
        "backbone": source.cfg.MODEL.BACKBONE.NAME,
        "input": {"name": INPUT_NAME, **input_summary(source.steps, source.image_size)},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", source.dim], "dim": source.dim, "normalized": True,
                   "meaning": "unit-length embeddings: the inner product of two is their cosine similarity"},
        "torch_version": torch.__version__,
    }
    if runtime == "onnx":
        meta["opset"] = ONNX_OPSET
    write_atomically(sidecar_path(out), json.dumps(meta, indent=1).encode("utf-8"))
    return meta


def _write_torchscript(model, example, path: str) -> None:
    with warnings.catch_warnings():
        # The backbones check input shapes in Python; tracing records the check's outcome, which
        # is what we want for fixed-size inputs, so the TracerWarning is noise here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely deployed
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(path)


def _write_onnx(model, example, path: str) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with a sentence rather than deep inside)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError("--format onnx needs the onnx and onnxscript packages: pip install 'xbm[serve]'") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET,
                                    dynamo=True, external_data=False, verbose=False)
    program.save(path, external_data=False)


def _fsync(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


