#!/usr/bin/env python
"""Train every combination of a grid of config values, over seeds, and tabulate and plot the results.

    python scripts/sweep.py --cfg configs/glyphs_xbn.yaml \\
        --grid XBM.SIZE=0,1024,4096,16384 --grid XBM.ADAPT.NAME=none,xbn,axbn --seeds 3 \\
        --jobs 2 --output output/sweep_size  SOLVER.MAX_ITERS 2000

Runs: the cartesian product of the --grid values, each with SOLVER.SEED 0 .. --seeds - 1, trained
by `python tools/train_net.py --cfg FILE --resume auto KEY VALUE ... OUTPUT_DIR <folder>` in
DIR/<KEY=value>__<KEY=value>__seed=<s> (one or --jobs at a time; each child's console output goes
to <folder>/console.log). With --jobs N > 1 each child gets OMP_NUM_THREADS = cores / N.
With --gpus 0,1,2,3 each of the N concurrent slots owns one of those GPUs (slot k takes the
(k mod 4)-th) and its children see only it (CUDA_VISIBLE_DEVICES), so --jobs 4 --gpus 0,1,2,3
trains four runs at once, one per GPU; without --gpus every child sees every GPU.

Rules (each checked before anything is launched):
- Values are parsed with the config's own types (yacs): an unknown key or a value of the wrong type
  stops the sweep, and so does any combination the training would refuse (xbm.config.load_cfg).
- XBM.SIZE=0 means "no memory": that run gets XBM.ENABLE False and XBM.SIZE keeps the value of the
  config file. Any other XBM.SIZE of a grid sets XBM.ENABLE True, so a grid over the memory size
  means the same whatever the config file says.
- With the memory off, the memory-only keys (XBM.SIZE, XBM.START_ITERATION, XBM.WEIGHT, XBM.DTYPE,
  XBM.FILL_FROM, XBM.ADAPT.*; xbm/config/rules.py) change nothing: combinations that differ only in them
  are one experiment, trained once in a folder named without them (e.g. DIR/XBM.SIZE=0__seed=0) and
  reported under each.
- A run is finished when its metrics.jsonl has an evaluation at iteration == SOLVER.MAX_ITERS.
  Finished runs are not launched again; unfinished ones are relaunched with --resume auto, so
  they continue from checkpoints/last.pth (raising SOLVER.MAX_ITERS extends finished runs).
  A folder whose config.yaml differs from the run's config (beyond the keys a resume may change)
  is refused: use another --output or delete it.

Outputs in DIR: results.csv (one row per combination and seed: grid values, seed, status, every
final metric as TASK/METRIC, the run folder and its console log), summary.csv (per combination:
number of finished seeds, mean and sample std (ddof=1) of each metric), summary.md (the same as a
Markdown table, mean +- std in %), and recall_vs_<key>.png:
R@1 against the first numeric grid key (log axis when it spans more than 10x; the value 0 of a log
axis or of XBM.SIZE, "no memory", drawn as a dashed horizontal line), one line per value of the
other grid keys, mean +- std band over seeds (error bars where a line has one point or the axis is
not numeric).
A child that fails is listed as failed with its log; the others go on; the exit status is then 1.
Each child imports xbm from this checkout when it starts: an edit of the checkout while a sweep runs
changes (or breaks) the runs that start after it. For a long sweep, train from a worktree of a commit
(`git worktree add --detach ../xbm-sweep HEAD`, then run the sweep there) and keep editing here.

On a cluster (--launcher slurm, through submitit; xbm/cluster.py): every unfinished run is one job
running the same command, all in one SLURM job array, with --partition, --gpus-per-node (one
process per GPU, torchrun's variables set), --nodes, --time, --cpus-per-gpu, --account, --qos,
--constraint and --sbatch NAME[=VALUE]; submitit's files go to DIR/submitit. A job signalled before
its time limit or at preemption saves a checkpoint and is requeued, and resumes. The sweep waits
for the jobs, then writes the same outputs (while jobs of its last submission are still queued or
running, it submits nothing: DIR/submitit/jobs.json). --launcher submitit-local runs the same jobs as local
subprocesses. Nothing is submitted without sbatch, when sbatch refuses the job (its message is
shown), or for more than --max-jobs jobs without --yes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import itertools
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xbm.cluster import CLUSTER_LAUNCHERS, ClusterError, add_cluster_arguments, options_from_args  # noqa: E402
from xbm.config import ConfigError, load_cfg  # noqa: E402
from xbm.config.rules import (  # noqa: E402
    MEMORY_SIZE_KEY as SIZE_KEY, NO_MEMORY, config_differences, is_memory_only, memory_size_overrides,
)
from xbm.utils.env import threads_per_job  # noqa: E402
from xbm.utils.plotting import (  # noqa: E402
    final_metrics, mean_and_std, new_figure, read_metrics, save_figure, spans_decades,
)

TRAIN_SCRIPT = os.path.join(ROOT, "tools", "train_net.py")
# Keys the sweep sets itself.
RESERVED_KEYS = ("OUTPUT_DIR", "SOLVER.SEED")
CONSOLE_LOG = "console.log"
SUBMITIT_FOLDER = "submitit"  # in the sweep's folder: submitit's job files and logs (cluster launchers)


class SweepError(ValueError):
    """A sweep specification that cannot run; raised before any training starts."""


@dataclass(frozen=True)
class Axis:
    """One --grid option: a config key and its values (as typed and as parsed by the config)."""

    key: str
    raw: tuple[str, ...]
    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclass
class Run:
    """One training: a folder, the overrides that define it and its loaded config."""

    name: str
    folder: str
    opts: list[str]
    max_iters: int
    cfg: Any = field(repr=False)

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, CONSOLE_LOG)


@dataclass
class Row:
    """One combination of grid values with one seed, and the run that trains it."""

    values: dict[str, Any]
    seed: int
    run: Run


@dataclass
class Plan:
    axes: list[Axis]
    rows: list[Row]
    runs: dict[str, Run]  # by name, in launch order


# ---------------------------------------------------------------------------------------- planning
def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so tuple values survive: '(8, 16),(16, 32)' -> 2 values."""
    values, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    return values


