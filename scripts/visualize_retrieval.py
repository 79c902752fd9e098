#!/usr/bin/env python
"""A picture of what a checkpoint retrieves: one row per query, its top-k results framed green or red.

    python scripts/visualize_retrieval.py --ckpt output/glyphs_xbn/checkpoints/last.pth --out grid.png

For an evaluation task of the checkpoint's dataset (default: its first, e.g. "test"), embeds the
task's query and gallery splits with the test-time transform, searches the nearest gallery items
of each chosen query by cosine similarity (leave-one-out tasks exclude the query itself) and
draws the query (blue frame), then its top-k results: green frame = same label (a hit), red =
another label, cosine similarity above each. Images are the dataset's raw images, without
normalisation. Queries: --queries N picks N at random (--seed), --query-ids picks them by index.
The model is built from --cfg, or else from the checkpoint's own config (KEY VALUE overrides
apply in both cases, e.g. DATA.ROOT or MODEL.DEVICE cpu). The PNG is (1 + k) x rows cells of
CELL_PIXELS pixels.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import ConfigError  # noqa: E402
from xbm.utils.retrieval_grid import (  # noqa: E402,F401  (the colours and sizes are this script's API too)
    CELL_PIXELS,
    HIT_COLOR,
    MISS_COLOR,
    QUERY_COLOR,
    draw_retrieval_grid,
    grid_pixel_size,
    result_color,
)


def retrieve(query, gallery, query_ids, k: int, leave_one_out: bool):
    """Top-k gallery indices and cosine similarities of the chosen queries, best first.

    query, gallery: (N, D) unit embeddings (torch). Leave-one-out (gallery is query) excludes
    each query's own row. Returns (sims, ids) as (len(query_ids), k) tensors.
    """
    import torch

    available = gallery.shape[0] - int(leave_one_out)
    if not 1 <= k <= available:
        raise ValueError(f"--topk must be between 1 and {available} (the searchable gallery), got {k}")
    rows = torch.as_tensor(np.asarray(query_ids, dtype=np.int64))
    sims = query[rows] @ gallery.T
    if leave_one_out:
        sims[torch.arange(len(rows)), rows] = -float("inf")
    top = torch.topk(sims, k, dim=1, largest=True, sorted=True)
    return top.values, top.indices


def choose_queries(num_items: int, count: int | None, ids: list[int] | None, seed: int) -> list[int]:
    if ids:
        bad = [i for i in ids if not 0 <= i < num_items]
        if bad:
            raise ValueError(f"--query-ids {bad} are outside the query split (0..{num_items - 1})")
        return list(ids)
    if count is None or count < 1:
        raise ValueError(f"--queries must be at least 1, got {count}")
    chosen = np.random.default_rng(seed).choice(num_items, size=min(count, num_items), replace=False)
    return sorted(int(i) for i in chosen)


def draw_grid(query_set, gallery_set, query_ids, sims, ids, path: str) -> list[bool]:
    """Write the PNG; return, per query, whether its first result is a hit."""
    rows, first_hits = [], []
    for r, qid in enumerate(query_ids):
        label = int(query_set.labels[qid])
        cells = [(query_set[qid][0], QUERY_COLOR, f"query {qid} ({query_set.class_name(label)})")]
        for c in range(ids.shape[1]):
            gid = int(ids[r, c])
            color = result_color(label, int(gallery_set.labels[gid]))
            if c == 0:
                first_hits.append(color == HIT_COLOR)
            cells.append((gallery_set[gid][0], color, f"#{c + 1}  {float(sims[r, c]):.3f}"))
        rows.append(cells)
    draw_retrieval_grid(rows, path)
    return first_hits


class _Transformed:
    """A dataset seen through a transform, keeping its labels (for compute_embeddings)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform, self.labels = dataset, transform, dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file (e.g. output/run/checkpoints/last.pth)")
    parser.add_argument("--cfg", metavar="FILE", help="YAML experiment file (default: the checkpoint's config)")
    parser.add_argument("--task", help="evaluation task of the dataset (default: its first, e.g. test)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--queries", type=int, default=8, help="number of random queries (default 8)")
    group.add_argument("--query-ids", type=int, nargs="+", metavar="ID",
                       help="indices of the queries in the query split")
    parser.add_argument("--topk", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random queries (default 0)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    args = parser.parse_args(argv)

    from xbm.data.datasets import build_dataset, dataset_class
    from xbm.data.transforms import build_transforms
    from xbm.checkpoint.io import load_checkpoint
    from xbm.checkpoint.config import config_of_checkpoint
    from xbm.evaluation.evaluator import compute_embeddings
    from xbm.modeling import build_model
    from xbm.utils.env import resolve_device

    try:
        cfg = config_of_checkpoint(args.ckpt, args.opts, args.cfg)
        tasks = dataset_class(cfg).EVAL_TASKS
        task = args.task or next(iter(tasks))
        if task not in tasks:
            raise ValueError(
                f"--task {task!r} is not an evaluation task of {cfg.DATA.NAME}; choose one of {list(tasks)}")
        query_split, gallery_split = tasks[task]
        query_set = build_dataset(cfg, query_split, transform=None)
        gallery_set = query_set if gallery_split is None else build_dataset(cfg, gallery_split, transform=None)
        query_ids = choose_queries(len(query_set), args.queries, args.query_ids, args.seed)

        device = resolve_device(cfg.MODEL.DEVICE)
        model = build_model(cfg).to(device)
        model.load_state_dict(load_checkpoint(args.ckpt, map_location=device)["model"])
        transform = build_transforms(cfg, train=False)

        def embed(dataset):
            return compute_embeddings(model, _Transformed(dataset, transform), device,
                                      cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS)[0]

        query = embed(query_set)
        gallery = query if gallery_split is None else embed(gallery_set)
        sims, ids = retrieve(query, gallery, query_ids, args.topk, leave_one_out=gallery_split is None)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as err:
        parser.exit(2, f"error: {err}\n")
    first_hits = draw_grid(query_set, gallery_set, query_ids, sims, ids, args.out)
    width, height = grid_pixel_size(len(query_ids), ids.shape[1])
    print(f"wrote {args.out} ({width} x {height} px): task {task}, {len(query_ids)} queries, "
          f"{sum(first_hits)} with a hit at rank 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
