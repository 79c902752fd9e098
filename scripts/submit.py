#!/usr/bin/env python
"""Submit one training run as a SLURM job (through submitit), from a login node.

    python scripts/submit.py --partition gpu --gpus-per-node 4 --time 24:00:00 \\
        --cfg configs/sop_xbm.yaml OUTPUT_DIR output/sop_xbm XBM.SIZE 16384

The job runs `python tools/train_net.py --cfg FILE --resume auto KEY VALUE ... OUTPUT_DIR <folder>`
(its console output appended to OUTPUT_DIR/console.log, submitit's own logs in
OUTPUT_DIR/submitit/), one process per GPU on each of --nodes nodes with torchrun's variables set.
Before the time limit, or when SLURM preempts it, the training saves a checkpoint and the job is
requeued; the requeued job continues from that checkpoint (xbm/cluster.py says how).
The cluster options are those of scripts/sweep.py --launcher slurm; `--launcher submitit-local`
runs the same job as a local subprocess. Nothing is submitted when the run in OUTPUT_DIR is
already finished or was trained with another config, or while the job submitted for it last is
still queued or running. With --wait the command stays until the job
ends and prints its final metrics; without it, it prints the job id and returns.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sweep  # noqa: E402  (scripts/sweep.py: the run, its command and its checks are shared)
from xbm.cluster import (  # noqa: E402
    CLUSTER_LAUNCHERS, ClusterError, add_cluster_arguments, check_no_active_jobs, make_executor, options_from_args,
    record_jobs, submit, wait_for,
)
from xbm.config import ConfigError, load_cfg  # noqa: E402
from xbm.utils.plotting import final_metrics, read_metrics  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Submit one training run as a SLURM job (submitit).",
                                     epilog="See the top of scripts/submit.py and README, On a cluster.")
    parser.add_argument("--cfg", metavar="FILE", required=True, help="YAML experiment file (configs/*.yaml)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end and print its final metrics")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides, e.g. OUTPUT_DIR output/sop_xbm XBM.SIZE 16384")
    add_cluster_arguments(parser, CLUSTER_LAUNCHERS, default="slurm")
    return parser


def plan_run(cfg_file: str, opts: list[str]) -> sweep.Run:
    """The run the job trains, its config checked as xbm-train checks it (ConfigError otherwise)."""
    if len(opts) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
    cfg = load_cfg(cfg_file, opts)
    pairs = [(k, v) for k, v in zip(opts[0::2], opts[1::2]) if k != "OUTPUT_DIR"]
    run_opts = [token for pair in pairs for token in pair]
    folder = cfg.OUTPUT_DIR
    return sweep.Run(os.path.basename(os.path.normpath(folder)), folder, run_opts, cfg.SOLVER.MAX_ITERS, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        run = plan_run(args.cfg, args.opts)
        if sweep.is_finished(run):
            print(f"{run.folder} holds a finished run (an evaluation at iteration {run.max_iters}): "
                  "nothing submitted; raise SOLVER.MAX_ITERS to extend it or choose another OUTPUT_DIR")
            return 0
        differences = sweep.check_folder(run)
        if differences:
            raise ClusterError(f"{run.folder} holds a run with another config (its value -> this one's): "
                               + "; ".join(differences) + ": choose another OUTPUT_DIR or delete that folder")
        folder = os.path.join(run.folder, sweep.SUBMITIT_FOLDER)
        check_no_active_jobs(folder, options.launcher)
        executor = make_executor(options, folder)
        [job] = submit(executor, sweep.training_jobs([run], args.cfg))
        record_jobs(folder, options.launcher, {run.name: job.job_id})
    except (ConfigError, ClusterError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"submitted job {job.job_id} ({options.launcher}): {run.folder}, console output in {run.log_path}, "
          f"submitit logs in {os.path.join(run.folder, sweep.SUBMITIT_FOLDER)}")
    if not args.wait:
        return 0
    start, result = time.time(), {}
    try:
        wait_for({run.name: job}, lambda name, code: result.update(code=code),
                 10.0 if options.launcher == "slurm" else 1.0)
    except KeyboardInterrupt:
        print("\nstopped waiting: the job goes on (and requeues itself)", file=sys.stderr)
        return 130
    status, detail = sweep.outcome_of(run, result["code"], start)
    if status == "failed":
        print(f"error: the run failed: {detail}", file=sys.stderr)
        return 1
    metrics = final_metrics(read_metrics(run.folder), run.max_iters)
    print(f"finished in {detail}: " + "; ".join(
        f"{task} " + ", ".join(f"{name} {100 * value:.2f}" for name, value in values.items()
                               if isinstance(value, float))
        for task, values in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