def parse_grid_option(spec: str) -> tuple[str, list[str]]:
    """'KEY=v1,v2,...' -> (KEY, [v1, v2, ...]) as typed."""
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise SweepError(f"--grid {spec!r}: expected KEY=VALUE1,VALUE2,... (e.g. XBM.SIZE=0,1024,4096)")
    values = split_values(rest)
    if any(not v for v in values):
        raise SweepError(f"--grid {spec!r}: empty value in the list")
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {spec!r}: a value is listed twice")
    return key, values


def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def parse_axis(cfg_file: str | None, opts: list[str], key: str, raw_values: list[str]) -> Axis:
    """Type every value of a grid key the way the config does, or raise SweepError naming it."""
    if key in RESERVED_KEYS:
        hint = "use --seeds" if key == "SOLVER.SEED" else "use --output"
        raise SweepError(f"--grid {key}: the sweep sets {key} itself; {hint}")
    values = []
    for raw in raw_values:
        try:
            cfg = load_cfg(cfg_file, [*opts, key, raw], check=False)
        except ConfigError as err:
            raise SweepError(f"--grid {key}={raw}: {err}") from None
        values.append(_lookup(cfg, key))
    return Axis(key, tuple(raw_values), tuple(values))


def _grid_overrides(axes: list[Axis], index: tuple[int, ...], memory_on: bool = True) -> list[str]:
    """KEY VALUE overrides of one combination; with the memory off, memory-only keys are left out."""
    opts = []
    for axis, i in zip(axes, index):
        if axis.key == SIZE_KEY:
            opts += memory_size_overrides(axis.raw[i], axis.values[i])
        elif memory_on or not is_memory_only(axis.key):
            opts += [axis.key, axis.raw[i]]
    return opts


_UNSAFE = re.compile(r"[^A-Za-z0-9._+,=-]+")


def folder_name(items: list[tuple[str, str]], seed: int) -> str:
    """KEY=value__KEY=value__seed=S: blanks dropped, other characters unsafe in paths replaced by '_'."""
    parts = [f"{key}={_UNSAFE.sub('_', ''.join(raw.split())).strip('_') or '_'}" for key, raw in items]
    return "__".join([*parts, f"seed={seed}"])


