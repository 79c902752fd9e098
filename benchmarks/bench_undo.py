"""What the undo of a skipped step costs an XBN step, at the SOP size.

The trainer takes an undo point before every step (xbm/memory/undo.py), so that a step whose loss proves
non-finite can be taken back without a host synchronisation before it. Three versions of the same XBN
step (adapt the memory to the batch, enqueue, contrastive loss against the whole memory, backward), each
on its own copy of one full memory, timed round-robin in one run:

  xbn step         no undo point (what the objective alone does)
  + undo           today's undo point: the ring counters, copies of the batch's slots, a reference to the
                   feature buffer (the adaptation then writes into the spare buffer), the adapter's state
  + full copy      xbm 0.1's undo point: a copy of the whole feature buffer before each adapting step

Columns: ms per step (median over the repeats) and each version over the bare step. The goal: the undo
within 2% of the XBN step (`+ undo / xbn step` <= 1.02).

A second table shows where the undo's cost goes: the adaptation's one pass over the memory (addcmul),
written in place (a step without an undo point) and into a second buffer of the same size (an undoable
step), timed round-robin the same way. On a CPU every line of the second buffer is read before it is
written (write-allocate), so that pass moves half as many bytes again; the difference of the two passes
is what `+ undo` should cost over `xbn step`.

Usage: python benchmarks/bench_undo.py [--threads 2] [--repeats 15] [--quick] [--device cuda]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_loss import (Workload, load_average, make_loss, ours_memory, parse_timing_args,  # noqa: E402
                               step_ours, time_round_robin)
from xbm.memory import MomentMatching  # noqa: E402

# SOP: 59,551 training images and the XBN paper's 512-d embeddings (the memory holds the whole set).
FULL_CONFIGS = [(64, 59_551, 512)]
QUICK_CONFIGS = [(64, 8_192, 128)]
VERSIONS = ("xbn step", "+ undo", "+ full copy")


def with_undo(memory, adapter, step):
    """The step after the trainer's undo point (NonFiniteGuard.before_step -> CrossBatchObjective.undo_point)."""
    def undoable(emb, labels):
        memory.undo_point(emb.shape[0], adapting=True)
        adapter.state_dict()
        return step(emb, labels)

    return undoable


def with_full_copy(memory, adapter, step):
    """xbm 0.1's undo point: the whole feature buffer copied before the step."""
    def copying(emb, labels):
        memory.feats.clone()
        adapter.state_dict()
        return step(emb, labels)

    return copying


def run_config(batch: int, size: int, dim: int, repeats: int, device: torch.device) -> dict:
    work = Workload(batch, size, dim, device)
    _, _, emb, labels = work.on_device()
    loss = make_loss("contrastive")
    steps = {}
    for name in VERSIONS:
        memory, adapter = ours_memory(work, size - batch // 2), MomentMatching()
        step = step_ours(memory, loss, adapter)
        wrap = {"xbn step": lambda m, a, s: s, "+ undo": with_undo, "+ full copy": with_full_copy}[name]
        steps[name] = wrap(memory, adapter, step)
    return time_round_robin(steps, emb, labels, repeats, device)


def time_affine_passes(size: int, dim: int, repeats: int, device: torch.device) -> dict:
    """The adaptation's pass over a memory of `size` x `dim`, in place and into a second buffer. The scale is 1
    and the shift 0, so that repeating it leaves the values as they are (no drift into denormals)."""
    feats = torch.randn(size, dim, device=device)
    spare = torch.zeros_like(feats)
    scale, shift = torch.ones(dim, device=device), torch.zeros(dim, device=device)
    passes = {"in place": lambda emb, labels: torch.addcmul(shift, feats, scale, out=feats),
              "into a second buffer": lambda emb, labels: torch.addcmul(shift, feats, scale, out=spare)}
    dummy = torch.zeros(1, device=device)
    return time_round_robin(passes, dummy, dummy, repeats, device)


def main() -> None:
    args, device, repeats = parse_timing_args(__doc__, repeats=15)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}, "
          f"load average at start: {load_average()}")
    print("| B | M | D | " + " | ".join(f"{n} ms" for n in VERSIONS) + " | + undo / xbn step | + full copy / xbn step |")
    print("|" + "---|" * (3 + len(VERSIONS) + 2))
    for batch, size, dim in QUICK_CONFIGS if args.quick else FULL_CONFIGS:
        times = {k: statistics.median(v) for k, v in run_config(batch, size, dim, repeats, device).items()}
        cells = [f"{times[n] * 1e3:.1f}" for n in VERSIONS]
        ratios = [f"{times[n] / times['xbn step']:.3f}" for n in VERSIONS[1:]]
        print(f"| {batch} | {size:,} | {dim} | " + " | ".join(cells + ratios) + " |", flush=True)
    print("\n| M | D | adaptation pass in place ms | into a second buffer ms | difference ms |")
    print("|---|---|---|---|---|")
    for _, size, dim in QUICK_CONFIGS if args.quick else FULL_CONFIGS:
        times = {k: statistics.median(v) for k, v in time_affine_passes(size, dim, repeats, device).items()}
        inplace, second = times["in place"] * 1e3, times["into a second buffer"] * 1e3
        print(f"| {size:,} | {dim} | {inplace:.2f} | {second:.2f} | {second - inplace:+.2f} |", flush=True)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
