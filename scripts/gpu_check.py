#!/usr/bin/env python
"""One command that proves the CUDA paths on a machine with one NVIDIA GPU: `make gpu-check`.

Checks, in order (each is timed; a failure does not stop the others):
  cuda_tests    the tests that are skipped without CUDA (pytest -m cuda)
  amp_resume    short Glyphs runs with SOLVER.AMP fp16 and bf16 on the GPU; the bf16 run killed
                with SIGKILL after a checkpoint and resumed, against the same run uninterrupted
                (PERF.DETERMINISTIC True, so the final metrics must be identical)
  search        k-NN on the GPU (torch; faiss-gpu when installed) against the CPU on 100k x 512
                clustered vectors: the same neighbours up to ties
  memory_step   the memory step (XBM, contrastive) at the SOP size, 64 x 55,000 x 512: ms per step
                and the ratio to its own floor, the two matrix products alone
  throughput    training images/s of ResNet-50 and BN-Inception at 224 px, batch 64: fp32, AMP,
                AMP + channels_last, and + torch.compile
  vit           a timm ViT-S/16 (timm:vit_small_patch16_224.dino, random weights, 384-d features without
                a head) at 224 px, batch 64, memory 55,000: training images/s in fp32 and with AMP (bf16),
                and the share of each step that the memory step (XBN, contrastive, 64 x 55,000 x 384) takes
  ddp_nccl      a one-process DistributedDataParallel step over the nccl backend
It prints one summary table, writes it as JSON (--out), and exits 1 if any check failed. Without
CUDA it says so in one sentence and exits with status 2.

Usage: python scripts/gpu_check.py [--out output/gpu_check/summary.json] [--only NAME ...] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

CHECKS = ("cuda_tests", "amp_resume", "search", "memory_step", "throughput", "vit", "ddp_nccl")
VIT = "timm:vit_small_patch16_224.dino"
NO_CUDA_STATUS = 2


class CheckFailed(Exception):
    """A check ran and found something wrong (its message is the table's detail)."""


# ------------------------------------------------------------------ the checks
def check_cuda_tests(ctx) -> dict:
    command = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=ctx.timeout)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode != 0:
        raise CheckFailed(f"pytest -m cuda: {summary}\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    return {"detail": summary}


def _train_command(ctx, out: str, amp: str, *extra: str) -> list[str]:
    return [sys.executable, "tools/train_net.py", "--cfg", "configs/glyphs_xbn.yaml",
            "OUTPUT_DIR", out, "DATA.ROOT", ctx.glyphs, "MODEL.DEVICE", "cuda", "SOLVER.AMP", amp,
            "SOLVER.MAX_ITERS", str(ctx.iters), "SOLVER.CHECKPOINT_PERIOD", str(ctx.iters // 10),
            "TEST.EVAL_PERIOD", "0", "PERF.DETERMINISTIC", "True", *extra]


def _run(command: list[str], ctx) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=ctx.timeout)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(command[1:4])} ... exited {done.returncode}: {done.stderr[-2000:]}")


def _final_metrics(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def _checkpoint_iteration(path: str) -> int:
    from xbm.checkpoint.io import load_checkpoint

    try:
        return int(load_checkpoint(path)["iteration"])
    except Exception:  # not written yet, or being replaced: ask again
        return -1


def check_amp_resume(ctx) -> dict:
    base = os.path.join(ctx.work, "amp")
    fp16 = os.path.join(base, "fp16")
    _run(_train_command(ctx, fp16, "fp16"), ctx)
    whole = os.path.join(base, "bf16_whole")
    _run(_train_command(ctx, whole, "bf16"), ctx)

    killed = os.path.join(base, "bf16_killed")
    checkpoint = os.path.join(killed, "checkpoints", "last.pth")
    proc = subprocess.Popen(_train_command(ctx, killed, "bf16"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + ctx.timeout
    while proc.poll() is None and _checkpoint_iteration(checkpoint) < 1:  # kill at the first checkpoint
        if time.time() > deadline:
            proc.kill()
            raise CheckFailed("the run to be killed wrote no checkpoint in time")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_iteration(checkpoint)
    if not 0 < killed_at < ctx.iters:
        raise CheckFailed(f"the run was not killed mid-way (last checkpoint at {killed_at} of {ctx.iters}); "
                          "raise the iterations")
    _run(_train_command(ctx, killed, "bf16") + ["--resume", "auto"], ctx)

    expected, got = _final_metrics(whole), _final_metrics(killed)
    metrics = {k: v for k, v in expected.items() if isinstance(v, float)}
    different = {k: (v, got.get(k)) for k, v in metrics.items() if got.get(k) != v}
    if different:
        raise CheckFailed(f"killed at {killed_at} and resumed: final metrics differ from the uninterrupted run "
                          f"(deterministic algorithms on): {different}")
    fp16_r1 = _final_metrics(fp16)["R@1"]
    return {"detail": f"fp16 R@1 {100 * fp16_r1:.2f}; bf16 killed at {killed_at}, resumed: R@1 "
                      f"{100 * got['R@1']:.2f} = uninterrupted, all {len(metrics)} metrics identical",
            "fp16_r1": fp16_r1, "bf16_r1": got["R@1"], "killed_at": killed_at}


def _clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 8), dim, generator=gen)
    labels = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(n, dim, generator=gen), dim=1)


