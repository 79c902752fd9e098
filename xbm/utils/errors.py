"""How every command line of xbm ends an expected error: one sentence on stderr and an exit status."""
from __future__ import annotations

import re
import sys


def fail(err: BaseException, status: int, debug: bool, message: str | None = None):
    """An expected error: one line on stderr and `status` (the traceback with --debug)."""
    if debug:
        raise err
    if not getattr(err, "reported_by_rank0", False):
        print(f"error: {message or one_sentence(err)}", file=sys.stderr)
    raise SystemExit(status)


def one_sentence(err: BaseException) -> str:
    """The error's own message; for an error re-raised from a DataLoader worker, its last line."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the worker's whole traceback
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last)
    return text.strip() or type(err).__name__
