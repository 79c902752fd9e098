"""Runs that keep their work: one run per OUTPUT_DIR, no silent overwrite, a clean stop on a signal.

* `claim_output_dir` (rank 0 of a run, before anything is written): OUTPUT_DIR must be a writable
  folder; a lock file `run.lock` in it (pid, host, start time, command) keeps a second run out; a
  lock whose process is gone (same host) is taken over with a warning; a folder holding checkpoints
  is refused unless the run resumes, or `--overwrite` moves the earlier run aside.
* `StopSignals` (the command line's training): the first SIGINT or SIGTERM only sets a flag; the
  Trainer checks it before each step (under DDP the flag rides in the step's one all-reduce, so
  every rank stops at the same iteration), saves a checkpoint and raises `TrainingStopped`. A
  second signal exits at once with status 128 + signal number, saving nothing more.

Exit statuses of xbm-train: 0 finished; 1 a failure during training; 2 bad input found before
training (config, data, OUTPUT_DIR, checkpoint); EXIT_STOPPED (75, EX_TEMPFAIL of sysexits.h,
"try again later") stopped by SIGINT/SIGTERM after saving a checkpoint: resume to continue;
128 + N a second signal N (130 for Ctrl-C) ended the run without a new checkpoint.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time

from ..utils.signals import STOP_SIGNALS

logger = logging.getLogger("xbm")

EXIT_STOPPED = 75
LOCK_NAME = "run.lock"
# A launcher that gets a signal forwards it to its workers (torchrun does, and a terminal's Ctrl-C
# reaches them too): a repeat this soon after the first is the same request, not a second one.
REPEAT_WINDOW_S = 1.0


class RunGuardError(ValueError):
    """An OUTPUT_DIR a run may not start in (in use, holding a run, not writable)."""


class TrainingStopped(Exception):
    """Training stopped on a signal after saving its checkpoint at `iteration`."""

    def __init__(self, iteration: int, checkpoint: str, signal_name: str):
        super().__init__(f"stopped by {signal_name} at iteration {iteration}; checkpoint {checkpoint}")
        self.iteration, self.checkpoint, self.signal_name = iteration, checkpoint, signal_name


# ------------------------------------------------------------------------------ OUTPUT_DIR
def ensure_writable_dir(path: str) -> None:
    """Create OUTPUT_DIR, or a RunGuardError saying why it cannot be a run's folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunGuardError(f"OUTPUT_DIR {path} is a file, not a folder: choose another OUTPUT_DIR")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise RunGuardError(f"cannot create OUTPUT_DIR {path} ({err.strerror}): choose another OUTPUT_DIR") from None


def checkpoints_in(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "checkpoints", "*.pth")))