def plan_sweep(cfg_file: str | None, grids: list[tuple[str, list[str]]], seeds: int,
               opts: list[str] | None, output: str) -> Plan:
    """Every combination x seed, validated with load_cfg; runs that are one experiment are merged."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise SweepError(f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
    if seeds < 1:
        raise SweepError(f"--seeds must be at least 1, got {seeds}")
    keys = [key for key, _ in grids]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key has two --grid options: {keys}")
    fixed = opts[0::2]
    for key in fixed:
        if key in RESERVED_KEYS:
            raise SweepError(f"override {key}: the sweep sets it itself (use --seeds / --output)")
        if key in keys:
            raise SweepError(f"{key} is both a --grid key and a fixed override")
    if SIZE_KEY in keys and ("XBM.ENABLE" in keys or "XBM.ENABLE" in fixed):
        raise SweepError("XBM.ENABLE is set by the XBM.SIZE grid (0 = no memory, else memory on); do not set it too")
    axes = [parse_axis(cfg_file, opts, key, values) for key, values in grids]

    rows, runs, named_by = [], {}, {}
    for index in itertools.product(*(range(len(a.values)) for a in axes)):
        values = {a.key: a.values[i] for a, i in zip(axes, index)}
        described = ", ".join(f"{k}={v}" for k, v in values.items())
        for seed in range(seeds):
            try:
                cfg = load_cfg(cfg_file, [*opts, *_grid_overrides(axes, index), "SOLVER.SEED", str(seed)])
                memory_on = bool(cfg.XBM.ENABLE)
                # Memory off: the memory-only keys are dropped, so equal experiments get equal configs.
                run_opts = [*opts, *_grid_overrides(axes, index, memory_on), "SOLVER.SEED", str(seed)]
                if not memory_on:
                    cfg = load_cfg(cfg_file, run_opts)
            except (ConfigError, ValueError) as err:
                raise SweepError(f"combination {described}, seed {seed}: {err}") from None
            named = [
                (a.key, a.raw[i]) for a, i in zip(axes, index)
                if memory_on or not is_memory_only(a.key) or (a.key == SIZE_KEY and a.values[i] == NO_MEMORY)
            ]
            name = folder_name(named, seed)
            if name not in runs:
                runs[name] = Run(name, os.path.join(output, name), run_opts, cfg.SOLVER.MAX_ITERS, cfg)
                named_by[name] = named
            elif named_by[name] != named:  # two values that differ only in characters unsafe in paths
                raise SweepError(f"values {named_by[name]} and {named} give the same folder name {name!r}")
            rows.append(Row(values, seed, runs[name]))
    return Plan(axes, rows, runs)


# ---------------------------------------------------------------------------------------- state on disk
def _saved_config(folder: str) -> dict | None:
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml  # yacs depends on PyYAML

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def check_folder(run: Run) -> list[str]:
    """Differences between the folder's config.yaml and the run's config (empty if none or new)."""
    saved = _saved_config(run.folder)
    if saved is None:
        return []
    import yaml

    return config_differences(saved, yaml.safe_load(run.cfg.dump()))


def is_finished(run: Run) -> bool:
    """The run's metrics.jsonl has an evaluation at iteration == its SOLVER.MAX_ITERS."""
    try:
        return final_metrics(read_metrics(run.folder), run.max_iters) is not None
    except FileNotFoundError:
        return False


def command_of(run: Run, cfg_file: str | None) -> list[str]:
    cmd = [sys.executable, TRAIN_SCRIPT]
    if cfg_file:
        cmd += ["--cfg", cfg_file]
    return [*cmd, "--resume", "auto", *run.opts, "OUTPUT_DIR", run.folder]


