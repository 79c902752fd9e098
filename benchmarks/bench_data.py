#!/usr/bin/env python
"""Data-loading speed per worker: our dataset + transforms vs plain PIL + torchvision.

    python benchmarks/bench_data.py [--images 200] [--repeats 3] [--backbones resnet50 bninception]

Writes N JPEGs of 500x375 (smooth random content, quality 90, like a photo) to a
temporary folder, then times, in one process with one torch thread (what a single
DataLoader worker does), the training transform at 224 px:
  xbm    ListDataset(list file, transform=build_transforms(cfg, train=True)) read as training
         reads it: through SeededItems, 16 images per fetch, each transformed under its own
         seed (xbm/data/loader.py)
  plain  PIL open + convert("RGB") + the same torchvision steps + tensor conversion
         and normalisation to the backbone's convention, no framework around them.
Each method runs `repeats` times, interleaved; the best run is reported (least disturbed
by other processes). ratio = xbm / plain images per second (1.0 = no overhead).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xbm.config import get_cfg  # noqa: E402
from xbm.data.datasets.list_dataset import ListDataset  # noqa: E402
from xbm.data.loader import SeededItems, sample_seeds  # noqa: E402
from xbm.data.transforms import build_transforms, input_convention  # noqa: E402


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (upsampled coarse noise + fine grain) and a list file naming them."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, size=(height // 25, width // 25, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
        grain = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:04d}.jpg", format="JPEG", quality=90)
        lines.append(f"{i:04d}.jpg,{i // 4}")
    list_file = folder / "train.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


def plain_transform(cfg) -> T.Compose:
    """The same augmentation written directly with torchvision, then the backbone's convention."""
    convention = input_convention(cfg.MODEL.BACKBONE.NAME)
    steps = [T.Resize(cfg.INPUT.RESIZE), T.RandomResizedCrop(cfg.INPUT.IMAGE_SIZE, scale=tuple(cfg.INPUT.CROP_SCALE)),
             T.RandomHorizontalFlip(), T.ToTensor()]
    if convention.channel_order == "BGR":  # 0-255 BGR minus mean == Normalize(mean / 255, 1 / 255) on flipped 0-1
        steps += [T.Lambda(lambda x: x.flip(0)),
                  T.Normalize([m / 255 for m in convention.mean], [s / 255 for s in convention.std])]
    else:
        steps.append(T.Normalize(convention.mean, convention.std))
    return T.Compose(steps)


def time_xbm(list_file: Path, cfg, batch: int = 16) -> float:
    dataset = SeededItems(ListDataset(list_file, transform=build_transforms(cfg, train=True)))
    fetches = [[(i, seed) for i, seed in zip(range(start, min(start + batch, len(dataset))),
                                             sample_seeds(0, start // batch, batch))]
               for start in range(0, len(dataset), batch)]
    start = time.perf_counter()
    for items in fetches:
        dataset.__getitems__(items)
    return len(dataset) / (time.perf_counter() - start)


def time_plain(paths: list[Path], cfg) -> float:
    transform = plain_transform(cfg)
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            transform(image.convert("RGB"))
    return len(paths) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "bninception"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        list_file = write_jpegs(Path(tmp), args.images, 500, 375)
        paths = sorted(Path(tmp).glob("*.jpg"))
        print(f"{args.images} JPEGs 500x375, train transform at 224 px, 1 process, 1 torch thread, "
              f"best of {args.repeats}")
        print(f"{'backbone':<12} {'xbm img/s':>10} {'plain img/s':>12} {'ratio':>6}")
        for backbone in args.backbones:
            cfg = get_cfg()
            cfg.DATA.NAME, cfg.MODEL.BACKBONE.NAME, cfg.INPUT.IMAGE_SIZE = "list", backbone, 224
            time_xbm(list_file, cfg)  # warm-up: file cache, lazy imports
            ours, plain = 0.0, 0.0
            for _ in range(args.repeats):
                ours = max(ours, time_xbm(list_file, cfg))
                plain = max(plain, time_plain(paths, cfg))
            print(f"{backbone:<12} {ours:>10.1f} {plain:>12.1f} {ours / plain:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
