"""Training runs as submitit jobs: on SLURM (`--launcher slurm`) or as local subprocesses
(`--launcher submitit-local`, submitit's LocalExecutor: the same submission path, no scheduler).

A job runs one training, `tools/train_net.py ... --resume auto ... OUTPUT_DIR <folder>`, as a child
process of submitit's task (its console output appended to <folder>/console.log, as the local
sweep does), once per task: a run of N nodes x G GPUs is N x G tasks, one process per GPU, each
child given the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) from submitit's JobEnvironment, so xbm's init_distributed and DDP work
as they do under torchrun.

Preemption and time limits: SLURM sends submitit's signal (SIGUSR2, --signal=USR2@<delay>) before
the time limit, and at preemption where the cluster sets preempt_send_user_signal. submitit then
calls TrainingJob.checkpoint on the first task, which drives the run's own stop path: SIGTERM to
the training (it finishes its step, saves checkpoints/last.pth on rank 0 and exits 75; under DDP
every rank stops at the same step), then hands submitit the same job to requeue. The requeued job
starts the same command, whose `--resume auto` continues from that checkpoint. The children ignore
SIGUSR2 (SLURM signals every process of the job): only submitit's handler acts on it. A SIGTERM
that SLURM sends the whole job (a preemption without the user signal) reaches the training
directly: it saves and exits 75, and a job requeued by SLURM resumes the same way.

submitit is imported only here, when a cluster launcher is used (pip install -e ".[cluster]").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

LAUNCHERS = ("local", "slurm", "submitit-local")
CLUSTER_LAUNCHERS = ("slurm", "submitit-local")
# A sweep larger than this asks for --yes (a typo in a grid can queue hundreds of GPU jobs).
DEFAULT_MAX_JOBS = 50
# Seconds before the time limit at which SLURM signals the job: one training step plus a
# checkpoint write must fit (SOP: a step is under a second, the checkpoint a few seconds).
DEFAULT_SIGNAL_DELAY_S = 120
# Requeues after a time limit before submitit gives up (preemptions do not count).
DEFAULT_MAX_TIMEOUTS = 20
# sbatch options submitit and this launcher set themselves: changing them would break the job
# array, the logs or the save-and-requeue signal.
SUBMITIT_OWN_FLAGS = {
    "array": "the launcher makes the job array itself (--array-parallelism caps it)",
    "signal": "submitit's signal drives the save and requeue (set its timing with --signal-delay)",
    "output": "submitit writes the logs into its folder", "error": "submitit writes the logs into its folder",
    "open-mode": "submitit appends to its logs",
    "ntasks-per-node": "one process per GPU: set --gpus-per-node", "ntasks": "one process per GPU: set --gpus-per-node",
    "nodes": "use --nodes", "partition": "use --partition", "time": "use --time",
}
JOBS_FILE = "jobs.json"  # in the submitit folder: the job id of each run of the last submission
BASE_PORT, PORT_RANGE = 29500, 10000  # MASTER_PORT = BASE_PORT + job id mod PORT_RANGE


class ClusterError(ValueError):
    """Cluster options or a submission that cannot go ahead; nothing has been submitted."""


# ------------------------------------------------------------------------------ options
@dataclass
class ClusterOptions:
    """What a user sets for their cluster (see README, On a cluster)."""

    launcher: str = "slurm"
    partition: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    time_min: int = 240
    cpus_per_gpu: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH flags, name -> value (True: bare)
    array_parallelism: int | None = None
    max_jobs: int = DEFAULT_MAX_JOBS
    yes: bool = False
    job_name: str = "xbm"
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S
    max_timeouts: int = DEFAULT_MAX_TIMEOUTS

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU, as torchrun --nproc_per_node; one process for a CPU run."""
        return max(1, self.gpus_per_node)


