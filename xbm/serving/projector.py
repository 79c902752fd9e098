"""xbm-eval --projector N: N test embeddings, their labels and thumbnails for TensorBoard's projector.

Written by torch.utils.tensorboard's SummaryWriter.add_embedding, in the layout the projector
plugin reads (open it with `tensorboard --logdir OUT/projector`, tab "Projector"):

    OUT/projector/projector_config.pbtxt                 one entry per checkpoint
    OUT/projector/<iteration>/<checkpoint>/tensors.tsv   the N embeddings
    OUT/projector/<iteration>/<checkpoint>/metadata.tsv  label, class, image path (with a header)
    OUT/projector/<iteration>/<checkpoint>/sprite.png    the thumbnails, row-major

The folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np
import torch

# TensorBoard's projector refuses sprites over 8192 x 8192 pixels.
MAX_SPRITE_PIXELS = 8192
MAX_THUMBNAIL = 64


def thumbnail_size(count: int) -> int:
    """Square thumbnails that fit `count` of them in one sprite TensorBoard accepts."""
    per_row = math.ceil(math.sqrt(count))
    return max(1, min(MAX_THUMBNAIL, MAX_SPRITE_PIXELS // per_row))


def choose_items(num_items: int, count: int, seed: int = 0) -> list[int]:
    """`count` items of the split, drawn without replacement by a seeded generator, in split order."""
    if count < 1:
        raise ValueError(f"--projector needs a positive number of embeddings, got {count}")
    if count >= num_items:
        return list(range(num_items))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_items, size=count, replace=False))


def write_projector(cfg, ckpt_paths: list[str], count: int, out_dir: str, seed: int = 0) -> str:
    """Embed `count` images of the first evaluation task's query split with each checkpoint."""
    from torch.utils.data import Subset
    from torch.utils.tensorboard import SummaryWriter

    from ..data.datasets import build_dataset, dataset_class
    from ..data.transforms import build_transforms
    from ..checkpoint.io import load_checkpoint
    from ..evaluation.evaluator import compute_embeddings
    from ..modeling import build_model
    from ..utils.env import resolve_device

    split = next(iter(dataset_class(cfg).EVAL_TASKS.values()))[0]
    raw = build_dataset(cfg, split, transform=None)
    embedded = build_dataset(cfg, split, transform=build_transforms(cfg, train=False))
    items = choose_items(len(raw), count, seed)
    subset = Subset(embedded, items)
    subset.labels = np.asarray(embedded.labels)[items]  # compute_embeddings reads dataset.labels
    size = thumbnail_size(len(items))
    thumbnails = torch.stack([_thumbnail(raw[i][0], size) for i in items])
    metadata = [[int(raw.labels[i]), raw.class_name(int(raw.labels[i])), str(raw.full_path(i))] for i in items]

    device = resolve_device(cfg.MODEL.DEVICE)
    model = build_model(cfg).to(device)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-projector-", dir=parent)
    try:
        writer = SummaryWriter(log_dir=tmp)
        for path in ckpt_paths:
            state = load_checkpoint(path, map_location=device)
            model.load_state_dict(state["model"])
            vectors, _ = compute_embeddings(model, subset, device, cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS)
            writer.add_embedding(vectors, metadata=metadata, label_img=thumbnails,
                                 global_step=int(state.get("iteration") or 0),
                                 tag=os.path.splitext(os.path.basename(path))[0],
                                 metadata_header=["label", "class", "path"])
        writer.close()
        _replace_folder(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir


def _thumbnail(image, size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1]: the raw image, squashed to a square."""
    rgb = image.convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _replace_folder(new: str, target: str) -> None:
    """Put `new` at `target`; an older `target` is moved aside first and removed after."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".old-projector-", dir=os.path.dirname(os.path.abspath(target)))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(new, target)
    if old:
        shutil.rmtree(old)
