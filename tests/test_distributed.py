"""Distributed training on CPU (gloo, 2 ranks on 127.0.0.1): one memory shared by every rank,
the gradients of one process on the global batch, one set of outputs, an exact resume."""
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xbm.cli import train_main
from xbm.config import load_cfg
from xbm.config.rules import check_global_batch
from xbm.data.sampler import MPerClassBatchSampler
from xbm.checkpoint.io import load_checkpoint
from xbm.engine.defaults import DefaultTrainer
from xbm.engine.hooks import HookBase, RefreshMemory
from xbm.engine.run_guard import StopSignals, TrainingStopped
from xbm.utils.distributed import (agree_on_step, all_gather_batch, all_gather_object, all_gather_with_grad,
                                   broadcast_object, get_rank, get_world_size, init_distributed,
                                   shutdown_distributed, sum_over_ranks)

from conftest import checkpoint_memory

WORLD = 2
BATCH = 8  # per rank; the global batch is 16
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32",
        "DATA.BATCH_SIZE", str(BATCH), "XBM.SIZE", "40", "TEST.EVAL_PERIOD", "0", *extra,
    ]


# ------------------------------------------------------------------ no process group: nothing changes
def test_without_torchrun_every_helper_is_the_single_process_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == torch.device("cpu")
    assert not dist.is_initialized()
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_batch(x) is x and all_gather_with_grad(x) is x and sum_over_ranks(x) is x
    assert agree_on_step(torch.tensor(True), False) == (True, False)
    assert agree_on_step(torch.tensor(False), True) == (False, True)
    assert broadcast_object({"R@1": 0.5}) == {"R@1": 0.5} and all_gather_object(7) == [7]
    shutdown_distributed()  # nothing to shut down: a no-op


def test_xbm_size_must_hold_the_global_batch():
    cfg = load_cfg("configs/glyphs_xbn.yaml", ["DATA.BATCH_SIZE", "8", "XBM.SIZE", "12"])
    check_global_batch(cfg, 1)  # one process: 8 <= 12
    check_global_batch(load_cfg("configs/glyphs_xbn.yaml", ["DATA.BATCH_SIZE", "8", "XBM.SIZE", "16"]), 2)
    with pytest.raises(ValueError, match=r"XBM\.SIZE \(12\) .*DATA\.BATCH_SIZE \(8\) per process x 2 processes = 16"):
        check_global_batch(cfg, 2)


