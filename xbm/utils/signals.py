"""The signals that ask a training run to stop, and what DataLoader workers do with them."""
import multiprocessing
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process decides when to stop.

    A worker killed by the terminal's Ctrl-C or by the SIGTERM that SLURM sends to every process
    of a job would make the main process fail ("DataLoader worker exited unexpectedly") before it
    saved its checkpoint. So SIGINT is ignored, and SIGTERM is obeyed only when it comes from the
    main process itself (multiprocessing terminates leftover workers that way when it exits):
    SIGTERM is blocked and a thread reads each one with its sender's pid (sigwaitinfo). Threads
    that already ran before this function (none in a forked worker; possibly some where workers
    are started by spawn or forkserver and import libraries first) keep the default: a SIGTERM
    delivered to one of them still ends the worker, so a worker can never outlive its main process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS/Windows: the default SIGTERM stays
        return
    # The process that started this worker (with the forkserver start method that is not the OS parent).
    creator = multiprocessing.parent_process()
    parents = {os.getppid(), *([creator.pid] if creator is not None else [])}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_obey_sigterm_from, args=(parents,), daemon=True, name="xbm-sigterm").start()


def _obey_sigterm_from(parents: set) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in parents:
            os._exit(128 + signal.SIGTERM)
