"""What each encoder-side drift correction costs a training step: seconds and forward passes.

One XBN run on Glyphs (the conv net, supervised contrastive, batch 16, memory 4,096 filled before timing)
against the same run with each correction on, each a DefaultTrainer of its own, timed round-robin in one
process so that machine noise hits all alike:

  xbn                  the reference: XBM.ADAPT.NAME xbn
  + key encoder        XBM.KEY_MOMENTUM 0.99: the key encoder's forward of the batch (no gradient) and
                       its moving-average update after the step
  + refresh R          XBM.REFRESH_PER_STEP R: the RefreshMemory hook re-embeds R stored entries (their
                       images read and transformed again, eval mode, no gradient)
  + age weighting      XBM.AGE_WEIGHT_SCALE 100: the weights and a weighted loss kernel

A step here is `trainer.run_step()` (data loading included) plus the refresh hook where there is one.
Columns: ms per step (median over the repeats), the ratio to xbn, and the images each step sends through
a network (counted by forward pre-hooks on the model and the key encoder): with gradient / without.

Usage: python benchmarks/bench_drift_corrections.py [--threads 2] [--repeats 30] [--quick] [--root datasets/glyphs]
       [--min-fonts 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_loss import load_average  # noqa: E402
from xbm.config import load_cfg  # noqa: E402
from xbm.engine.defaults import DefaultTrainer  # noqa: E402
from xbm.engine.hooks import RefreshMemory  # noqa: E402

VARIANTS = {
    "xbn": [],
    "+ key encoder": ["XBM.KEY_MOMENTUM", "0.99"],
    "+ refresh 16": ["XBM.REFRESH_PER_STEP", "16"],
    "+ refresh 64": ["XBM.REFRESH_PER_STEP", "64"],
    "+ age weighting": ["XBM.AGE_WEIGHT_SCALE", "100.0"],
}


class ImageCounter:
    """Images sent through the networks, with and without gradient."""

    def __init__(self):
        self.with_grad = self.without_grad = 0

    def __call__(self, module, inputs):
        images = inputs[0].shape[0]
        if torch.is_grad_enabled():
            self.with_grad += images
        else:
            self.without_grad += images


def build(name: str, extra: list[str], args, folder: str) -> tuple[DefaultTrainer, ImageCounter]:
    cfg = load_cfg("configs/glyphs_xbn.yaml", [
        "OUTPUT_DIR", os.path.join(folder, name.replace(" ", "_").replace("+", "")), "DATA.ROOT", args.root,
        "MODEL.DEVICE", "cpu", "LOSS.NAME", "supcon", "DATA.BATCH_SIZE", "16", "XBM.SIZE", str(args.memory),
        "XBM.START_ITERATION", "0", "TEST.EVAL_PERIOD", "0", "DATA.VAL_FRACTION", "0.2", "DATA.NUM_WORKERS", "0",
        "DATA.GLYPHS.MIN_FONTS", str(args.min_fonts), *extra])
    trainer = DefaultTrainer(cfg)
    memory = trainer.objective.memory
    generator = torch.Generator().manual_seed(0)
    while not memory.is_full:  # a full memory of unit rows whose items are training images
        rows = torch.nn.functional.normalize(torch.randn(256, memory.dim, generator=generator), dim=1)
        ids = torch.randint(len(trainer.train_set), (256,), generator=generator)
        memory.enqueue(rows, torch.as_tensor(trainer.train_set.labels)[ids], ids if memory.track_items else None)
    counter = ImageCounter()
    trainer.model.register_forward_pre_hook(counter)
    if trainer.key_encoder is not None:
        trainer.key_encoder.encoder.register_forward_pre_hook(counter)
    trainer.network.train()
    trainer._batches = iter(trainer.train_loader())
    return trainer, counter


def step(trainer: DefaultTrainer) -> None:
    trainer.run_step()
    for hook in trainer.hooks:
        if isinstance(hook, RefreshMemory):
            hook.after_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="a memory of 512 and 3 repeats (a smoke test)")
    parser.add_argument("--root", default="datasets/glyphs")
    parser.add_argument("--min-fonts", type=int, default=8, help="DATA.GLYPHS.MIN_FONTS of the Glyphs at --root")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.memory, repeats = (512, 3) if args.quick else (4096, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}, memory {args.memory}, "
          f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as folder:
        runs = {name: build(name, extra, args, folder) for name, extra in VARIANTS.items()}
        for trainer, _ in runs.values():  # warm-up: allocator, loader workers, lazy init
            step(trainer)
        times = {name: [] for name in runs}
        for trainer, counter in runs.values():
            counter.with_grad = counter.without_grad = 0
        for _ in range(repeats):
            for name, (trainer, _) in runs.items():
                start = time.perf_counter()
                step(trainer)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["xbn"])
    print("| variant | ms per step | / xbn | images per step with gradient | without gradient |")
    print("|---|---|---|---|---|")
    for name, (trainer, counter) in runs.items():
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.3f} | {counter.with_grad / repeats:.0f} | "
              f"{counter.without_grad / repeats:.0f} |", flush=True)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
