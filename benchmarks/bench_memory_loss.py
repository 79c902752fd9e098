"""One training step's memory work, timed side by side with a peer and the arithmetic floor.

A step = [adapt the memory (XBN / AXBN)] + enqueue the batch + loss forward and
backward against the whole memory, as in the trainer. Columns:

  xbm    : ours, no adaptation (XBM)
  xbn    : ours with MomentMatching written back (XBN)
  axbn   : ours with KalmanMomentMatching (AXBN)
  adapt  : CrossBatchMemory.adapt_ with MomentMatching alone (XBN's extra work)
  peer   : pytorch-metric-learning's CrossBatchMemory wrapping the same loss
  floor  : the two B x M x D matrix products alone (S = A @ Mem.T, dA = G @ Mem)

Peer configurations (chosen to compute XBM's losses):
  contrastive: ContrastiveLoss(pos_margin=1, neg_margin=0.5, distance=CosineSimilarity(),
               reducer=SumReducer()) / B. Per pair relu(1 - S) and relu(S - 0.5): the
               same gradient as ours (its value differs by 0.5 per active negative).
  multi-sim  : MultiSimilarityLoss(alpha=2, beta=ours, base=0.5) + MultiSimilarityMiner(0.1).
Both losses' gradients are compared with ours on the same memory before timing.

Usage: python benchmarks/bench_memory_loss.py [--threads 2] [--repeats 9] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.losses import ContrastiveLoss, MultiSimilarityLoss  # noqa: E402
from xbm.memory import CrossBatchMemory, KalmanMomentMatching, MomentMatching  # noqa: E402

try:
    import pytorch_metric_learning as pml
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning import reducers as pml_reducers
except ImportError:
    pml = None

FULL_CONFIGS = [(64, 55_000, 512), (64, 8_192, 128)]
QUICK_CONFIGS = [(64, 8_192, 128)]
IMAGES_PER_CLASS = 4  # batch = B / 4 classes x 4 images, as the papers' sampler
MEMORY_IMAGES_PER_CLASS = 5  # SOP: 59,551 images / 11,318 classes
# Norm of the per-item noise around its class centre: with it some negatives are
# active (contrastive: S > 0.5) and multi-similarity mines some pairs, as mid-training.
NOISE = 1.2


class Workload:
    """Clustered unit embeddings with SOP-like label statistics, so that the losses
    see realistic numbers of positives and active negatives."""

    def __init__(self, batch: int, size: int, dim: int, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        classes = max(size // MEMORY_IMAGES_PER_CLASS, batch)
        self.centers = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
        self.common = F.normalize(torch.randn(dim, generator=gen), dim=0)
        self.common_weight = torch.rand(classes, generator=gen) * 1.4 + 0.2
        self.gen, self.batch, self.size, self.dim, self.device = gen, batch, size, dim, device
        self.memory_labels = torch.randint(0, classes, (size,), generator=gen)
        self.memory_feats = self.embed(self.memory_labels)
        picked = torch.randperm(classes, generator=gen)[: batch // IMAGES_PER_CLASS]
        self.batch_labels = picked.repeat_interleave(IMAGES_PER_CLASS)
        self.batch_feats = self.embed(self.batch_labels)

    def embed(self, labels: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(len(labels), self.dim, generator=self.gen) * NOISE / self.dim**0.5
        raw = self.centers[labels] + self.common_weight[labels, None] * self.common + noise
        return F.normalize(raw, dim=1)

    def on_device(self):
        to = lambda t: t.to(self.device)  # noqa: E731
        return to(self.memory_feats), to(self.memory_labels), to(self.batch_feats), to(self.batch_labels)


def ours_memory(work: Workload, pointer: int) -> CrossBatchMemory:
    """A full memory holding the workload, with the write pointer at ``pointer``."""
    feats, labels, _, _ = work.on_device()
    mem = CrossBatchMemory(work.size, work.dim, device=work.device)
    state = mem.state_dict()
    state.update(feats=feats, labels=labels, pointer=torch.tensor(pointer), filled=torch.tensor(work.size))
    mem.load_state_dict(state)
    return mem


def peer_memory(work: Workload, loss_name: str, beta: float, pointer: int):
    feats, labels, _, _ = work.on_device()
    cosine = pml_distances.CosineSimilarity()
    if loss_name == "contrastive":
        loss = pml_losses.ContrastiveLoss(
            pos_margin=1.0, neg_margin=0.5, distance=cosine, reducer=pml_reducers.SumReducer()
        )
        miner = None
    else:
        loss = pml_losses.MultiSimilarityLoss(alpha=2, beta=beta, base=0.5, distance=cosine)
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.1, distance=cosine)
    wrapper = pml_losses.CrossBatchMemory(loss, work.dim, memory_size=work.size, miner=miner).to(work.device)
    wrapper.embedding_memory.copy_(feats)
    wrapper.label_memory.copy_(labels)
    wrapper.has_been_filled = True
    wrapper.queue_idx = pointer
    return wrapper


def make_loss(loss_name: str):
    return ContrastiveLoss(margin=0.5) if loss_name == "contrastive" else MultiSimilarityLoss()


def step_ours(mem: CrossBatchMemory, loss_fn, adapter=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if adapter is not None:
            mem.adapt_(adapter, emb.detach())
        slots = mem.enqueue(emb.detach(), labels)
        feats, mem_labels = mem.get()
        loss = loss_fn(emb, labels, feats, mem_labels, ref_self_index=slots)
        loss.backward()
        return loss

    return step


def step_adapt_only(mem: CrossBatchMemory, adapter) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Just XBN's write-back, to show how much of the xbn step it accounts for."""

    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mem.adapt_(adapter, emb.detach())
        return emb.detach()[0, 0]

    return step


