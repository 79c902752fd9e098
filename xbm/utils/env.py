"""Seeding, device selection, and threads per concurrent run."""
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def threads_per_job(jobs: int) -> int:
    """Threads each of `jobs` concurrent runs may use so that together they fill the cores this
    process may run on (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def resolve_device(name: str, key: str = "MODEL.DEVICE") -> torch.device:
    """auto | cpu | cuda | cuda:N (MODEL.DEVICE, or the serving tools' --device: `key` names it in errors)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key} is {name!r} but CUDA is not available here; use auto or cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{key} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{key} is {name!r} but this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; "
                         "choose one of them, or cuda / auto")
    return device