def parse_time(text: str) -> int:
    """A SLURM time limit (MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes (seconds round up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ClusterError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS (e.g. 240 or 1-00:00:00)")
    days, first, second, third = match.groups()
    if days is None and third is None and second is None:
        minutes, seconds = int(first), 0  # MM
    elif days is None and third is None:
        minutes, seconds = int(first), int(second)  # MM:SS, as sbatch reads two fields
    else:
        hours = int(first)
        minutes = int(second or 0) + 60 * (hours + 24 * int(days or 0))
        seconds = int(third or 0)
    total = minutes + (1 if seconds else 0)
    if total < 1:
        raise ClusterError(f"--time {text!r}: the time limit must be at least one minute")
    return total


def parse_sbatch_flag(text: str) -> tuple[str, Any]:
    """'mail-type=END' or '--exclusive' -> ('mail-type', 'END') / ('exclusive', True)."""
    name, sep, value = text.strip().lstrip("-").partition("=")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or (sep and not value):
        raise ClusterError(f"--sbatch {text!r}: expected an sbatch option as NAME=VALUE or NAME (e.g. mail-type=END)")
    own = SUBMITIT_OWN_FLAGS.get(name.replace("_", "-"))
    if own:
        raise ClusterError(f"--sbatch {text!r}: {own}")
    return name, (value if sep else True)


def add_cluster_arguments(parser: argparse.ArgumentParser, launchers: Sequence[str] = LAUNCHERS,
                          default: str = "local") -> None:
    group = parser.add_argument_group("cluster (--launcher slurm / submitit-local, through submitit)")
    group.add_argument("--launcher", choices=launchers, default=default,
                       help=f"where runs train (default {default}): slurm submits SLURM jobs (a job array for "
                            "several), submitit-local runs the same jobs as local subprocesses")
    group.add_argument("--partition", help="SLURM partition (sbatch --partition)")
    group.add_argument("--gpus-per-node", type=int, default=1,
                       help="GPUs of each run on each node, one process each, as torchrun (default 1; 0: CPU)")
    group.add_argument("--nodes", type=int, default=1, help="nodes of each run (default 1)")
    group.add_argument("--time", default="4:00:00",
                       help="time limit of each job, MM or [D-]HH:MM:SS (default 4:00:00); a run that needs "
                            "longer is requeued and resumes")
    group.add_argument("--cpus-per-gpu", type=int, help="CPU cores per process (sbatch --cpus-per-task)")
    group.add_argument("--account", help="sbatch --account")
    group.add_argument("--qos", help="sbatch --qos")
    group.add_argument("--constraint", help="sbatch --constraint (e.g. a100)")
    group.add_argument("--sbatch", action="append", default=[], metavar="NAME[=VALUE]",
                       help="any other sbatch option, repeatable: --sbatch mem=64G --sbatch exclusive")
    group.add_argument("--array-parallelism", type=int,
                       help="most array jobs running at once (sbatch --array=...%%N; default all)")
    group.add_argument("--max-jobs", type=int, default=DEFAULT_MAX_JOBS,
                       help=f"submit more jobs than this only with --yes (default {DEFAULT_MAX_JOBS})")
    group.add_argument("--yes", action="store_true", help="submit however many jobs the grid gives")
    group.add_argument("--job-name", default="xbm", help="SLURM job name (default xbm)")
    group.add_argument("--signal-delay", type=int, default=DEFAULT_SIGNAL_DELAY_S, metavar="SECONDS",
                       help="how long before the time limit the job is told to save and requeue "
                            f"(default {DEFAULT_SIGNAL_DELAY_S})")
    group.add_argument("--max-timeouts", type=int, default=DEFAULT_MAX_TIMEOUTS,
                       help=f"requeues after a time limit before giving up (default {DEFAULT_MAX_TIMEOUTS})")


def options_from_args(args: argparse.Namespace) -> ClusterOptions:
    """ClusterOptions from add_cluster_arguments' options, or a ClusterError naming the bad one."""
    for name in ("nodes", "max_jobs", "max_timeouts", "signal_delay"):
        if getattr(args, name) < (0 if name in ("max_timeouts", "signal_delay") else 1):
            raise ClusterError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gpus_per_node < 0:
        raise ClusterError(f"--gpus-per-node must be 0 or more, got {args.gpus_per_node}")
    for name in ("cpus_per_gpu", "array_parallelism"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ClusterError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    time_min = parse_time(args.time)
    if args.signal_delay >= 60 * time_min:
        raise ClusterError(f"--signal-delay {args.signal_delay} s does not fit in --time {args.time}")
    return ClusterOptions(
        launcher=args.launcher, partition=args.partition, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
        time_min=time_min, cpus_per_gpu=args.cpus_per_gpu, account=args.account, qos=args.qos,
        constraint=args.constraint, sbatch=dict(parse_sbatch_flag(f) for f in args.sbatch),
        array_parallelism=args.array_parallelism, max_jobs=args.max_jobs, yes=args.yes, job_name=args.job_name,
        signal_delay_s=args.signal_delay, max_timeouts=args.max_timeouts)


def check_job_count(count: int, options: ClusterOptions) -> None:
    if count > options.max_jobs and not options.yes:
        raise ClusterError(f"this would submit {count} jobs, more than --max-jobs {options.max_jobs}: "
                           "check the grid, then add --yes (or raise --max-jobs) to submit them")


# ------------------------------------------------------------------------------ the executor
def _submitit():
    try:
        import submitit
    except ImportError:
        raise ClusterError(f"--launcher needs submitit, which is not installed: "
                           "pip install -e \".[cluster]\" (or pip install submitit)") from None
    return submitit


def make_executor(options: ClusterOptions, folder: str):
    """submitit's SlurmExecutor or LocalExecutor with the run's resources; logs go to `folder`."""
    submitit = _submitit()
    if options.launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise ClusterError(f"--launcher slurm needs SLURM's {' and '.join(missing)} on the PATH and there is "
                               "none here: run this on the cluster's login node, or use --launcher local")
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_timeouts)
        params = dict(job_name=options.job_name, time=options.time_min, nodes=options.nodes,
                      ntasks_per_node=options.tasks_per_node, signal_delay_s=options.signal_delay_s)
        optional = dict(partition=options.partition, account=options.account, qos=options.qos,
                        constraint=options.constraint, cpus_per_task=options.cpus_per_gpu,
                        gpus_per_node=options.gpus_per_node or None, array_parallelism=options.array_parallelism)
        params.update({k: v for k, v in optional.items() if v is not None})
        if options.sbatch:
            params["additional_parameters"] = dict(options.sbatch)
        executor.update_parameters(**params)
    elif options.launcher == "submitit-local":
        if options.nodes != 1:
            raise ClusterError("--launcher submitit-local runs on this machine only: "
                               f"--nodes must be 1, got {options.nodes}")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.max_timeouts)
        executor.update_parameters(timeout_min=options.time_min, tasks_per_node=options.tasks_per_node,
                                   gpus_per_node=options.gpus_per_node, signal_delay_s=options.signal_delay_s)
    else:
        raise ClusterError(f"--launcher {options.launcher!r} does not submit jobs; choose one of {CLUSTER_LAUNCHERS}")
    return executor