def child_environment(jobs: int) -> dict[str, str]:
    """The children's environment: with several at once, threads split so the total fits the cores."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "10")  # a progress line every 10 s, not a log full of them
    if jobs > 1:
        threads = str(threads_per_job(jobs))
        env["OMP_NUM_THREADS"] = threads
        env["MKL_NUM_THREADS"] = threads
    return env


def launch_training(run: Run, command: list[str], env: dict[str, str]) -> int:
    """Run one training to the end as a child process; its console output goes to run.log_path."""
    os.makedirs(run.folder, exist_ok=True)
    with open(run.log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()).returncode


# ---------------------------------------------------------------------------------------- running
def split_finished(plan: Plan) -> tuple[dict[str, tuple[str, str]], list[Run]]:
    """({name: ("skipped", ...)} of the finished runs, the runs still to train), in launch order."""
    outcome: dict[str, tuple[str, str]] = {}
    pending = []
    for run in plan.runs.values():
        if is_finished(run):
            outcome[run.name] = ("skipped", "already finished")
        else:
            pending.append(run)
    return outcome, pending


def announce(plan: Plan, outcome: dict, pending: list[Run], how: str, echo: Callable[[str], None]) -> None:
    shared = len(plan.rows) - len(plan.runs)
    shared_note = f" ({shared} rows without a memory share another row's run)" if shared else ""
    echo(f"{len(plan.rows)} rows (combination x seed), {len(plan.runs)} runs{shared_note}: "
         f"{len(outcome)} already finished, {len(pending)} to train, {how}")


def outcome_of(run: Run, code: int | str, start: float) -> tuple[str, str]:
    """("ran", duration) if the training exited 0 and left its final evaluation, else ("failed", why)."""
    if code != 0:
        return ("failed", f"exit status {code}; see {run.log_path}" if isinstance(code, int) else f"{code}")
    if not is_finished(run):
        return ("failed", f"exited 0 but {run.folder}/metrics.jsonl has no evaluation at iteration "
                          f"{run.max_iters}; see {run.log_path}")
    return ("ran", f"{time.time() - start:.0f} s")


Launcher = Callable[[Run, list, dict], int]


def execute(plan: Plan, cfg_file: str | None, jobs: int = 1, launcher: Launcher = launch_training,
            echo: Callable[[str], None] = print, gpus: Sequence[str] = ()) -> dict[str, tuple[str, str]]:
    """Launch every unfinished run (`jobs` at a time; with `gpus`, each of the `jobs` slots owns
    gpus[slot % len(gpus)] and gives it to its children as CUDA_VISIBLE_DEVICES).
    Returns {run name: (status, detail)}.

    status: "skipped" (already finished), "ran" (finished now) or "failed" (detail says why).
    """
    outcome, pending = split_finished(plan)
    announce(plan, outcome, pending, f"{jobs} at a time", echo)
    env = child_environment(jobs)
    lock = threading.Lock()
    counter = itertools.count(1)
    free_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(jobs):
        free_slots.put(slot)

    def train(run: Run) -> None:
        start = time.time()
        slot = free_slots.get()  # one of `jobs` runs at a time holds each slot
        run_env = dict(env, CUDA_VISIBLE_DEVICES=gpus[slot % len(gpus)]) if gpus else env
        with lock:
            where = f" on GPU {run_env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
            echo(f"[{next(counter)}/{len(pending)}] start {run.name}{where}")
        try:
            code = launcher(run, command_of(run, cfg_file), run_env)
        except OSError as err:  # e.g. the interpreter or the folder cannot be used: this run fails, others go on
            code = f"not started: {err}"
        finally:
            free_slots.put(slot)
        result = outcome_of(run, code, start)
        with lock:
            outcome[run.name] = result
            echo(f"        {run.name}: {result[0]} ({result[1]})")

    if jobs <= 1:
        for run in pending:
            train(run)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(train, run) for run in pending]:
                future.result()
    return outcome


def training_jobs(runs: list[Run], cfg_file: str | None) -> list:
    """One submitit job per run: the command the local launcher runs, its console.log, its environment."""
    from xbm.cluster import TrainingJob

    defaults = {k: v for k, v in child_environment(1).items() if k not in os.environ}
    return [TrainingJob(command_of(run, cfg_file), run.folder, os.getcwd(), defaults, CONSOLE_LOG) for run in runs]


def execute_on_cluster(plan: Plan, cfg_file: str | None, options, folder: str,
                       echo: Callable[[str], None] = print) -> dict[str, tuple[str, str]]:
    """execute() through submitit: every unfinished run one job (one job array on SLURM), then wait
    for them all. Raises ClusterError (nothing submitted) for too many jobs or a refused submission."""
    from xbm.cluster import check_job_count, check_no_active_jobs, make_executor, record_jobs, submit, wait_for

    outcome, pending = split_finished(plan)
    check_job_count(len(pending), options)
    if not pending:
        announce(plan, outcome, pending, "nothing to submit", echo)
        return outcome
    check_no_active_jobs(folder, options.launcher)  # their runs would be trained twice at once
    executor = make_executor(options, folder)
    how = (f"one {options.launcher} job each, {options.nodes} node(s) x {options.tasks_per_node} process(es) "
           f"per run, {options.time_min} min per job")
    announce(plan, outcome, pending, how, echo)
    start = time.time()
    jobs = submit(executor, training_jobs(pending, cfg_file))
    ids = [job.job_id for job in jobs]
    record_jobs(folder, options.launcher, {run.name: job_id for run, job_id in zip(pending, ids)})
    echo(f"submitted job{'s' if len(ids) > 1 else ''} {ids[0]}{f' .. {ids[-1]}' if len(ids) > 1 else ''}; "
         f"submitit logs in {folder}; each run's output in its console.log")
    counter = itertools.count(1)
    by_name = {run.name: run for run in pending}

    def done(name: str, code) -> None:
        outcome[name] = outcome_of(by_name[name], code, start)
        echo(f"[{next(counter)}/{len(pending)}] {name}: {outcome[name][0]} ({outcome[name][1]})")

    try:
        wait_for({run.name: job for run, job in zip(pending, jobs)}, done, 10.0 if options.launcher == "slurm" else 1.0)
    except KeyboardInterrupt:
        echo("\nstopped waiting: the jobs go on (and requeue themselves); when they have ended, run the same "
             "command again to collect the results (finished runs are not submitted again)")
        raise SystemExit(130) from None
    return outcome


# ---------------------------------------------------------------------------------------- results
def result_rows(plan: Plan, outcome: dict[str, tuple[str, str]]) -> list[dict]:
    """One dict per combination and seed: grid values, seed, status, final metrics, folder, log."""
    rows = []
    for row in plan.rows:
        run = row.run
        status, detail = outcome.get(run.name, ("failed", "not run"))
        record = {**row.values, "seed": row.seed, "status": status}
        if status != "failed":
            for task, metrics in final_metrics(read_metrics(run.folder), run.max_iters).items():
                record.update({f"{task}/{name}": value for name, value in metrics.items()})
        record["run_dir"] = run.folder
        record["log"] = run.log_path
        record["detail"] = detail if status == "failed" else ""
        rows.append(record)
    return rows


def metric_columns(rows: list[dict], plan: Plan) -> list[str]:
    fixed = {a.key for a in plan.axes} | {"seed", "status", "run_dir", "log", "detail"}
    return list(dict.fromkeys(k for row in rows for k in row if k not in fixed))


def summary_rows(plan: Plan, rows: list[dict]) -> list[dict]:
    """Per combination: finished seeds, failed seeds, mean and sample std of every metric."""
    metrics = metric_columns(rows, plan)
    keys = [a.key for a in plan.axes]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row[k]) for k in keys), []).append(row)
    summary = []
    for members in groups.values():
        done = [r for r in members if r["status"] != "failed"]
        entry = {k: members[0][k] for k in keys}
        entry["seeds"] = len(done)
        entry["failed"] = len(members) - len(done)
        for name in metrics:
            mean, std = mean_and_std([float(r[name]) for r in done if name in r])
            entry[f"{name} mean"] = mean
            entry[f"{name} std"] = std
        summary.append(entry)
    return summary


def _csv_cell(value):
    if isinstance(value, float) and math.isnan(value):
        return ""
    return _plain(value)


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_cell(row.get(c, "")) for c in columns})


def write_markdown_summary(path: str, summary: list[dict], keys: list[str], metrics: list[str]) -> None:
    """summary.csv as a Markdown table, every metric as "mean +- std" in %, ready for a report."""

    def cell(entry: dict, metric: str) -> str:
        mean, std = entry[f"{metric} mean"], entry[f"{metric} std"]
        if math.isnan(mean):
            return "-"
        return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" +- {100 * std:.1f}")

    columns = [*keys, "seeds", *metrics]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in summary:
        cells = [str(entry[k]) for k in keys] + [str(entry["seeds"])] + [cell(entry, m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def plot_summary(plan: Plan, summary: list[dict], metric: str, path: str) -> str | None:
    """metric mean +- std against the first numeric grid key, one line per other-key values.

    The value 0 of a log axis or of XBM.SIZE is a dashed horizontal line. Without a numeric key,
    or with a single value left to show, the x axis lists the values as categories: points with
    error bars, side by side per other-key values, and no lines (nothing lies between them).

    Returns the path written, or None when no finished run has the metric.
    """
    mean_col, std_col = f"{metric} mean", f"{metric} std"
    points = [s for s in summary if not math.isnan(s.get(mean_col, math.nan))]
    if not points:
        return None
    numeric = [a for a in plan.axes if a.numeric]
    x_axis = numeric[0] if numeric else plan.axes[0]
    others = [a for a in plan.axes if a is not x_axis]
    log_x = x_axis.numeric and spans_decades(x_axis.values)
    # 0 is drawn as a dashed reference line, not as a point: on a log axis it has no place, and
    # XBM.SIZE 0 is another method (no memory), not the end of a range of memory sizes.
    zero_is_reference = log_x or x_axis.key == SIZE_KEY

    def is_reference(value) -> bool:
        return x_axis.numeric and zero_is_reference and float(value) == 0

    shown = [v for v in x_axis.values if not is_reference(v)]
    categorical = not x_axis.numeric or len(shown) == 1
    if categorical:
        log_x = False
        position = lambda v: float(shown.index(v))  # noqa: E731
    else:
        position = float

    figure = new_figure(7.0, 4.5)
    ax = figure.add_subplot(1, 1, 1)
    lines: dict[tuple, list[dict]] = {}
    for s in points:
        lines.setdefault(tuple(repr(s[a.key]) for a in others), []).append(s)
    colors = [f"C{i % 10}" for i in range(len(lines))]
    zero_lines: dict[tuple, list[str]] = {}  # (mean, std) -> colours of the lines that have it
    for index, ((_, members), color) in enumerate(zip(lines.items(), colors)):
        label = ", ".join(f"{a.key}={members[0][a.key]}" for a in others) or metric
        zero = [s for s in members if is_reference(s[x_axis.key])]
        curve = sorted((s for s in members if s not in zero), key=lambda s: position(s[x_axis.key]))
        x = [position(s[x_axis.key]) for s in curve]
        mean = [s[mean_col] for s in curve]
        std = [0.0 if math.isnan(s[std_col]) else s[std_col] for s in curve]
        if curve and categorical:
            side = index - (len(lines) - 1) / 2  # the lines' error bars side by side, not on top
            ax.errorbar([v + 0.1 * side for v in x], mean, yerr=std, fmt="o", capsize=4, color=color, label=label)
        elif curve:
            ax.plot(x, mean, marker="o", color=color, label=label)
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=color, alpha=0.2, linewidth=0)
        for s in zero:
            spread = 0.0 if math.isnan(s[std_col]) else s[std_col]
            zero_lines.setdefault((s[mean_col], spread), []).append(color)
    # The reference lines are grey when every line shares one, as the no-memory runs do.
    zero_name = f"{x_axis.key}=0" + (" (no memory)" if x_axis.key == SIZE_KEY else "")
    for (mean, spread), line_colors in zero_lines.items():
        color = "0.4" if len(zero_lines) == 1 else line_colors[0]
        ax.axhline(mean, color=color, linestyle="--", linewidth=1.2,
                   label=zero_name if len(zero_lines) == 1 else None)
        if spread:
            ax.axhspan(mean - spread, mean + spread, color=color, alpha=0.12, linewidth=0)
    if categorical:
        ax.set_xticks(range(len(shown)), [f"{v:g}" if x_axis.numeric else str(v) for v in shown])
        ax.set_xlim(-0.5, len(shown) - 0.5)
    else:
        ticks = sorted(float(v) for v in shown)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    seeds = max(s["seeds"] for s in points)
    ax.set_xlabel(x_axis.key + (f" (dashed: {zero_name})" if len(zero_lines) > 1 else ""))
    ax.set_ylabel(f"{metric} (mean +- std over {seeds} seed{'s' if seeds > 1 else ''})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)
    return path


def default_metric(columns: list[str]) -> str | None:
    """The first task's R@1 (the headline number of every dataset)."""
    return next((c for c in columns if c.endswith("/R@1")), columns[0] if columns else None)


