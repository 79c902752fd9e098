#!/usr/bin/env python
"""Feature drift between saved checkpoints: how far a fixed set of training images moves.

    python scripts/drift.py --ckpts 'output/run/checkpoints/*.pth' --out output/run/drift

Embeds the same fixed random subset of the training split (test-time transform; the subset is
the one the trainer's drift monitor uses for the same --num-samples and --seed) under every
checkpoint, in the order of the iteration stored in each, and writes to --out:
  drift.csv  per checkpoint: its iteration, the drift from the previous checkpoint
             (mean L2 distance and mean cosine, xbm.diagnostics.drift.feature_drift) and to the last one;
  drift.png  both against the iteration.
The model is built from --cfg, or else from the first checkpoint's own config (KEY VALUE
overrides apply in both cases, e.g. DATA.ROOT or MODEL.DEVICE cpu).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import ConfigError  # noqa: E402
from xbm.diagnostics.drift import COSINE_KEY, DISTANCE_KEY, DriftMonitor, feature_drift  # noqa: E402
from xbm.utils.plotting import new_figure, save_figure  # noqa: E402

COLUMNS = ("checkpoint", "iteration", "previous_iteration", "distance_from_previous", "cosine_from_previous",
           "distance_to_last", "cosine_to_last")


def checkpoint_paths(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    paths = [p for p in paths if os.path.isfile(p)]
    if len(paths) < 2:
        raise ValueError(
            f"--ckpts {pattern!r} matches {len(paths)} checkpoint file(s); drift needs at least two "
            "(checkpoints saved at different iterations)"
        )
    return paths


def embed_checkpoints(cfg, paths: list[str], num_samples: int, seed: int):
    """[(iteration, path, probe embeddings)] sorted by the checkpoints' stored iteration."""
    from xbm.data.datasets import build_dataset, dataset_class
    from xbm.data.transforms import build_transforms
    from xbm.checkpoint.io import load_checkpoint
    from xbm.modeling import build_model
    from xbm.utils.env import resolve_device

    device = resolve_device(cfg.MODEL.DEVICE)
    dataset = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
    monitor = DriftMonitor(dataset, num_samples=num_samples, seed=seed, device=device,
                           batch_size=cfg.TEST.BATCH_SIZE)
    model = build_model(cfg).to(device)
    found = []
    for path in paths:
        state = load_checkpoint(path, map_location=device)
        if "model" not in state or "iteration" not in state:
            raise ValueError(f"{path} is not a training checkpoint (it has no 'model' or 'iteration')")
        model.load_state_dict(state["model"])
        found.append((int(state["iteration"]), path, monitor.embed(model)))
    found.sort(key=lambda item: item[0])
    iterations = [it for it, _, _ in found]
    if len(set(iterations)) != len(iterations):
        raise ValueError(f"several checkpoints store the same iteration: {iterations}")
    return found


def drift_rows(found) -> list[dict]:
    last = found[-1][2]
    rows = []
    for index, (iteration, path, embeddings) in enumerate(found):
        row = {"checkpoint": path, "iteration": iteration, "previous_iteration": ""}
        if index:
            previous_iteration, _, previous = found[index - 1]
            step = feature_drift(previous, embeddings)
            row.update(previous_iteration=previous_iteration, distance_from_previous=step[DISTANCE_KEY],
                       cosine_from_previous=step[COSINE_KEY])
        to_last = feature_drift(embeddings, last)
        row.update(distance_to_last=to_last[DISTANCE_KEY], cosine_to_last=to_last[COSINE_KEY])
        rows.append(row)
    return rows


def plot_drift(rows: list[dict], path: str, num_samples: int) -> None:
    figure = new_figure(10.0, 4.0)
    steps = [r for r in rows if r["previous_iteration"] != ""]
    for column, (measure, label) in enumerate((("distance", "mean L2 distance"), ("cosine", "mean cosine"))):
        ax = figure.add_subplot(1, 2, column + 1)
        ax.plot([r["iteration"] for r in steps], [r[f"{measure}_from_previous"] for r in steps],
                marker="o", label="from the previous checkpoint")
        ax.plot([r["iteration"] for r in rows], [r[f"{measure}_to_last"] for r in rows],
                marker="s", linestyle="--", label="to the last checkpoint")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.set_title(f"{label} of {num_samples} training images", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpts", required=True, help="checkpoint glob, e.g. 'output/run/checkpoints/*.pth'")
    parser.add_argument("--cfg", metavar="FILE", help="YAML experiment file (default: the first checkpoint's config)")
    parser.add_argument("--num-samples", type=int, default=256, help="training images in the probe set (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe set (default 0)")
    parser.add_argument("--out", required=True, help="folder for drift.csv and drift.png")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    args = parser.parse_args(argv)
    try:
        paths = checkpoint_paths(args.ckpts)
        from xbm.checkpoint.config import config_of_checkpoint

        cfg = config_of_checkpoint(paths[0], args.opts, args.cfg)
        found = embed_checkpoints(cfg, paths, args.num_samples, args.seed)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as err:
        parser.exit(2, f"error: {err}\n")
    rows = drift_rows(found)
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "drift.csv"))
    plot_drift(rows, os.path.join(args.out, "drift.png"), len(found[0][2]))
    headers = ("dist prev", "cos prev", "dist last", "cos last")
    print(f"{'iteration':>10}" + "".join(f"{h:>11}" for h in headers))
    for row in rows:
        cells = [row.get(k, "") for k in COLUMNS[3:]]
        print(f"{row['iteration']:>10}" + "".join(f"{'':>11}" if c == "" else f"{c:>11.4f}" for c in cells))
    print(f"wrote {args.out}/drift.csv and {args.out}/drift.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
