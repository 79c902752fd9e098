#!/usr/bin/env python
"""Runs against a reference, seed by seed: the tables of BENCHMARKS.md's research sections.

    python scripts/paired_runs.py --iteration 1200 \\
        --reference XBN 'output/b16_base/XBM.ADAPT.NAME=xbn__seed=*' \\
        --run 'key encoder' 'output/b16_key/XBM.ADAPT.NAME=none__seed=*' \\
        --run 'key encoder + XBN' 'output/b16_key/XBM.ADAPT.NAME=xbn__seed=*' \\
        [--figure out.png --figure-title "batch 16"]

Each RUN_GLOB names the OUTPUT_DIRs of one setting over seeds, each ending in `seed=<s>` (scripts/sweep.py's
folders). A run is paired with the reference run of the same seed (the last --reference before it; a run
before any --reference is listed without a difference). One Markdown row per setting: seeds, validation and
test R@1 (mean +- sample std, %), the paired test difference (mean +- std, every seed's, and mean / std), the
memory probe's cosines (DRIFT.MEMORY_PROBE: each run's mean over its measurements from --cosines-from on,
then mean +- std over seeds; "-" without a probe) and the run's seconds (its log.txt's first and last time
stamps). A setting with no finished run is a row of 0 seeds (and a line on stderr); a --reference that
matches nothing is an error. --figure draws the paired test differences, one line per setting, every seed a dot.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.utils.plotting import final_metrics, mean_and_std, new_figure, read_metrics, save_figure  # noqa: E402

COSINES = ("memory_drift/cosine_stored", "memory_drift/cosine_enqueued", "memory_drift/cosine_newest")
_SEED = re.compile(r"seed=(\d+)$")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")


def runs_by_seed(pattern: str) -> dict[int, str]:
    """{seed: folder} of the folders `pattern` matches."""
    found = {}
    for folder in sorted(glob.glob(pattern)):
        match = _SEED.search(folder.rstrip("/"))
        if match and os.path.isdir(folder):
            found[int(match.group(1))] = folder
    if not found:
        raise ValueError(f"{pattern!r} matches no run folder ending in seed=<s>")
    return found


def run_summary(folder: str, iteration: int, cosines_from: int) -> dict | None:
    """val/test R@1 at `iteration`, the probe's mean cosines, the seconds; None if not finished there."""
    if not os.path.isfile(os.path.join(folder, "metrics.jsonl")):
        return None  # a run still training (or never started)
    metrics = final_metrics(read_metrics(folder), iteration)
    if metrics is None or "test" not in metrics:
        return None
    summary = {"val": metrics.get("val", {}).get("R@1"), "test": metrics["test"]["R@1"],
               "seconds": run_seconds(os.path.join(folder, "log.txt"))}
    drift_path = os.path.join(folder, "drift.jsonl")
    records = []
    if os.path.isfile(drift_path):
        with open(drift_path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    for key in COSINES:
        values = [r[key] for r in records if key in r and cosines_from <= r["iteration"] <= iteration]
        summary[key] = sum(values) / len(values) if values else None
    return summary


def run_seconds(log_path: str) -> float | None:
    """Seconds between the first and the last time stamp of a run's log.txt (None without one)."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, encoding="utf-8") as handle:
        stamps = [m.group(1) for line in handle if (m := _STAMP.match(line))]
    if len(stamps) < 2:
        return None
    first, last = (datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def cell(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean, std = mean_and_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} +- {std:.{digits}f}"


def table(settings: list[tuple[str, str, str | None]], iteration: int, cosines_from: int,
          reference_iteration: int | None = None) -> tuple[str, list]:
    """The Markdown table and, per setting with a reference, (label, per-seed test differences in points)."""
    header = ("| setting | seeds | val R@1 | test R@1 | test minus reference (paired) | per seed | mean / std | "
              "cos stored | cos last embedded | cos newest | seconds |")
    lines = [header, "|" + "---|" * header.count(" |")]
    differences = []
    for label, pattern, reference in settings:
        try:
            found = runs_by_seed(pattern)
        except ValueError as error:  # a setting not run yet: a row of 0 seeds, said on stderr
            print(f"paired_runs.py: {error}", file=sys.stderr)
            found = {}
        own_iteration = reference_iteration if reference is None and reference_iteration else iteration
        runs = {s: run_summary(f, own_iteration, cosines_from) for s, f in found.items()}
        runs = {s: r for s, r in runs.items() if r is not None}
        refs = {}
        if reference is not None:
            refs = {s: run_summary(f, reference_iteration or iteration, cosines_from)
                    for s, f in runs_by_seed(reference).items()}
        paired = [100 * (runs[s]["test"] - refs[s]["test"]) for s in sorted(runs) if refs.get(s)]
        if reference is None or not paired:
            diff_cells = ["-", "-", "-"]
        else:
            mean, std = mean_and_std(paired)
            ratio = f"{mean / std:+.1f}" if len(paired) > 1 and std > 0 else "-"
            diff_cells = [f"{mean:+.1f} +- {std:.1f}" if len(paired) > 1 else f"{mean:+.1f}",
                          " / ".join(f"{d:+.2f}" for d in paired), ratio]
            differences.append((label, paired))
        rows = list(runs.values())
        lines.append("| " + " | ".join([
            label, str(len(rows)), cell([r["val"] for r in rows]), cell([r["test"] for r in rows]), *diff_cells,
            *(cell([r[k] for r in rows], scale=1.0, digits=3) for k in COSINES),
            cell([r["seconds"] for r in rows], scale=1.0, digits=0)]) + " |")
    return "\n".join(lines), differences


def draw(differences: list, path: str, title: str) -> None:
    height = 0.4 * len(differences) + 1.1  # inches: the margins below are fixed in inches too
    figure = new_figure(7.0, height)
    axes = figure.add_subplot(1, 1, 1)
    for row, (label, paired) in enumerate(reversed(differences)):
        mean, std = mean_and_std(paired)
        axes.errorbar([mean], [row], xerr=[std if len(paired) > 1 else 0], fmt="o", color="black", capsize=3)
        axes.scatter(paired, [row] * len(paired), color="tab:blue", alpha=0.6, s=14, zorder=3)
    axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(range(len(differences)), [label for label, _ in reversed(differences)])
    axes.set_xlabel("test R@1 minus the reference, same seed (points)")
    axes.set_title(title, fontsize=10)
    figure.subplots_adjust(left=0.34, right=0.97, top=1 - 0.35 / height, bottom=0.6 / height)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: the order of --reference and --run is read back from the literal options
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--iteration", type=int, required=True, help="the evaluation compared (SOLVER.MAX_ITERS)")
    parser.add_argument("--reference", nargs=2, action="append", default=[], metavar=("LABEL", "RUN_GLOB"),
                        help="the reference of the --run options after it (listed as a row itself)")
    parser.add_argument("--run", nargs=2, action="append", default=[], metavar=("LABEL", "RUN_GLOB"))
    parser.add_argument("--reference-iteration", type=int,
                        help="the references' evaluation compared, when they trained longer (equal wall-clock)")
    parser.add_argument("--cosines-from", type=int, default=600, help="first probe iteration averaged")
    parser.add_argument("--figure", help="PNG of the paired differences")
    parser.add_argument("--figure-title", default="")
    settings, reference = [], None
    args = parser.parse_args(argv)
    # argparse keeps each option's values apart: put --reference and --run back in command-line order
    order = [a for a in (argv if argv is not None else sys.argv[1:]) if a in ("--reference", "--run")]
    refs, runs = iter(args.reference), iter(args.run)
    for option in order:
        if option == "--reference":
            label, reference = next(refs)
            settings.append((label, reference, None))
        else:
            label, pattern = next(runs)
            settings.append((label, pattern, reference))
    try:
        text, differences = table(settings, args.iteration, args.cosines_from, args.reference_iteration)
    except (ValueError, FileNotFoundError) as error:
        print(f"paired_runs.py: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.figure and differences:
        draw(differences, args.figure, args.figure_title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