def test_ranks_take_interleaved_batches_of_the_one_stream():
    labels = np.repeat(np.arange(29), 5)  # 14 batches of 2 classes per pass: some iterations straddle two passes
    world, start, steps = 3, 2, 8
    single = MPerClassBatchSampler(labels, 8, 4, seed=3)
    streams = [list(itertools.islice(iter(MPerClassBatchSampler(labels, 8, 4, seed=3, start_batch=start,
                                                                  rank=r, world_size=world)), steps))
               for r in range(world)]
    # Together the ranks draw global batches start*w, start*w + 1, ... once each, rank r every w-th.
    drawn = [streams[r][t] for t in range(steps) for r in range(world)]
    assert drawn == [single.batch(n) for n in range(start * world, (start + steps) * world)]
    disjoint_steps = 0
    for t in range(steps):
        numbers = [(start + t) * world + r for r in range(world)]
        if len({n // single.batches_per_epoch for n in numbers}) == 1:
            classes = [set(labels[streams[r][t]].tolist()) for r in range(world)]
            assert sum(map(len, classes)) == len(set().union(*classes)), f"step {t}: ranks share a class"
            disjoint_steps += 1
    assert 0 < disjoint_steps < steps


# ------------------------------------------------------------------ two ranks against one process
# Frozen BatchNorm: the network treats images one by one, so one process on the global batch is the
# exact reference (plain BN normalises each rank's batch by its own statistics). SGD: Adam's first
# step divides a gradient by its own size and would magnify rounding differences.
CASES = {
    # XBN with the in-batch loss (the differentiable gather); the memory loss from step 2
    "xbn": ("configs/glyphs_xbn.yaml", [],
            [["loss/inbatch", "loss/total"]] + [["loss/inbatch", "loss/memory", "loss/total"]] * 2),
    # AXBN with the memory loss only: step 1 has no loss (no backward), then the memory term alone
    "axbn": ("configs/glyphs_axbn.yaml", ["LOSS.INBATCH_WEIGHT", "0.0"], [[]] + [["loss/memory", "loss/total"]] * 2),
    # A timm ViT (LayerNorm: images one by one, so no frozen statistics are needed) with XBN
    "vit_xbn": ("tests/fixtures/tiny_vit_xbn.yaml", [],
                [["loss/inbatch", "loss/total"]] + [["loss/inbatch", "loss/memory", "loss/total"]] * 2),
    # XBN with the encoder-side corrections: the key encoder's rows gathered into the memory, its moving
    # average the same on both ranks, rank 0's refresh broadcast; then age-weighted memory pairs (of the
    # averaged contrastive loss: supervised contrastive mines no pair of this untrained net's embeddings)
    "encoder_side": ("tests/fixtures/glyphs_encoder_side.yaml",
                     ["DATA.VAL_FRACTION", "0.25", "LOSS.NAME", "contrastive", "LOSS.CONTRASTIVE.REDUCTION", "pairs"],
                     [["loss/inbatch", "loss/total"]] + [["loss/inbatch", "loss/memory", "loss/total"]] * 2),
    "age_weighted": ("tests/fixtures/glyphs_age_weighted.yaml",
                     ["LOSS.NAME", "contrastive", "LOSS.CONTRASTIVE.REDUCTION", "pairs"],
                     [["loss/inbatch", "loss/total"]] + [["loss/inbatch", "loss/memory", "loss/total"]] * 2),
}


def _refresh(trainer: DefaultTrainer) -> None:
    """The refresh hook's after_step, which _record_steps' bare steps would not call (a collective)."""
    for hook in trainer.hooks:
        if isinstance(hook, RefreshMemory):
            hook.after_step()


def _case_opts(root, out, extra, batch=BATCH):
    return _opts(root, out, "MODEL.BACKBONE.FROZEN_BN", "True", "SOLVER.OPTIMIZER", "sgd", "SOLVER.BASE_LR", "0.05",
                 "XBM.START_ITERATION", "1", *extra, "DATA.BATCH_SIZE", str(batch))


def _train_opts(root, out, max_iters: int) -> list[str]:
    return ["--cfg", "configs/glyphs_axbn.yaml", *_opts(
        root, out, "XBM.START_ITERATION", "5", "SOLVER.LOG_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "10",
        "TEST.EVAL_PERIOD", "10", "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITERS", str(max_iters))]


def _record_steps(trainer: DefaultTrainer) -> dict:
    record = {"initial": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "steps": []}
    batches = iter(trainer.train_loader())
    for _ in range(STEPS):
        images, labels, ids = next(batches)
        parts = trainer.train_step(images, labels, ids)
        trainer.iteration += 1
        _refresh(trainer)
        record["steps"].append({
            "images": images, "labels": labels, "losses": sorted(k for k in parts if k.startswith("loss/")),
            "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "memory": {k: v.clone() for k, v in trainer.objective.memory.state_dict().items()},
            "key_encoder": ({k: v.clone() for k, v in trainer.key_encoder.state_dict().items()}
                            if trainer.key_encoder is not None else {}),
            "ids": ids,
        })
    return record


def _rank_worker(rank: int, port: int, root: str, folder: str) -> None:
    """One of two ranks: STEPS recorded steps per case, then a run stopped at 10 and resumed to 20.

    One process group for all of it (spawning costs seconds): the Trainer and train_main use a
    group that exists; the torchrun test covers the group made from torchrun's variables.
    """
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: the same sums as the torchrun run
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for name, (config, extra, _) in CASES.items():
            trainer = DefaultTrainer(load_cfg(config, _case_opts(root, os.path.join(folder, name), extra)))
            torch.save(_record_steps(trainer), os.path.join(folder, f"{name}.rank{rank}.pt"))
        stopped = os.path.join(folder, "stopped")
        train_main(_train_opts(root, stopped, 10))
        train_main(["--resume", "auto", *_train_opts(root, stopped, 20)])
        torch.save(_signal_on_one_rank(root, os.path.join(folder, "signal"), rank),
                   os.path.join(folder, f"signal.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _signal_on_one_rank(root: str, out: str, rank: int) -> dict:
    """Rank 1 alone gets SIGTERM after iteration 2; every step's control all-reduces are counted."""
    reductions = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        # the control collectives; the in-batch loss's gathered rows send their float gradient back too
        if not tensor.is_floating_point():
            reductions.append(trainer.iteration)
        return original(tensor, *args, **kwargs)

    class SignalAfterTwo(HookBase):
        def after_step(self):
            if rank == 1 and self.trainer.iteration == 2:
                StopSignals._requested = signal.SIGTERM  # what xbm-train's handler records

    cfg = load_cfg("configs/glyphs_xbn.yaml", _opts(root, out, "SOLVER.MAX_ITERS", "6", "SOLVER.LOG_PERIOD", "100"))
    trainer = DefaultTrainer(cfg, extra_hooks=[SignalAfterTwo()])
    dist.all_reduce = counting
    try:
        trainer.train()
        stopped = None
    except TrainingStopped as stop:
        stopped = {"iteration": stop.iteration, "signal": stop.signal_name}
    finally:
        dist.all_reduce = original
        StopSignals._requested = None
    dist.barrier()  # rank 0 has written the checkpoint
    return {"stopped": stopped, "reductions": reductions, "saved": load_checkpoint(trainer.checkpoint_path)["iteration"]}


@pytest.fixture(scope="module")
def two_rank_runs(glyph_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_rank_worker, args=(_free_port(), str(glyph_root), str(folder)), nprocs=WORLD)
    return folder


@pytest.mark.slow
def test_two_ranks_share_one_memory_and_the_gradients_of_one_process(glyph_root, two_rank_runs, tmp_path):
    for name, (config, extra, losses) in CASES.items():
        ranks = [torch.load(two_rank_runs / f"{name}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
        single = DefaultTrainer(load_cfg(config, _case_opts(glyph_root, tmp_path / f"{name}_single", extra, WORLD * BATCH)))
        single.model.load_state_dict(ranks[0]["initial"])
        sampler = MPerClassBatchSampler(single.train_set.labels, BATCH, 4, seed=0)
        train_labels = np.asarray(single.train_set.labels)
        for step, by_rank in enumerate(zip(*(r["steps"] for r in ranks))):
            for r, record in enumerate(by_rank):  # rank r's step t is batch t*w + r of the one stream
                assert record["labels"].tolist() == train_labels[sampler.batch(step * WORLD + r)].tolist()
                assert record["losses"] == losses[step], (name, step, r)
            # one process on the same global batch, rank 0's rows first
            images, labels, ids = (torch.cat([rec[key] for rec in by_rank]) for key in ("images", "labels", "ids"))
            single.train_step(images, labels, ids)
            single.iteration += 1
            _refresh(single)

            first, second = by_rank
            for key, value in first["memory"].items():  # every rank holds the same memory, bit for bit
                assert torch.equal(value, second["memory"][key]), (name, step, key)
            expected_memory = single.objective.memory.state_dict()
            assert torch.equal(first["memory"]["labels"], expected_memory["labels"])
            pointer = int(first["memory"]["_extra_state"][0])  # the memory's extra state: [pointer, fill]
            assert pointer == int(expected_memory["_extra_state"][0]) == (16 * (step + 1)) % 40
            torch.testing.assert_close(first["memory"]["feats"], expected_memory["feats"], rtol=1e-5, atol=1e-6)
            if single.key_encoder is not None:  # one moving average on every rank, that of one process
                for key, value in single.key_encoder.state_dict().items():
                    assert torch.equal(first["key_encoder"][key], second["key_encoder"][key]), (name, step, key)
                    torch.testing.assert_close(first["key_encoder"][key], value, rtol=1e-5, atol=1e-6)

            expected = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
            assert first["grads"].keys() == second["grads"].keys() == expected.keys()
            if step > 0:
                assert len(expected) > 0 and all(g.abs().sum() > 0 for g in expected.values())
            for key, grad in expected.items():  # DDP's average over ranks == the one-process gradient
                assert torch.equal(first["grads"][key], second["grads"][key]), (name, step, key)
                torch.testing.assert_close(first["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=f"{name} {step} {key}")


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_through_the_one_all_reduce_of_a_step(two_rank_runs):
    """Rank 1's SIGTERM after iteration 2 reaches rank 0 in step 3's all-reduce (the finiteness check's):
    both ranks save at iteration 3 and stop there, and no step made a second control all-reduce (the only
    other one is the backward of the gathered global batch, the papers' part of the step)."""
    ranks = [torch.load(two_rank_runs / f"signal.rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["stopped"] for r in ranks] == [{"iteration": 3, "signal": "a signal on another rank"},
                                            {"iteration": 3, "signal": "SIGTERM"}]
    assert all(r["saved"] == 3 for r in ranks)
    for r in ranks:  # one all-reduce in each of the steps at iterations 0, 1, 2 (the count is taken before +1)
        assert r["reductions"] == [0, 1, 2], r["reductions"]


# ------------------------------------------------------------------ torchrun end to end, resume
@pytest.mark.slow
def test_torchrun_writes_one_set_of_outputs_and_a_stopped_run_resumes_exactly(glyph_root, two_rank_runs, tmp_path):
    whole = tmp_path / "whole"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "tools/train_net.py",
               *_train_opts(glyph_root, whole, 20)]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("final retrieval metrics") == 1
    assert sorted(p.name for p in whole.iterdir() if not p.name.startswith("events.out")) == [
        "checkpoints", "config.yaml", "log.txt", "metrics.jsonl"]
    assert len(list(whole.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (whole / "checkpoints").iterdir()] == ["last.pth"]
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in records] == [(10, "test"), (20, "test")]
    log = (whole / "log.txt").read_text()
    assert log.count("distributed: 2 processes, DATA.BATCH_SIZE 8 per process, global batch 16") == 1
    assert re.findall(r"iter (\d+): ", log) == [str(i) for i in range(1, 21)]  # one writer, one line a step
    assert log.count("evaluation at iteration") == 2
    state = load_checkpoint(str(whole / "checkpoints" / "last.pth"))
    assert state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD

    # The same run stopped after its checkpoint at 10, then resumed by both ranks from it (_rank_worker).
    stopped = two_rank_runs / "stopped"
    resumed = load_checkpoint(str(stopped / "checkpoints" / "last.pth"))
    assert resumed["iteration"] == 20
    assert (stopped / "log.txt").read_text().count("resumed from") == 1
    for name, tensor in state["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in checkpoint_memory(state).items():
        torch.testing.assert_close(checkpoint_memory(resumed)[name], tensor, rtol=0, atol=1e-6, msg=name)
    resumed_records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed_records] == [10, 20]
    for key in ("R@1", "R@10", "MAP@R"):
        assert resumed_records[-1][key] == pytest.approx(records[-1][key], abs=1e-6)


# Two processes for 20 s of CPU; the gradient and resume tests above cover DDP in make test.
@pytest.mark.heavy
def test_torchrun_trains_with_bf16_autocast(glyph_root, tmp_path):
    """SOLVER.AMP bf16 under two gloo processes: every rank skips or steps alike (one all-reduce)."""
    out = tmp_path / "bf16"
    opts = _opts(glyph_root, out, "SOLVER.AMP", "bf16", "SOLVER.MAX_ITERS", "6", "XBM.START_ITERATION", "2",
                 "SOLVER.LOG_PERIOD", "3")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "tools/train_net.py",
               "--cfg", "configs/glyphs_xbn.yaml", *opts]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    state = load_checkpoint(str(out / "checkpoints" / "last.pth"))
    assert state["iteration"] == 6 and state["guard"]["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < record["R@1"] <= 1
    log = (out / "log.txt").read_text()
    assert "amp/skipped_steps=0" in log and "global batch 16" in log
