"""Reading a run's metrics.jsonl, and figures drawn without pyplot's global state.

The research scripts (scripts/sweep.py, plot_recall.py, drift.py, visualize_retrieval.py)
share these. Figures are `matplotlib.figure.Figure` objects with an Agg canvas: nothing here
selects a backend or touches pyplot, so importing or calling it never changes how a user's
own session draws, and it works on machines without a display.
"""
from __future__ import annotations

import json
import math
import os
import re

# Per-record bookkeeping fields the trainer writes beside the metrics.
RECORD_FIELDS = ("iteration", "split")
_RECALL_NAME = re.compile(r"^R@(\d+)$")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl in file order (one per evaluation task and evaluation)."""
    path = os.path.join(os.fspath(run_dir), "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {os.fspath(run_dir)!r} the OUTPUT_DIR of a training run?")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict) or "iteration" not in record or "split" not in record:
                raise ValueError(f"{path}, line {number}: expected an object with 'iteration' and 'split'")
            records.append(record)
    return records


def metric_values(record: dict) -> dict[str, float]:
    """The metrics of one record: its float values (R@K, MAP@R, RP), not counts or bookkeeping."""
    return {
        name: value for name, value in record.items()
        if name not in RECORD_FIELDS and isinstance(value, float)
    }


def final_metrics(records: list[dict], iteration: int) -> dict[str, dict[str, float]] | None:
    """{task: metrics} of the evaluations at `iteration` (the last one per task), or None if none."""
    found = {r["split"]: metric_values(r) for r in records if r["iteration"] == iteration}
    return found or None


def last_evaluations(records: list[dict]) -> dict[str, dict]:
    """{task: record} of the last evaluation of each task, in file order."""
    last: dict[str, dict] = {}
    for record in records:
        last[record["split"]] = record
    return last


def recall_curve(record: dict) -> tuple[list[int], list[float]]:
    """(Ks, Recall@K) of one record, sorted by K."""
    points = sorted(
        (int(m.group(1)), float(value)) for name, value in record.items()
        if (m := _RECALL_NAME.match(name))
    )
    return [k for k, _ in points], [v for _, v in points]


def new_figure(width_in: float, height_in: float, dpi: int = 100):
    """A Figure with an Agg canvas attached (no pyplot, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> None:
    """Write the figure as PNG at its own size and dpi (no tight cropping: the size is predictable)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(os.fspath(path), dpi=figure.dpi, format="png")


def spans_decades(values) -> bool:
    """True when the positive values span more than a factor of 10 (worth a log axis)."""
    positive = [float(v) for v in values if float(v) > 0]
    return bool(positive) and max(positive) > 10 * min(positive)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN with fewer than two values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)