def _same_up_to_ties(query, gallery, sims, ids, ref_sims, ref_ids, tolerance: float = 1e-4) -> tuple[bool, float]:
    """Whether (sims, ids) are the reference's neighbours up to ties: the j-th neighbour returned is
    as similar to the query as the reference's j-th (recomputed in float64 from the vectors), and
    the similarity reported for it is right. Also returns the fraction of ids that differ."""
    sims, ids = sims.cpu(), ids.cpu()
    true = torch.einsum("qd,qkd->qk", query.double(), gallery.double()[ids])
    same = bool(torch.all((true - ref_sims.double()).abs() <= tolerance)
                and torch.all((true - sims.double()).abs() <= tolerance))
    return same, float((ids != ref_ids).float().mean())


def check_search(ctx) -> dict:
    from xbm.evaluation import search

    n, queries, dim, k = ctx.search_size, ctx.search_queries, 512, 10
    gallery = _clustered(n, dim)
    query = gallery[:queries]
    start = time.perf_counter()
    ref_sims, ref_ids = search.knn(query, gallery, k=k, backend="faiss" if search.faiss is not None else "torch")
    cpu_s = time.perf_counter() - start
    results, failures = {}, []
    backends = ["torch"] + (["faiss"] if search.faiss is not None and search.faiss.get_num_gpus() > 0 else [])
    gallery_gpu, query_gpu = gallery.cuda(), query.cuda()
    for backend in backends:
        search.knn(query_gpu[:16], gallery_gpu, k=k, backend=backend)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        sims, ids = search.knn(query_gpu, gallery_gpu, k=k, backend=backend)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        same, differ = _same_up_to_ties(query, gallery, sims, ids, ref_sims, ref_ids)
        if not sims.is_cuda:
            failures.append(f"{backend}: results came back on {sims.device}")
        if not same:
            failures.append(f"{backend}: neighbours differ beyond ties ({100 * differ:.3f}% of ids)")
        results[backend] = {"seconds": seconds, "ids_differing": differ}
    if failures:
        raise CheckFailed("; ".join(failures))
    skipped = "" if "faiss" in backends else "; faiss-gpu not installed (skipped)"
    detail = ", ".join(f"{b} {r['seconds']:.2f} s" for b, r in results.items())
    return {"detail": f"{queries:,} queries x {n:,} x {dim}: CPU {cpu_s:.1f} s, GPU {detail}{skipped}",
            "cpu_seconds": cpu_s, **{f"{b}_seconds": r["seconds"] for b, r in results.items()}}


def check_memory_step(ctx) -> dict:
    import statistics

    import bench_memory_loss

    times, _ = bench_memory_loss.run_config(64, 55_000, 512, "contrastive", ctx.repeats, torch.device("cuda"))
    xbm, floor = statistics.median(times["xbm"]), statistics.median(times["floor"])
    xbn = statistics.median(times["xbn"])
    return {"detail": f"64 x 55,000 x 512: XBM {1e3 * xbm:.2f} ms, XBN {1e3 * xbn:.2f} ms, floor {1e3 * floor:.2f} ms; "
                      f"XBM / floor {xbm / floor:.2f}", "xbm_ms": 1e3 * xbm, "xbn_ms": 1e3 * xbn,
            "floor_ms": 1e3 * floor, "xbm_over_floor": xbm / floor}


def check_throughput(ctx) -> dict:
    import bench_train_throughput

    rows = bench_train_throughput.run(torch.device("cuda"), ["resnet50", "bninception"],
                                      list(bench_train_throughput.SETTINGS), 64, 224, ctx.steps, ctx.warmup,
                                      55_000, 512)
    detail = "; ".join(f"{r['backbone']} {r['setting']} {r['images_per_s']:.0f}/s" for r in rows)
    return {"detail": detail, "rows": rows, "table": bench_train_throughput.table(rows)}


