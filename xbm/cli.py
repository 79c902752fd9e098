"""Command lines: xbm-train (tools/train_net.py) and xbm-eval (tools/eval.py).

Expected problems (bad config, data, checkpoint, OUTPUT_DIR, a failed write) end in one line
`error: ...` and exit status 2 before training or 1 during it; `--debug` shows the traceback
instead. Exit statuses of a stopped run: see xbm/engine/run_guard.py (75: stopped by a signal
after saving, resume to continue).
"""
from __future__ import annotations

import argparse
import csv
import functools
import glob
import json
import os
import sys

from .config import ConfigError, load_cfg
from .utils.errors import fail, one_sentence


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", metavar="FILE", help="YAML experiment file (configs/*.yaml)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one sentence")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides, e.g. XBM.SIZE 16384 SOLVER.BASE_LR 1e-4")
    return parser


def _arity(action: argparse.Action):
    """How many values an option takes, as argparse was told: 1, 0 (a switch), "?" (--resume: none means
    auto) or "*" (--export)."""
    return 1 if action.nargs is None else action.nargs


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parse_args, then the options written after the KEY VALUE overrides (argparse leaves those in
    opts), and overrides an optional-valued option swallowed when written before them."""
    from .engine.run_guard import looks_like_config_key

    args = parser.parse_args(argv)
    actions = {f: action for action in parser._actions for f in action.option_strings
               if not isinstance(action, argparse._HelpAction)}
    flags = {f: _arity(action) for f, action in actions.items()}
    if isinstance(getattr(args, "resume", None), str) and looks_like_config_key(args.resume):
        args.opts.insert(0, args.resume)  # `--resume XBM.SIZE 10`: the key is an override
        args.resume = "auto"
    if getattr(args, "export", None):
        keys = [i for i, token in enumerate(args.export) if looks_like_config_key(token)]
        if keys:
            args.opts[:0] = args.export[keys[0]:]
            args.export = args.export[:keys[0]]
    opts, i = [], 0
    while i < len(args.opts):
        token = args.opts[i]
        arity = flags.get(token)
        if arity is None:
            opts.append(token)
            i += 1
            continue
        name, convert = actions[token].dest, actions[token].type or str
        values, i = [], i + 1
        while arity != 0 and i < len(args.opts) and args.opts[i] not in flags and (arity == 1 or not (
                looks_like_config_key(args.opts[i]) or args.opts[i].startswith("--"))):
            values.append(args.opts[i])
            i += 1
            if arity in (1, "?"):
                break
        if arity == 1 and not values:
            parser.error(f"{token} needs a value")
        try:
            values = [convert(v) for v in values]
        except (TypeError, ValueError):
            parser.error(f"{token}: invalid value {values[0]!r}")
        setattr(args, name, True if arity == 0 else values[0] if arity == 1 else
                (values[0] if values else actions[token].const) if arity == "?" else values)
    args.opts = opts
    return args


def _load(parser: argparse.ArgumentParser, args):
    try:
        return load_cfg(args.cfg, args.opts)
    except (ConfigError, ValueError) as err:
        fail(err, 2, args.debug)


def _config_files() -> list[str]:
    """configs/*.yaml of this checkout (or of the current folder)."""
    folders = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"), "configs"]
    found = []
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
            rel = os.path.relpath(path)
            if rel not in found:
                found.append(rel)
    return found


def _usage_without_config(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    configs = _config_files()
    listing = "\n".join(f"  {c}" for c in configs) if configs else "  (none found; see configs/ in the repository)"
    print(f"error: no --cfg given; pick an experiment, e.g.\n  xbm-train --cfg {configs[0] if configs else 'configs/glyphs_xbm.yaml'}"
          f"\nconfigs:\n{listing}", file=sys.stderr)
    return 2


def _expected_errors() -> tuple:
    """The errors of bad input and of the environment (not bugs): reported in one sentence."""
    import torch

    return (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError)


def _interrupt_before_training_is_quiet(main):
    """Ctrl-C while the config and libraries load (before the signal handlers are in place)."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            if "--debug" in (sys.argv[1:] if argv is None else argv):
                raise
            print("interrupted before training started; nothing was written", file=sys.stderr)
            return 130
    return wrapper


@_interrupt_before_training_is_quiet
def train_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser("Train an embedding with an optional cross-batch memory.")
    parser.add_argument("--resume", metavar="CKPT", nargs="?", const="auto",
                        help="continue from this checkpoint; 'auto' (also --resume alone) = "
                        "OUTPUT_DIR/checkpoints/last.pth if it exists (overrides SOLVER.RESUME)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that holds a run: its files are moved to OUTPUT_DIR.old-<time>")
    args = _parse(parser, argv)
    if not args.cfg and not args.opts:
        return _usage_without_config(parser)
    cfg = _load(parser, args)
    from .engine.run_guard import EXIT_STOPPED, StopSignals, TrainingStopped, claim_for_all_ranks, resume_command
    from .evaluation.build import format_results
    from .engine.defaults import DefaultTrainer
    from .utils.distributed import shutdown_distributed

    from .utils.logger import setup_logger

    setup_logger()  # the console, until the Trainer adds OUTPUT_DIR/log.txt
    expected, lock = _expected_errors(), None
    try:  # under torchrun the Trainer joins the process group; leave it however the run ends
        with StopSignals():
            try:
                lock = claim_for_all_ranks(cfg.OUTPUT_DIR, cfg.MODEL.DEVICE, bool(args.resume or cfg.SOLVER.RESUME),
                                           args.overwrite)
                trainer = DefaultTrainer(cfg, resume=args.resume)
            except expected as err:
                fail(err, 2, args.debug)
            try:
                results = trainer.train()
            except TrainingStopped as stop:
                if trainer.is_main:
                    trainer.logger.info(f"{stop.signal_name}: stopped at iteration {stop.iteration}, "
                                        f"checkpoint {stop.checkpoint}")
                    print(f"stopped at iteration {stop.iteration}; continue with: {resume_command(argv)}", flush=True)
                return EXIT_STOPPED
            except expected as err:
                fail(err, 1, args.debug, _training_failure(err, trainer))
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()
    if trainer.is_main:
        print(f"\nfinal retrieval metrics (%), iteration {trainer.iteration}:\n{format_results(results)}")
    return 0


def _training_failure(err: BaseException, trainer) -> str:
    """One sentence for an error during training: what, when, and the checkpoint to resume from."""
    from .checkpoint.io import CheckpointWriteError, read_checkpoint
    from .engine.nonfinite import NonFiniteLossError

    text = one_sentence(err)
    if isinstance(err, (CheckpointWriteError, NonFiniteLossError)):
        return text  # they name their file and checkpoint themselves
    if isinstance(err, OSError) and "cannot decode image" in text:
        text += " (fix or remove the file, or set DATA.BAD_IMAGES skip)"
    path = trainer.checkpoint_path
    try:
        last = f"the last checkpoint is {path} (iteration {read_checkpoint(path)['iteration']}); continue with --resume"
    except (OSError, ValueError):
        last = "no checkpoint was saved yet"
    return f"training stopped at iteration {trainer.iteration}: {text}; {last}"


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("Evaluate one checkpoint or a glob of them on the dataset's evaluation tasks.")
    parser.add_argument("--ckpt", help="checkpoint file or glob ('output/run/checkpoints/*.pth'); required")
    parser.add_argument("--out", metavar="FOLDER",
                        help="where eval_metrics.json and eval_metrics.csv (one row per checkpoint and task) and the "
                        "--export .npy files are written; default: the run folder of the first checkpoint "
                        "(the folder above checkpoints/) for the metrics, the checkpoint's folder for the .npy")
    parser.add_argument("--export", nargs="*", metavar="SPLIT", default=None,
                        help="also save embeddings and labels of these splits as "
                        "<checkpoint>_<split>_{embeddings,labels}.npy")
    parser.add_argument("--projector", type=int, metavar="N",
                        help="also write N test embeddings, labels and thumbnails for TensorBoard's projector "
                        "(OUT/projector; open with tensorboard --logdir OUT/projector)")
    args = _parse(parser, argv)
    if not args.ckpt:
        parser.error("the following arguments are required: --ckpt")
    if args.projector is not None and args.projector < 1:
        parser.exit(2, f"error: --projector needs a positive number of embeddings, got {args.projector}\n")
    paths = sorted(glob.glob(args.ckpt)) if any(c in args.ckpt for c in "*?[") else [args.ckpt]
    if not paths or not all(os.path.isfile(p) for p in paths):
        parser.exit(2, f"error: no checkpoint file matches {args.ckpt!r}\n")
    from .checkpoint.config import config_of_checkpoint
    from .evaluation.checkpoints import check_export_splits, evaluate_checkpoints

    try:
        # Without --cfg the first checkpoint's own config is used (plus any overrides).
        cfg = config_of_checkpoint(paths[0], args.opts, args.cfg)
        check_export_splits(cfg, args.export)
        rows = evaluate_checkpoints(cfg, paths, export_splits=args.export, export_dir=args.out)
        out = args.out or os.path.dirname(os.path.dirname(os.path.abspath(paths[0])))
        _write_rows(rows, out)
        if args.projector is not None:
            from .serving.projector import write_projector

            folder = write_projector(cfg, paths, args.projector, os.path.join(out, "projector"))
            print(f"wrote the projector files to {folder} (tensorboard --logdir {folder})", file=sys.stderr)
    except _expected_errors() as err:
        fail(err, 2, args.debug)
    except KeyboardInterrupt:  # evaluation keeps no state worth saving: stop quietly
        if args.debug:
            raise
        print("interrupted before eval_metrics.json was written", file=sys.stderr)
        return 130
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
