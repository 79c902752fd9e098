#!/usr/bin/env python
"""Tensorboard scalars of several runs against the iteration: one panel per tag, one line per run.

    python scripts/plot_scalars.py --runs output/xbm_batch output/xbm_pairs --labels batch pairs \\
        --tags grad/memory_over_inbatch loss/memory --log-y --out ratio.png

Each run folder's tensorboard event files (written by the trainer on logging steps) give the
values; a tag a run does not have is left out of its panel, and one no run has is an error. The
last value of each tag and run is printed too.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.utils.plotting import new_figure, save_figure  # noqa: E402

PANEL_INCHES = (6.0, 4.0)


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(iteration, value), ...]} from every event file of `run_dir`, by iteration (where two
    files log the same iteration, as a resumed run's do, the value written last wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run_dir} has no tensorboard event files: is it the OUTPUT_DIR of a training run?")
    # By each event's wall time, not by file name: the name's per-process writer counter sorts as text
    # ("10" before "9"), and two writers opened in the same second share its timestamp.
    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for path in files:
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            latest = scalars.setdefault(tag, {})
            for event in events.Scalars(tag):
                if event.step not in latest or event.wall_time >= latest[event.step][0]:
                    latest[event.step] = (event.wall_time, event.value)
    return {tag: sorted((step, value) for step, (_, value) in steps.items()) for tag, steps in scalars.items()}


def plot(runs: dict[str, dict], tags: list[str], log_y: bool):
    figure = new_figure(PANEL_INCHES[0] * len(tags), PANEL_INCHES[1])
    for index, tag in enumerate(tags):
        axes = figure.add_subplot(1, len(tags), index + 1)
        for label, scalars in runs.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                axes.plot(steps, values, label=label)
        axes.set_title(tag)
        axes.set_xlabel("iteration")
        if log_y:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="training OUTPUT_DIRs")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--tags", nargs="+", required=True, help="tensorboard scalar tags, e.g. loss/memory")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--out", required=True, help="PNG file")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} --labels for {len(args.runs)} --runs")
    try:
        runs = {label: read_scalars(run) for label, run in zip(labels, args.runs)}
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = [tag for tag in args.tags if not any(tag in scalars for scalars in runs.values())]
    if missing:
        print(f"error: no run has the tag(s) {missing}; the first run has {sorted(next(iter(runs.values())))}",
              file=sys.stderr)
        return 2
    for tag in args.tags:
        for label, scalars in runs.items():
            if tag in scalars:
                step, value = scalars[tag][-1]
                print(f"{tag:<28} {label:<20} iteration {step:>6}: {value:.4g}")
    save_figure(plot(runs, args.tags, args.log_y), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