def plot_name(plan: Plan) -> str:
    numeric = [a for a in plan.axes if a.numeric]
    key = (numeric[0] if numeric else plan.axes[0]).key
    return f"recall_vs_{key.rsplit('.', 1)[-1].lower()}.png"


def report(plan: Plan, outcome: dict, output: str, metric: str | None,
           echo: Callable[[str], None] = print) -> list[dict]:
    """Write results.csv, summary.csv and the plot; return the result rows."""
    os.makedirs(output, exist_ok=True)
    rows = result_rows(plan, outcome)
    metrics = metric_columns(rows, plan)
    keys = [a.key for a in plan.axes]
    write_csv(os.path.join(output, "results.csv"), rows,
              [*keys, "seed", "status", *metrics, "run_dir", "log", "detail"])
    summary = summary_rows(plan, rows)
    write_csv(os.path.join(output, "summary.csv"), summary,
              [*keys, "seeds", "failed", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])
    write_markdown_summary(os.path.join(output, "summary.md"), summary, keys, metrics)
    echo(f"wrote {output}/results.csv, {output}/summary.csv and {output}/summary.md")
    metric = metric or default_metric(metrics)
    if metric is not None:
        if metric not in metrics:
            raise SweepError(f"--metric {metric!r} is not among the results' metrics {metrics}")
        plotted = plot_summary(plan, summary, metric, os.path.join(output, plot_name(plan)))
        if plotted:
            echo(f"wrote {plotted}")
        for s in summary:
            described = " ".join(f"{k}={s[k]}" for k in keys)
            mean, std = s[f"{metric} mean"], s[f"{metric} std"]
            spread = "" if math.isnan(std) else f" +- {100 * std:.2f}"
            value = "failed" if math.isnan(mean) else f"{100 * mean:.2f}{spread}"
            echo(f"  {described:<50} {metric} {value}  ({s['seeds']} seed{'' if s['seeds'] == 1 else 's'})")
    return rows