def refuse_or_move_earlier_run(output_dir: str, resuming: bool, overwrite: bool) -> str | None:
    """Refuse a fresh start over checkpoints; with `overwrite`, move the earlier run's files into a
    sibling folder OUTPUT_DIR.old-<time> (returned). The lock file stays."""
    if resuming and overwrite:
        raise RunGuardError("--resume continues the run in OUTPUT_DIR and --overwrite moves it aside: give one of them")
    if resuming:
        return None
    checkpoints = checkpoints_in(output_dir)
    if not overwrite:
        if checkpoints:
            newest = max(checkpoints, key=os.path.getmtime)
            written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(newest)))
            raise RunGuardError(
                f"OUTPUT_DIR {output_dir} holds the checkpoints of an earlier run ({newest}, written {written}): "
                "continue it with --resume, start over with --overwrite (the earlier run is moved to "
                f"{output_dir.rstrip(os.sep)}.old-<time>), or choose another OUTPUT_DIR")
        return None
    entries = [e for e in os.listdir(output_dir) if e != LOCK_NAME and not e.startswith(LOCK_NAME + ".")]
    if not entries:
        return None
    target = _free_name(f"{os.path.abspath(output_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(target)
    for entry in entries:
        shutil.move(os.path.join(output_dir, entry), os.path.join(target, entry))
    return target


def _free_name(stem: str) -> str:
    name, number = stem, 1
    while os.path.exists(name):
        number += 1
        name = f"{stem}-{number}"
    return name


# ------------------------------------------------------------------------------ the lock file
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:  # a zombie (dead, not yet reaped by its parent) still answers kill 0
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """OUTPUT_DIR/run.lock: {"pid", "host", "started", "command"} of the run using the folder."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.owned = False

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(sys.argv)}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise RunGuardError(
                f"cannot write into OUTPUT_DIR {os.path.dirname(self.path)} ({err.strerror}): "
                "choose a folder this user may write to") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self._mine(), f)
        return True

    def _read(self, path: str | None = None) -> dict | None:
        for attempt in range(2):  # a lock being created may be empty for a moment
            try:
                with open(path or self.path) as f:
                    holder = json.load(f)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        return None

    def acquire(self) -> None:
        host = socket.gethostname()
        for attempt in range(5):
            if self._create():
                self.owned = True
                return
            holder = self._read()
            if holder == {}:
                continue  # released in between: try again
            if holder is None:
                raise RunGuardError(f"{self.path} is not a lock file of xbm: delete it if no run uses this folder")
            if holder["pid"] == os.getpid() and holder.get("host") == host:
                return  # this process already holds it (a second run in one Python session)
            where = "this host" if holder.get("host") == host else f"host {holder.get('host')}"
            if holder.get("host") != host or _process_alive(holder["pid"]):
                raise RunGuardError(
                    f"OUTPUT_DIR {os.path.dirname(self.path)} is in use by another run (pid {holder['pid']} on {where}, "
                    f"started {holder.get('started')}; lock file {self.path}): wait for it to end, choose another "
                    "OUTPUT_DIR, or delete the lock file if that run is dead")
            if self._take_over(holder):
                logger.warning(f"took over the lock {self.path} of run pid {holder['pid']} (started "
                               f"{holder.get('started')}), which is no longer running")
        raise RunGuardError(f"could not take the lock {self.path}: other runs keep starting in this OUTPUT_DIR")

    def _take_over(self, stale: dict) -> bool:
        """Remove a dead run's lock, unless another run replaced it in between (then put that one back)."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if self._read(aside) == stale:
            os.remove(aside)
            return True
        try:
            os.link(aside, self.path)  # a live run's fresh lock: restore it
        finally:
            os.remove(aside)
        return False

    def release(self) -> None:
        if self.owned and (self._read() or {}).get("pid") == os.getpid():
            os.remove(self.path)
        self.owned = False


def claim_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> RunLock:
    """Everything a run's rank 0 checks before it writes: the folder, the lock, an earlier run."""
    ensure_writable_dir(output_dir)
    lock = RunLock(output_dir)
    lock.acquire()
    try:
        moved = refuse_or_move_earlier_run(output_dir, resuming, overwrite)
    except BaseException:
        lock.release()
        raise
    if moved:
        logger.warning(f"--overwrite: moved the earlier run's files from {output_dir} to {moved} "
                       "(nothing was deleted; remove it when no longer needed)")
    return lock


# ------------------------------------------------------------------------------ signals
class StopSignals:
    """While active, SIGINT and SIGTERM ask the training to stop after the current step."""

    SIGNALS = STOP_SIGNALS
    _requested: int | None = None
    _first_at = 0.0

    def __enter__(self):
        type(self)._requested = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python only lets it set handlers
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        type(self)._requested = None

    @classmethod
    def _handle(cls, signum, frame) -> None:
        now = time.monotonic()
        if cls._requested is None:
            cls._requested, cls._first_at = signum, now
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                  "(Ctrl-C again quits at once without saving)", file=sys.stderr, flush=True)
        elif now - cls._first_at > REPEAT_WINDOW_S:
            print(f"\n{signal.Signals(signum).name} again: quitting without saving "
                  "(the last checkpoint on disk is intact)", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

    @classmethod
    def requested(cls) -> str | None:
        """The name of the signal that asked for a stop in this process, if any."""
        return signal.Signals(cls._requested).name if cls._requested is not None else None


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same one, without --overwrite/--resume, plus --resume."""
    args, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--overwrite" or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = nxt is not None and not nxt.startswith("--") and not looks_like_config_key(nxt)
            continue
        args.append(arg)
    program = sys.argv[0] if sys.argv and sys.argv[0] else "xbm-train"
    if program.endswith(".py"):
        python = "python" if shutil.which("python") and os.path.realpath(shutil.which("python")) == \
            os.path.realpath(sys.executable) else sys.executable
        prefix = [python, program]
    else:
        name = os.path.basename(program)
        prefix = [name if shutil.which(name) and os.path.realpath(shutil.which(name)) == os.path.realpath(program)
                  else program]
    command = shlex.join([*prefix, *args, "--resume"])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # the worker cannot see torchrun's own options
        command = "torchrun <the same torchrun options> " + command.split(" ", 1)[1]
    return command


def looks_like_config_key(token: str) -> bool:
    """A config override key (XBM.SIZE, OUTPUT_DIR), as opposed to a checkpoint path."""
    return token.replace("_", "").replace(".", "").isalnum() and token.upper() == token and not token[0].isdigit() \
        and not os.path.exists(token)


def claim_for_all_ranks(output_dir: str, device_name: str, resuming: bool, overwrite: bool) -> RunLock | None:
    """claim_output_dir on rank 0 only (under torchrun), its verdict broadcast so all ranks stop together."""
    from ..utils.distributed import broadcast_object, init_distributed, is_main_process

    init_distributed(device_name)  # the Trainer joins the same group (init_distributed is idempotent)
    lock, problem = None, None
    if is_main_process():
        try:
            lock = claim_output_dir(output_dir, resuming, overwrite)
        except (RunGuardError, OSError) as err:
            problem = str(err)
    problem = broadcast_object(problem)
    if problem:
        err = RunGuardError(problem)
        err.reported_by_rank0 = not is_main_process()  # one message for the whole job
        raise err
    return lock
