"""Training throughput of the real training step, in images per second, per speed setting.

The step is `DefaultTrainer.train_step` (network forward and backward, XBM memory adaptation and
enqueue, in-batch and memory losses, optimizer), fed with random uint8 images that already sit
on the device: it measures the device, not JPEG decoding. Each setting is compared with float32
on the same backbone in the same run (`vs fp32`), since absolute numbers on a shared machine vary.

Settings: fp32 | amp (bf16 where the device has it, else fp16) | amp_cl (+ channels_last)
| amp_cl_compile (+ torch.compile with inductor).

Usage: python benchmarks/bench_train_throughput.py --device cuda [--backbones resnet50 bninception]
       [--size 224] [--batch 64] [--steps 20] [--warmup 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import load_cfg  # noqa: E402
from xbm.engine.defaults import DefaultTrainer  # noqa: E402

SETTINGS = {
    "fp32": {"amp": False, "channels_last": False, "compile": False},
    "amp": {"amp": True, "channels_last": False, "compile": False},
    "amp_cl": {"amp": True, "channels_last": True, "compile": False},
    "amp_cl_compile": {"amp": True, "channels_last": True, "compile": True},
}
IMAGES_PER_CLASS = 4


def write_list_dataset(folder: str, classes: int = 8) -> str:
    """A tiny `list` dataset (the trainer needs one to start; the timed steps do not read it)."""
    from PIL import Image

    for split in ("train", "test"):
        lines = []
        for label in range(classes):
            for i in range(IMAGES_PER_CLASS):
                name = f"{split}_{label}_{i}.png"
                Image.new("RGB", (8, 8), (label * 20, i * 40, 100)).save(os.path.join(folder, name))
                lines.append(f"{name},{label}")
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


def amp_name(device: torch.device) -> str:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def build_trainer(data_root: str, out: str, backbone: str, setting: str, device: torch.device, batch: int,
                  size: int, memory: int, dim: int) -> DefaultTrainer:
    flags = SETTINGS[setting]
    opts = [
        "OUTPUT_DIR", out, "DATA.NAME", "list", "DATA.ROOT", data_root, "MODEL.DEVICE", str(device),
        "MODEL.BACKBONE.NAME", backbone, "MODEL.HEAD.DIM", str(dim), "INPUT.IMAGE_SIZE", str(size),
        "INPUT.RESIZE", str(size), "DATA.BATCH_SIZE", str(batch), "DATA.NUM_INSTANCES", str(IMAGES_PER_CLASS),
        "DATA.UINT8_TRANSFER", "True", "XBM.ENABLE", "True", "XBM.SIZE", str(memory), "XBM.START_ITERATION", "0",
        "XBM.ADAPT.NAME", "xbn", "SOLVER.AMP", amp_name(device) if flags["amp"] else "none",
        "PERF.CHANNELS_LAST", str(flags["channels_last"]), "PERF.COMPILE", "inductor" if flags["compile"] else "",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "0",
    ]
    return DefaultTrainer(load_cfg(opts=opts))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: DefaultTrainer, batch: int, size: int, steps: int, warmup: int) -> float:
    """Images per second over `steps` timed steps, after `warmup` untimed ones (compilation, autotuning)."""
    device = trainer.device
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, device=device, dtype=torch.uint8)
    labels = torch.arange(batch // IMAGES_PER_CLASS, device=device).repeat_interleave(IMAGES_PER_CLASS)
    for _ in range(warmup):
        trainer.train_step(images, labels)
        trainer.iteration += 1
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
        trainer.iteration += 1
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def run(device: torch.device, backbones: list[str], settings: list[str], batch: int, size: int, steps: int,
        warmup: int, memory: int, dim: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_list_dataset(os.path.join(folder))
        for backbone in backbones:
            baseline = None
            for setting in settings:
                trainer = build_trainer(data, os.path.join(folder, f"{backbone}_{setting}"), backbone, setting,
                                        device, batch, size, memory, dim)
                rate = measure(trainer, batch, size, steps, warmup)
                baseline = rate if setting == "fp32" else baseline
                rows.append({"backbone": backbone, "setting": setting, "images_per_s": rate,
                             "vs_fp32": rate / baseline if baseline else None,
                             "amp": trainer.cfg.SOLVER.AMP})
                print(f"  {backbone} {setting}: {rate:.1f} images/s", flush=True)
                del trainer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backbone | setting | autocast | images/s | vs fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.2f}x"
        lines.append(f"| {r['backbone']} | {r['setting']} | {r['amp']} | {r['images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "bninception"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cuDNN autotuning)")
    parser.add_argument("--memory", type=int, default=55_000, help="XBM.SIZE (SOP's)")
    parser.add_argument("--dim", type=int, default=512, help="MODEL.HEAD.DIM")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.settings[0] != "fp32":
        parser.error("--settings must start with fp32, the baseline of the ratios")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    rows = run(device, args.backbones, args.settings, args.batch, args.size, args.steps, args.warmup, args.memory,
               args.dim)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