# ---------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train every combination of --grid values over seeds; write results.csv, summary.csv, "
                    "summary.md and a plot.",
        epilog="Rules: see the top of scripts/sweep.py (XBM.SIZE=0 = no memory; finished runs are skipped).",
    )
    parser.add_argument("--cfg", metavar="FILE", help="YAML experiment file every run starts from")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeat for more keys)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per combination, SOLVER.SEED 0..N-1 (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    parser.add_argument("--gpus", metavar="ID,ID,...", default="",
                        help="GPUs to spread the --jobs slots over, one CUDA_VISIBLE_DEVICES id per slot "
                             "(default: every child sees every GPU)")
    parser.add_argument("--output", default="output/sweep", help="folder of the sweep (default output/sweep)")
    parser.add_argument("--metric", help="metric of the plot, as TASK/NAME (default: the first task's R@1)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands; train nothing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides for every run, e.g. SOLVER.MAX_ITERS 500")
    add_cluster_arguments(parser)
    return parser


def main(argv: list[str] | None = None, launcher: Launcher = launch_training) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.grid:
        parser.error("give at least one --grid KEY=V1,V2,...")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    if any(not g for g in gpus):
        parser.error(f"--gpus takes comma-separated GPU ids such as 0,1,2,3, got {args.gpus!r}")
    on_cluster = args.launcher in CLUSTER_LAUNCHERS
    if on_cluster and (args.gpus or args.jobs != 1):
        parser.error(f"--gpus and --jobs spread runs over this machine; with --launcher {args.launcher} "
                     "every run is a job of its own (set its GPUs with --gpus-per-node)")
    try:
        options = options_from_args(args) if on_cluster else None
        grids = [parse_grid_option(spec) for spec in args.grid]
        plan = plan_sweep(args.cfg, grids, args.seeds, args.opts, args.output)
        for run in plan.runs.values():
            try:
                is_finished(run)
            except ValueError as err:  # a metrics.jsonl the sweep cannot read
                raise SweepError(f"{err}; fix that line or delete the folder") from None
        conflicts = {run.folder: check_folder(run) for run in plan.runs.values()}
        conflicts = {folder: diffs for folder, diffs in conflicts.items() if diffs}
        if conflicts:
            folder, diffs = next(iter(conflicts.items()))
            raise SweepError(
                f"{len(conflicts)} run folder(s) hold a run with another config, e.g. {folder} "
                "(its value -> the sweep's): "
                + "; ".join(diffs) + ". Use another --output or delete those folders."
            )
    except (SweepError, ClusterError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.dry_run:
        for run in plan.runs.values():
            state = "finished" if is_finished(run) else "to train"
            print(f"{run.name} [{state}]\n  {shlex.join(command_of(run, args.cfg))}")
        return 0
    if on_cluster:
        try:
            outcome = execute_on_cluster(plan, args.cfg, options, os.path.join(args.output, SUBMITIT_FOLDER))
        except ClusterError as err:
            parser.exit(2, f"error: {err}\n")
    else:
        outcome = execute(plan, args.cfg, args.jobs, launcher, gpus=gpus)
    try:
        report(plan, outcome, args.output, args.metric)
    except SweepError as err:
        parser.exit(2, f"error: {err}\n")
    failed = [name for name, (status, _) in outcome.items() if status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
