"""The signals that ask a training run to stop, and what DataLoader workers do with them."""
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process decides when to stop. A worker killed by the
    terminal's Ctrl-C or by SLURM's SIGTERM to every process of the job would make the main
    process fail ("DataLoader worker exited unexpectedly") before it saved its checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
