"""Checkpoint files written atomically and read back with weights_only=True, and the random states in them.
What goes into a checkpoint, and how a run restores from one: xbm/engine/checkpointer.py."""
from __future__ import annotations

import os
import pickle
import random
import tempfile

import numpy as np
import torch


class CheckpointError(ValueError):
    """A file that is not a readable xbm checkpoint (truncated, corrupted, not a checkpoint at all)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permission); the previous file is intact."""


# What every checkpoint the Trainer writes holds; a .pth without them is something else (a bare
# state dict, a backbone's weights).
CHECKPOINT_KEYS = ("iteration", "config", "model")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    A kill in the middle of torch.save leaves the previous file intact: the
    rename is atomic on POSIX file systems. A failed write (a full disk) removes
    the temporary file and raises CheckpointWriteError; `path` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise CheckpointWriteError(_write_failure(path, err)) from err
        raise


def _write_failure(path: str, err: BaseException) -> str:
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "no earlier file is affected"
    return f"could not write checkpoint {path} ({reason}); {kept}"


def load_checkpoint(path: str, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """The dict saved at `path`; `required=CHECKPOINT_KEYS` where a training checkpoint is needed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return read_checkpoint(path, map_location, required)


def read_checkpoint(path: str, map_location="cpu", required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """torch.load(weights_only=True) of a saved dict holding the `required` keys, or a CheckpointError
    naming the file and what is wrong with it (torch's own errors for a text file or a truncated one
    are a bare KeyError or an internal zip error)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises KeyError, EOFError, RuntimeError, UnpicklingError for these
        raise CheckpointError(f"{path} is not a readable checkpoint: {_unreadable_because(path, err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is a PyTorch file but not an xbm checkpoint: it holds a "
                              f"{type(state).__name__}, not a dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is a PyTorch file but not an xbm training checkpoint: it has no "
            f"{', '.join(repr(k) for k in missing)} (its keys: {', '.join(sorted(map(str, state))[:6])})")
    return state


def _unreadable_because(path: str, err: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    refused = _refused_global(err)
    # torch.save writes a zip archive (b"PK"); PyTorch before 1.6 wrote a bare pickle (b"\x80")
    if refused and head.startswith((b"PK", b"\x80")):
        return f"it holds objects that weights_only loading refuses ({refused})"
    if head.startswith(b"PK"):
        return (f"the file is truncated or corrupted ({os.path.getsize(path)} bytes; "
                f"{str(err).splitlines()[0].split('. ')[0]})")
    text = head.decode("utf-8", errors="replace").splitlines()[0][:40]
    return f"it is not a file written by torch.save (it starts with {text!r})"


def _refused_global(err: Exception) -> str | None:
    """The "Unsupported global: ..." line of torch's weights_only refusal, if that is what `err` is."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    lines = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
    return lines[0] if lines else None


def rng_states() -> dict:
    """Every random state a run depends on, in types weights_only loading accepts."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> list[str]:
    """Put back the random states of `rng_states`; returns a note per state it could not restore.

    The states are read as CPU tensors wherever the checkpoint was mapped to: torch's and numpy's
    setters take CPU bytes only, and a checkpoint loaded with map_location="cuda" holds them on
    the GPU. CUDA states are restored for the devices that exist here; the others are skipped
    and named in the returned notes (a run saved on 8 GPUs, resumed where 1 is visible).
    """
    random.setstate(_as_tuples(states["python"]))
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.cpu().numpy(), *rest))
    torch.set_rng_state(states["torch"].cpu())
    saved_cuda = [s.cpu() for s in states.get("cuda", [])]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, state in enumerate(saved_cuda[:visible]):
        torch.cuda.set_rng_state(state, device=index)
    if len(saved_cuda) > visible:
        return [f"the random states of {len(saved_cuda) - visible} of {len(saved_cuda)} saved CUDA devices were "
                f"not restored: {visible} visible here"]
    return []


def _as_tuples(value):
    """random.setstate wants the tuples back that serialisation may have turned into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
