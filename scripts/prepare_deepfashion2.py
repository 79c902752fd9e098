#!/usr/bin/env python
"""Build the DeepFashion2 item index once (reads every annotation JSON; a few minutes).

    python scripts/prepare_deepfashion2.py --root datasets/deepfashion2 [--out DIR] [--workers 8]

DATA.ROOT (--root) holds train/{image,annos}/ and validation/{image,annos}/ as unpacked.
The index goes to <root>/xbm_index/{train,validation}.tsv, where the DeepFashion2
dataset looks first; with --out DIR, pass index_dir=DIR to the dataset instead.
Without this script the dataset builds the same index on first use; run it beforehand
for multi-process (torchrun) training, and again with --force after changing annotations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xbm.data.datasets.deepfashion2 import (  # noqa: E402
    SUBSETS,
    DeepFashion2,
    build_index,
    identity,
    multi_category_identities,
    read_index,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the DeepFashion2 folder (DATA.ROOT)")
    parser.add_argument("--out", default=None, help="index folder (default: <root>/xbm_index)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader processes")
    parser.add_argument("--force", action="store_true", help="rebuild an existing index")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root).expanduser()
    out = Path(args.out).expanduser() if args.out else root / "xbm_index"
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    for subset in SUBSETS:
        target = out / f"{subset}.tsv"
        if target.is_file() and not args.force:
            print(f"{target} exists (use --force to rebuild)")
            continue
        start = time.time()
        progress = (lambda files, s=subset: tqdm(files, desc=s, unit="json")) if tqdm else None
        stats = build_index(root, subset, target, workers=max(1, args.workers), progress=progress)
        print(f"{subset}: {stats} -> {target} ({time.time() - start:.0f} s)")
    index_dir = None if args.out is None else out
    for split in DeepFashion2.SPLITS:
        dataset = DeepFashion2(root, split, index_dir=index_dir)
        print(f"{split}: {len(dataset)} items, {len(set(dataset.labels.tolist()))} labels")
    print(describe_query_identities(read_index(out / "validation.tsv")))
    return 0


def describe_query_identities(rows) -> str:
    """How many query identities (pair_id, style) span several categories: one line for the log."""
    queries = [row for row in rows if row.source == "user" and row.style > 0]
    mixed = multi_category_identities(queries)
    covered = sum(identity(row) in mixed for row in queries)
    return (
        f"query identities spanning several categories: {len(mixed)} ({covered} of {len(queries)} query items); "
        "each is one identity (pair_id, style), as in the official DeepFashion2 retrieval evaluation"
    )


if __name__ == "__main__":
    sys.exit(main())
