"""Checkpoints written atomically and read back with weights_only=True."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    A kill in the middle of torch.save leaves the previous file intact: the
    rename is atomic on POSIX file systems.
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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


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