def step_peer(wrapper, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = wrapper(emb, labels)
        if isinstance(wrapper.loss, pml_losses.ContrastiveLoss):
            loss = loss / batch  # SumReducer -> XBM's per-batch reduction
        loss.backward()
        return loss

    return step


def step_floor(work: Workload) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    feats = work.memory_feats.to(work.device)
    grad_sim = torch.randn(work.batch, work.size, device=work.device) * 1e-3

    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = emb.detach() @ feats.T
        return (grad_sim @ feats).add_(sim[:, :1])  # keep both products live

    return step


def gradient(step, emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = emb.clone().requires_grad_(True)
    value = step(leaf, labels)
    return float(value.detach()), leaf.grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(steps: dict, emb: torch.Tensor, labels: torch.Tensor, repeats: int, device) -> dict:
    """Seconds per step of every repeat; methods interleaved so machine noise hits all alike."""
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up (allocator, lazy init)
        step(emb.clone().requires_grad_(True), labels)
    for _ in range(repeats):
        for name, step in steps.items():
            leaf = emb.clone().requires_grad_(True)
            sync(device)
            start = time.perf_counter()
            step(leaf, labels)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def check_against_peer(work: Workload, loss_name: str) -> str:
    """Same memory, same batch: compare the gradient w.r.t. the batch embeddings."""
    loss_fn = make_loss(loss_name)
    _, _, emb, labels = work.on_device()
    _, ours = gradient(step_ours(ours_memory(work, 17), loss_fn), emb, labels)
    beta = getattr(loss_fn, "beta", 50.0)
    _, peer = gradient(step_peer(peer_memory(work, loss_name, beta, 17), work.batch), emb, labels)
    scale = ours.abs().max().clamp_min(1e-12)
    return f"max|grad ours - grad peer| / max|grad ours| = {float((ours - peer).abs().max() / scale):.2e}"


def run_config(batch, size, dim, loss_name, repeats, device):
    work = Workload(batch, size, dim, device)
    _, _, emb, labels = work.on_device()
    pointer = size - batch // 2  # the first timed batch straddles the end of the ring
    xbm_loss = make_loss(loss_name)
    steps = {
        "xbm": step_ours(ours_memory(work, pointer), xbm_loss),
        "xbn": step_ours(ours_memory(work, pointer), make_loss(loss_name), MomentMatching()),
        "axbn": step_ours(ours_memory(work, pointer), make_loss(loss_name), KalmanMomentMatching()),
        "adapt": step_adapt_only(ours_memory(work, pointer), MomentMatching()),
        "floor": step_floor(work),
    }
    if pml is not None:
        beta = getattr(xbm_loss, "beta", 50.0)
        steps["peer"] = step_peer(peer_memory(work, loss_name, beta, pointer), batch)
    times = time_round_robin(steps, emb, labels, repeats, device)
    stats = {k: int(v) for k, v in xbm_loss.last_stats.items()}
    return times, stats


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}"


def parse_timing_args(doc: str, repeats: int) -> tuple[argparse.Namespace, torch.device, int]:
    """The options every memory benchmark takes (--threads --repeats --quick --device), applied: torch's
    thread count set; (args, device, repeats to time: 3 with --quick)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed steps per method (median reported)")
    parser.add_argument("--quick", action="store_true", help="small configuration only, 3 repeats")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    return args, torch.device(args.device), 3 if args.quick else args.repeats


def main() -> None:
    args, device, repeats = parse_timing_args(__doc__, repeats=9)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}")
    print(f"load average at start: {load_average()}")
    if pml is None:
        print("pytorch-metric-learning is not installed: the peer column is skipped "
              "(pip install pytorch-metric-learning)")
    else:
        print(f"pytorch-metric-learning {pml.__version__}")
        for loss_name in ("contrastive", "multi-sim"):
            work = Workload(*QUICK_CONFIGS[0], device=device, seed=1)
            print(f"  gradient check vs peer, {loss_name}: {check_against_peer(work, loss_name)}")

    results = []
    for batch, size, dim in configs:
        for loss_name in ("contrastive", "multi-sim"):
            times, stats = run_config(batch, size, dim, loss_name, repeats, device)
            results.append(((batch, size, dim, loss_name), times, stats))
            print(f"  done B={batch} M={size} D={dim} {loss_name}", flush=True)
    print(f"load average at end: {load_average()} (other processes on the machine inflate the medians)")
    for title, reduce in (("median", statistics.median), ("minimum", min)):
        print(f"\n{title} over {repeats} interleaved repeats, ms per step")
        print_table(results, reduce)


def print_table(results, reduce) -> None:
    header = ("B", "M", "D", "loss", "xbm", "xbn", "axbn", "xbn adapt_ alone", "peer", "floor",
              "xbm/peer", "xbm/floor", "xbn/xbm", "axbn/xbm", "active pos/neg pairs")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (batch, size, dim, loss_name), times, stats in results:
        t = {name: reduce(values) for name, values in times.items()}
        peer = t.get("peer")
        row = (str(batch), f"{size:,}", str(dim), loss_name,
               fmt_ms(t["xbm"]), fmt_ms(t["xbn"]), fmt_ms(t["axbn"]), fmt_ms(t["adapt"]), fmt_ms(peer),
               fmt_ms(t["floor"]),
               fmt_ratio(t["xbm"], peer), fmt_ratio(t["xbm"], t["floor"]),
               fmt_ratio(t["xbn"], t["xbm"]), fmt_ratio(t["axbn"], t["xbm"]),
               f"{stats.get('pos_pairs', '-')}/{stats.get('neg_pairs', '-')}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