def check_vit(ctx) -> dict:
    import statistics

    import bench_memory_loss
    import bench_train_throughput

    cuda = torch.device("cuda")
    # MODEL.HEAD.DIM 0: the 384-d class token itself, as Hyp-ViT and SEE report
    rows = bench_train_throughput.run(cuda, [VIT], ["fp32", "amp"], 64, 224, ctx.steps, ctx.warmup, 55_000, 0)
    times, _ = bench_memory_loss.run_config(64, 55_000, 384, "contrastive", ctx.repeats, cuda)
    memory_ms = 1e3 * statistics.median(times["xbn"])  # the trainer's step adapts with XBN
    for row in rows:
        row["step_ms"] = 1e3 * 64 / row["images_per_s"]
        row["memory_share"] = memory_ms / row["step_ms"]
    detail = "; ".join(f"{r['setting']} ({r['amp']}) {r['images_per_s']:.0f} images/s, memory step "
                       f"{100 * r['memory_share']:.1f}% of {r['step_ms']:.1f} ms" for r in rows)
    return {"detail": f"ViT-S/16: {detail}", "rows": rows, "memory_ms": memory_ms,
            "table": bench_train_throughput.table(rows)}


def _ddp_worker(port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        model = DistributedDataParallel(torch.nn.Linear(32, 8).cuda(), device_ids=[0])
        before = model.module.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(16, 32, device="cuda")).square().sum().backward()
        optimizer.step()
        flag = torch.ones((), device="cuda", dtype=torch.int32)
        dist.all_reduce(flag)
        ok = int(flag) == 1 and not torch.equal(before, model.module.weight.detach())
        with open(out, "w") as f:
            f.write("ok" if ok else "bad")
    finally:
        dist.destroy_process_group()


def check_ddp_nccl(ctx) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(ctx.work, "ddp_nccl.txt")
    process = mp.get_context("spawn").Process(target=_ddp_worker, args=(port, out))
    process.start()
    process.join(ctx.timeout)
    if process.exitcode != 0 or not os.path.exists(out) or open(out).read() != "ok":
        raise CheckFailed(f"the nccl process exited {process.exitcode}")
    return {"detail": f"nccl {torch.cuda.nccl.version()}: all_reduce and a DDP step"}


# ------------------------------------------------------------------ running them
class Context:
    def __init__(self, args):
        self.work = os.path.abspath(args.work)
        self.glyphs = os.path.abspath(args.glyphs)
        self.quick = args.quick
        self.iters = 80 if args.quick else 300
        self.search_size = 20_000 if args.quick else 100_000
        self.search_queries = 2_000 if args.quick else 10_000
        self.repeats = 5 if args.quick else 20
        self.steps, self.warmup = (5, 2) if args.quick else (20, 5)
        self.timeout = args.timeout


def run_checks(names: list[str], ctx: Context) -> list[dict]:
    rows = []
    for name in names:
        start = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            row = {"check": name, "status": "pass", **globals()[f"check_{name}"](ctx)}
        except CheckFailed as err:
            row = {"check": name, "status": "FAIL", "detail": str(err)}
        except Exception as err:  # a broken check must not hide the others' results
            row = {"check": name, "status": "FAIL", "detail": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu-check] {name}: {row['status']} ({row['seconds']} s) {row['detail'].splitlines()[0]}", flush=True)
        rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> str:
    lines = ["| check | status | seconds | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail'].splitlines()[0]} |")
    return "\n".join(lines)


def machine() -> dict:
    return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "gpus_visible": torch.cuda.device_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/gpu_check/summary.json", help="the summary as JSON")
    parser.add_argument("--work", default="output/gpu_check", help="folder of the check runs")
    parser.add_argument("--glyphs", default="datasets/glyphs", help="Glyphs root (generated there if missing)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a first look, not the reference)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds for any one subprocess")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to PyTorch here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}), so there is nothing to check.")
        return NO_CUDA_STATUS
    ctx = Context(args)
    os.makedirs(ctx.work, exist_ok=True)
    info = machine()
    print(f"[gpu-check] {info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}", flush=True)
    rows = run_checks(list(args.only or CHECKS), ctx)
    table = summary_table(rows)
    print("\n" + table)
    for row in rows:
        if row["check"] in ("throughput", "vit") and "table" in row:
            print("\n" + row["table"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "quick": args.quick, "checks": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0 if all(r["status"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
