"""The trainer's whole step against a bare PyTorch loop: what the loop, its hooks and its safety
nets (the non-finite check and undo point, the stop-signal check, metric writing) cost.

Both sides train the same model from the same initial weights on the same Glyphs batches (the
m-per-class sampler, data loading included), with the same loss (contrastive), the same memory
(4,096 entries, XBN adaptation, memory loss from the first step) and Adam:
  trainer: `Trainer.train()` with the default hooks but evaluation and checkpointing (which a
           bare loop does not do either), timed by a hook from step `--warmup` to the end;
  bare:    the step written out here in plain PyTorch (forward, in-batch loss, adapt, enqueue,
           memory loss, backward, optimizer), no checks, no logging.
Settings: the Glyphs conv net at 32 px, a ResNet-18 (random weights) at 64 px, and the tiny timm ViT of
configs/glyphs_vit_xbn.yaml at 32 px (its bare side builds the model with timm.create_model, a linear head
and F.normalize, without xbm); batch 16.
Rounds alternate trainer and bare, and the table gives the median time per step of each and the
ratio of the medians (the goal: trainer <= 1.05 x bare). Run it on an idle machine (load < 1): on a
busy one both sides slow down, but not always alike.

Usage: python benchmarks/bench_train_step.py [--steps 40] [--warmup 5] [--rounds 3] [--threads 2]
       [--settings convnet32 resnet18_64 vit32] [--root datasets/glyphs]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import load_cfg  # noqa: E402
from xbm.data.datasets import build_dataset  # noqa: E402
from xbm.data.sampler import MPerClassBatchSampler  # noqa: E402
from xbm.data.transforms import build_transforms  # noqa: E402
from xbm.engine import hooks  # noqa: E402
from xbm.engine.defaults import DefaultTrainer  # noqa: E402
from xbm.losses import build_loss  # noqa: E402
from xbm.memory import CrossBatchMemory, MomentMatching  # noqa: E402
from xbm.modeling import build_model  # noqa: E402
from xbm.utils.env import seed_everything  # noqa: E402

# setting -> (config file, overrides). vit32: the tiny timm ViT of configs/glyphs_vit_xbn.yaml with the solver
# of the other rows (Adam, no warm-up, no decay groups), so that both sides run the same optimizer.
SETTINGS = {
    "convnet32": ("configs/glyphs_xbn.yaml", ["MODEL.BACKBONE.NAME", "convnet", "INPUT.IMAGE_SIZE", "32"]),
    "resnet18_64": ("configs/glyphs_xbn.yaml", ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.PRETRAINED", "",
                                                "INPUT.IMAGE_SIZE", "64"]),
    "vit32": ("configs/glyphs_vit_xbn.yaml", ["SOLVER.OPTIMIZER", "adam", "SOLVER.WEIGHT_DECAY", "0",
                                              "SOLVER.NO_DECAY_NORM_BIAS", "False", "SOLVER.WARMUP_ITERS", "0"]),
}


def config(setting: str, root: str, out: str, steps: int):
    config_file, overrides = SETTINGS[setting]
    return load_cfg(config_file, [
        "DATA.ROOT", root, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu", "XBM.START_ITERATION", "0",
        "SOLVER.MAX_ITERS", str(steps), "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "0", *overrides])


class BareTimmModel(torch.nn.Module):
    """timm's model, a linear head and L2 normalisation, written out without xbm (the ViT row's bare side)."""

    def __init__(self, cfg):
        import timm

        super().__init__()
        name = cfg.MODEL.BACKBONE.NAME.split(":", 1)[1]
        self.net = timm.create_model(name, num_classes=0, **dict(cfg.MODEL.BACKBONE.TIMM.KWARGS))
        self.fc = torch.nn.Linear(self.net.num_features, cfg.MODEL.HEAD.DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.fc(self.net(images)), dim=1)


def bare_model(cfg) -> torch.nn.Module:
    """xbm's model for xbm's own backbones (the loop is what is compared); timm's own for a timm backbone."""
    return BareTimmModel(cfg) if cfg.MODEL.BACKBONE.NAME.startswith("timm:") else build_model(cfg)


class StepTimer(hooks.HookBase):
    """The wall time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds = warmup, None, None

    def after_step(self) -> None:
        if self.trainer.iteration == self.warmup:
            self.start = time.perf_counter()
        elif self.trainer.iteration == self.trainer.max_iters:
            self.seconds = time.perf_counter() - self.start


def time_trainer(cfg, warmup: int) -> float:
    trainer = DefaultTrainer(cfg)
    trainer.hooks = [h for h in trainer.hooks if not isinstance(h, (hooks.EvalHook, hooks.PeriodicCheckpointer))]
    timer = StepTimer(warmup)
    trainer.register_hooks([timer])
    trainer.train()
    return timer.seconds / (cfg.SOLVER.MAX_ITERS - warmup)


def time_bare(cfg, warmup: int) -> float:
    seed_everything(cfg.SOLVER.SEED)
    data = build_dataset(cfg, "train", build_transforms(cfg, train=True))
    model = bare_model(cfg)
    loss_fn = build_loss(cfg)
    memory = CrossBatchMemory(cfg.XBM.SIZE, cfg.MODEL.HEAD.DIM, check_finite=False)
    adapter = MomentMatching()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.SOLVER.BASE_LR)
    sampler = MPerClassBatchSampler(data.labels, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES, seed=cfg.SOLVER.SEED)
    model.train()
    for step, (images, labels) in enumerate(DataLoader(data, batch_sampler=sampler)):
        if step == warmup:
            start = time.perf_counter()
        if step == cfg.SOLVER.MAX_ITERS:
            break
        embeddings = model(images)
        loss = loss_fn(embeddings, labels, check_values=False)
        batch = embeddings.detach()
        if len(memory) > 0:
            memory.adapt_(adapter, batch)
        slots = memory.enqueue(batch, labels)
        feats, memory_labels = memory.get()
        loss = loss + loss_fn(embeddings, labels, feats, memory_labels, ref_self_index=slots, check_values=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (cfg.SOLVER.MAX_ITERS - warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="datasets/glyphs", help="the Glyphs folder (generated if absent)")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.steps - args.warmup} timed steps x {args.rounds} rounds")
    print(f"{'setting':<13}{'trainer ms':>11}{'bare ms':>9}{'trainer / bare':>16}")
    with tempfile.TemporaryDirectory() as out:
        for setting in args.settings:
            cfg = config(setting, args.root, os.path.join(out, setting), args.steps)
            trainer_times, bare_times = [], []
            for _ in range(args.rounds):
                trainer_times.append(time_trainer(cfg, args.warmup))
                bare_times.append(time_bare(cfg, args.warmup))
            ours, bare = statistics.median(trainer_times), statistics.median(bare_times)
            print(f"{setting:<13}{1e3 * ours:>11.1f}{1e3 * bare:>9.1f}{ours / bare:>15.3f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
