#!/usr/bin/env python
"""Recall@K curves of several runs: one line per run, x = K on a log axis, one panel per task.

    python scripts/plot_recall.py --runs output/glyphs_baseline output/glyphs_xbn \\
        --labels "no memory" XBN --out curves.png

Each run folder's metrics.jsonl gives the last evaluation of each task (the final one of a
finished run). The table of values is printed too.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.utils.plotting import last_evaluations, new_figure, read_metrics, recall_curve, save_figure  # noqa: E402

PANEL_INCHES = (6.0, 4.5)
DPI = 100


def figure_pixel_size(num_tasks: int) -> tuple[int, int]:
    """(width, height) of the PNG in pixels."""
    return round(num_tasks * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI)


def default_labels(runs: list[str]) -> list[str]:
    """Each folder's name, or its whole path when two runs share a name."""
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    return names if len(set(names)) == len(names) else [os.path.normpath(r) for r in runs]


def collect(runs: list[str], labels: list[str]) -> dict[str, list[tuple[str, dict, int]]]:
    """{task: [(label, record, iteration)]} from the last evaluation of each task of each run."""
    curves: dict[str, list[tuple[str, dict, int]]] = {}
    for run, label in zip(runs, labels):
        evaluations = last_evaluations(read_metrics(run))
        if not evaluations:
            raise ValueError(f"{run}/metrics.jsonl holds no evaluation yet")
        for task, record in evaluations.items():
            if not recall_curve(record)[0]:
                raise ValueError(f"{run}/metrics.jsonl: the last {task!r} evaluation has no R@K values")
            curves.setdefault(task, []).append((label, record, record["iteration"]))
    return curves


def plot_curves(curves: dict[str, list[tuple[str, dict, int]]], path: str) -> None:
    figure = new_figure(PANEL_INCHES[0] * len(curves), PANEL_INCHES[1], dpi=DPI)
    for panel, (task, entries) in enumerate(curves.items()):
        ax = figure.add_subplot(1, len(curves), panel + 1)
        all_ks = set()
        for label, record, iteration in entries:
            ks, values = recall_curve(record)
            all_ks.update(ks)
            ax.plot(ks, [100 * v for v in values], marker="o", label=f"{label} (iter {iteration})")
        ax.set_xscale("log")
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (%)")
        ax.set_title(f"task {task}", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    parser.add_argument("--task", help="plot only this evaluation task (default: every task)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    labels = args.labels or default_labels(args.runs)
    try:
        curves = collect(args.runs, labels)
        if args.task:
            if args.task not in curves:
                raise ValueError(f"--task {args.task!r} is not among the runs' tasks {list(curves)}")
            curves = {args.task: curves[args.task]}
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    plot_curves(curves, args.out)
    for task, entries in curves.items():
        ks = sorted({k for _, record, _ in entries for k in recall_curve(record)[0]})
        print(f"task {task}: Recall@K (%)")
        print(f"{'run':<30}" + "".join(f"{'R@' + str(k):>9}" for k in ks))
        for label, record, _ in entries:
            print(f"{label:<30}" + "".join(
                f"{100 * record[f'R@{k}']:>9.2f}" if f"R@{k}" in record else f"{'-':>9}" for k in ks))
    width, height = figure_pixel_size(len(curves))
    print(f"wrote {args.out} ({width} x {height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
