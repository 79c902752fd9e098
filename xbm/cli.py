"""Command lines: xbm-train (tools/train_net.py) and xbm-eval (tools/eval.py)."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

from .config import ConfigError, load_cfg


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", metavar="FILE", help="YAML experiment file (configs/*.yaml)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides, e.g. XBM.SIZE 16384 SOLVER.BASE_LR 1e-4")
    return parser


def _pop_option(args, name: str) -> None:
    """Accept `--name VALUE` after the KEY VALUE overrides too (argparse leaves it in opts)."""
    flag = "--" + name.replace("_", "-")
    if flag in args.opts:
        at = args.opts.index(flag)
        if at + 1 >= len(args.opts):
            raise SystemExit(f"error: {flag} needs a value")
        setattr(args, name, args.opts[at + 1])
        del args.opts[at:at + 2]


def _load(parser: argparse.ArgumentParser, args):
    try:
        return load_cfg(args.cfg, args.opts)
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


def train_main(argv: list[str] | None = None) -> int:
    parser = _parser("Train an embedding with an optional cross-batch memory.")
    parser.add_argument("--resume", metavar="CKPT",
                        help="continue from this checkpoint; 'auto' = OUTPUT_DIR/checkpoints/last.pth if it exists "
                        "(overrides SOLVER.RESUME)")
    args = parser.parse_args(argv)
    _pop_option(args, "resume")
    cfg = _load(parser, args)
    from .engine.trainer import Trainer, format_results
    from .utils.distributed import shutdown_distributed

    try:  # under torchrun the Trainer joins the process group; leave it however the run ends
        try:
            trainer = Trainer(cfg, resume=args.resume)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"error: {err}\n")
        results = trainer.train()
    finally:
        shutdown_distributed()
    if trainer.is_main:
        print(f"\nfinal retrieval metrics (%), iteration {trainer.iteration}:\n{format_results(results)}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("Evaluate one checkpoint or a glob of them on the dataset's evaluation tasks.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file or glob ('output/run/checkpoints/*.pth')")
    parser.add_argument("--out", help="folder for metrics.json/metrics.csv (default: beside the first checkpoint)")
    parser.add_argument("--export", nargs="*", metavar="SPLIT", default=None,
                        help="also save embeddings and labels (.npy) of these splits")
    parser.add_argument("--projector", type=int, metavar="N",
                        help="also write N test embeddings, labels and thumbnails for TensorBoard's projector "
                        "(OUT/projector; open with tensorboard --logdir OUT/projector)")
    args = parser.parse_args(argv)
    if args.projector is not None and args.projector < 1:
        parser.exit(2, f"error: --projector needs a positive number of embeddings, got {args.projector}\n")
    paths = sorted(glob.glob(args.ckpt)) if any(c in args.ckpt for c in "*?[") else [args.ckpt]
    if not paths or not all(os.path.isfile(p) for p in paths):
        parser.exit(2, f"error: no checkpoint file matches {args.ckpt!r}\n")
    from .engine.evaluation_tool import config_of_checkpoint, evaluate_checkpoints

    try:
        # Without --cfg the first checkpoint's own config is used (plus any overrides).
        cfg = config_of_checkpoint(paths[0], args.opts, args.cfg)
        rows = evaluate_checkpoints(cfg, paths, export_splits=args.export, export_dir=args.out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        parser.exit(2, f"error: {err}\n")
    out = args.out or os.path.dirname(os.path.dirname(os.path.abspath(paths[0])))
    _write_rows(rows, out)
    if args.projector is not None:
        from .serving.projector import write_projector

        try:
            folder = write_projector(cfg, paths, args.projector, os.path.join(out, "projector"))
        except (FileNotFoundError, ValueError, KeyError) as err:
            parser.exit(2, f"error: {err}\n")
        print(f"wrote the projector files to {folder} (tensorboard --logdir {folder})", file=sys.stderr)
    return 0


def _write_rows(rows: list[dict], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print("  ".join(f"{c:>10}" for c in columns))
    for row in rows:
        print("  ".join(f"{_cell(row.get(c)):>10}" for c in columns))
    with open(os.path.join(out, "eval_metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "eval_metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}/eval_metrics.json and eval_metrics.csv", file=sys.stderr)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if value <= 1 else f"{value:.4g}"
    return os.path.basename(str(value)) if isinstance(value, str) else str(value)