def sbatch_message(err: BaseException) -> str:
    """sbatch's own error lines as one line ('sbatch: error: ' prefixes dropped)."""
    text = str(err) or (getattr(err.__cause__, "stderr", None) or "")
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [re.sub(r"^(sbatch: )?error: ", "", line.strip()) for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def submit(executor, jobs: Sequence["TrainingJob"]) -> list:
    """All jobs in one submission (one sbatch job array on SLURM); a refusal submits nothing."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        # submitit prints sbatch's stderr as well as raising it: the error below says it once, in one line
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.submit_array(list(jobs)) if len(jobs) > 1 else [executor.submit(jobs[0])]
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError, OSError) as err:
        raise ClusterError(f"sbatch refused the submission, so nothing was submitted: {sbatch_message(err)}") from None


def record_jobs(folder: str, launcher: str, job_ids: dict[str, str]) -> None:
    """Remember the job of each run (folder/jobs.json), so a second submission can see them."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, JOBS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"launcher": launcher, "jobs": job_ids}, handle, indent=1)
    os.replace(path + ".tmp", path)


def active_jobs(folder: str) -> list[str]:
    """The jobs of the last submission recorded in `folder` that are still queued or running."""
    try:
        with open(os.path.join(folder, JOBS_FILE), encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return []
    ids = list(dict.fromkeys(str(i).split("_")[0] for i in recorded.get("jobs", {}).values()))
    if recorded.get("launcher") == "slurm":
        if shutil.which("squeue") is None:
            return []
        # squeue lists a job (or an array's queued and running tasks) until it ends; an ended one
        # is no longer listed, or squeue says the id is invalid
        active = []
        for job_id in ids:
            listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True)
            if listed.returncode == 0 and listed.stdout.strip():
                active.append(job_id)
        return active
    return [pid for pid in ids if _local_controller_alive(pid)]  # submitit-local: the job id is its pid


def _local_controller_alive(pid: str) -> bool:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            return b"submitit.local._local" in handle.read()
    except (OSError, ValueError):
        return False


def check_no_active_jobs(folder: str, launcher: str) -> None:
    busy = active_jobs(folder)
    if busy:
        cancel = f"scancel {' '.join(busy)}" if launcher == "slurm" else f"kill {' '.join(busy)}"
        raise ClusterError(
            f"job(s) {', '.join(busy)} of the last submission from here ({os.path.join(folder, JOBS_FILE)}) are still "
            f"queued or running: wait for them to end and run this again to collect the results, or cancel them "
            f"({cancel}) first")


def job_result(job) -> int | str:
    """The training's exit status (rank 0's), or a one-line reason why the job gave none."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except (FailedJobError, UncompletedJobError) as err:
        last = [line for line in str(err).splitlines() if line.strip()]
        return f"job {job.job_id} failed: {last[-1] if last else type(err).__name__}; see {job.paths.stderr}"


def wait_for(jobs: dict[str, Any], on_done: Callable[[str, int | str], None], poll_s: float) -> None:
    """Call on_done(name, result) as each job ends (jobs: {name: submitit job})."""
    names = {id(job): name for name, job in jobs.items()}
    from submitit.helpers import as_completed

    for job in as_completed(list(jobs.values()), poll_frequency=poll_s):
        on_done(names[id(job)], job_result(job))


# ------------------------------------------------------------------------------ inside the job
def master_port(job_id: str) -> int:
    """The same port on every task of a job, and different ports for most jobs sharing a node."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return BASE_PORT + int(digits) % PORT_RANGE


def distributed_environment(job_env) -> dict[str, str]:
    """torchrun's variables for this task of a multi-task job (none for a single task)."""
    if job_env.num_tasks <= 1:
        return {}
    hosts = list(job_env.hostnames)
    master = "127.0.0.1" if job_env.num_nodes == 1 else hosts[0]
    return {
        "RANK": str(job_env.global_rank), "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(job_env.num_tasks), "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        "GROUP_RANK": str(job_env.node), "MASTER_ADDR": master, "MASTER_PORT": str(master_port(job_env.raw_job_id)),
    }


def _ignore_submitit_signal() -> None:
    """In the training child: SLURM sends submitit's signal to every process of the job; only
    submitit's handler in the task acts on it (an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _wait_without_reaping(pid: int) -> None:
    """Block until child `pid` has exited, leaving its status for Popen (a signal handler must not
    call Popen.wait: the interrupted main thread may hold Popen's lock)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # already reaped
        pass


class TrainingJob:
    """The callable a submitit job runs: one training as a child process; checkpointable."""

    def __init__(self, command: list[str], folder: str, cwd: str, env: dict[str, str] | None = None,
                 log_name: str = "console.log"):
        self.command, self.folder, self.cwd = list(command), folder, cwd
        self.env, self.log_name = dict(env or {}), log_name
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._child = None

    def log_path(self, rank: int) -> str:
        folder = os.path.join(self.cwd, self.folder)
        name = self.log_name if rank == 0 else self.log_name.replace(".log", f".rank{rank}.log")
        return os.path.join(folder, name)

    def __call__(self) -> int:
        import submitit

        job_env = submitit.JobEnvironment()
        env = {**os.environ, **self.env, **distributed_environment(job_env)}
        path = self.log_path(job_env.global_rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(self.command)}   # submitit job {job_env.job_id}, task "
                      f"{job_env.global_rank} of {job_env.num_tasks}, {socket.gethostname()}\n")
            log.flush()
            self._child = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                           preexec_fn=_ignore_submitit_signal)
            # poll, not wait: checkpoint() runs in a signal handler on this thread and waits itself
            while self._child.poll() is None:
                time.sleep(0.5)
        return self._child.returncode

    def checkpoint(self) -> Any:
        """submitit's hook at a time limit or preemption: stop the training through its own SIGTERM
        path (it saves and exits 75), then requeue the same command (it resumes)."""
        from submitit.helpers import DelayedSubmission

        child = self._child
        if child is not None and child.returncode is None:
            print(f"submitit signal: stopping the training (pid {child.pid}) so it saves a checkpoint",
                  file=sys.stderr, flush=True)
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _wait_without_reaping(child.pid)
        return DelayedSubmission(TrainingJob(self.command, self.folder, self.cwd, self.env, self.log_name))
