"""torch.distributed helpers: one process per GPU under torchrun, or one process without it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process it
starts. `init_distributed` turns them into a process group (nccl on CUDA, gloo on CPU) and the
device of this process. Without them (a plain `python tools/train_net.py`) it initialises
nothing, and every helper here keeps its single-process meaning: rank 0 of 1, a gather returns
its input, a broadcast returns its argument.
"""
from __future__ import annotations

import datetime
import io
import os

import torch
import torch.distributed as dist

from .env import resolve_device

# Rank 0 evaluates alone while the other ranks wait in a collective. A full evaluation (SOP:
# 60k test images) can outlast nccl's 10-minute default, so every group gets gloo's 30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

# Whether init_distributed created the process group (then shutdown_distributed destroys it;
# a group the caller created is the caller's to destroy).
_created_group = False


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that writes logs, metrics and checkpoints."""
    return get_rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from err


def _rank_device(device_name: str) -> torch.device:
    """MODEL.DEVICE in a distributed run: cpu, or the GPU cuda:LOCAL_RANK of this process."""
    device = resolve_device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(
            f"MODEL.DEVICE {device_name!r} names one GPU, but a distributed run has one process per GPU: "
            "set MODEL.DEVICE cuda (or auto) and each process takes cuda:LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    fallback = dist.get_rank() % count if dist.is_initialized() else 0
    local_rank = _env_int("LOCAL_RANK", fallback)
    if not 0 <= local_rank < count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but this node sees {count} GPU(s): "
            "--nproc_per_node must not exceed the number of GPUs of a node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str = "auto") -> torch.device:
    """The device of this process, after joining torchrun's process group if there is one.

    Idempotent: a group that is already initialised (a second Trainer, or a caller's own
    init_process_group) is used as it is. With WORLD_SIZE unset or 1 nothing is initialised
    and the device is MODEL.DEVICE as in a single-process run.
    """
    global _created_group
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return resolve_device(device_name)
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE is {world_size} but this PyTorch build has no torch.distributed")
    device = _rank_device(device_name)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        _created_group = True
    return device


def shutdown_distributed() -> None:
    """Destroy the process group init_distributed created; a no-op otherwise (single process too)."""
    global _created_group
    if _created_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_group = False


# ---------------------------------------------------------------------------------- collectives
def all_gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, rank 0 first (no gradient).

    All ranks must pass the same shape (the sampler gives every rank DATA.BATCH_SIZE rows);
    every rank receives the same bytes, which is what keeps the ranks' memories identical.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward hands each rank the gradient of ITS rows summed over ranks.

    Rank r's loss depends on every rank's rows, so the gradient reaching rank r's rows is the
    sum over ranks of d loss_k / d rows_r: an all_reduce of the whole gradient, then a slice
    (a reduce-scatter, written with all_reduce because gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        ctx.rank = dist.get_rank()
        return all_gather_batch(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather_batch through which gradients flow back to every rank's own rows.

    With DDP averaging parameter gradients over ranks, a loss of this rank's anchors against
    the gathered batch, divided by the local batch size, yields exactly the gradient of the
    same loss on the concatenated global batch in one process.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (a new tensor; the input is kept)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def agree_on_step(finite: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(whether the 0-dim bool `finite` is True on every rank, whether any rank asked to stop): the
    trainer's one collective per step, one all_reduce (MIN) of two numbers, [finite, not stop]; the
    step's host synchronisation in one process."""
    if not is_distributed():
        return bool(finite), bool(stop_requested)
    values = torch.stack([finite.detach().reshape(()).to(torch.int32),
                          torch.tensor(0 if stop_requested else 1, dtype=torch.int32, device=finite.device)])
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    all_finite, none_stops = values.tolist()
    return bool(all_finite), not none_stops


def _to_bytes(obj) -> bytes:
    # torch.save rather than plain pickling: torch.distributed's object collectives fail to
    # unpickle tensors (the random states hold some), while bytes always travel.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj`, on every rank: containers of tensors, numbers, strings and None."""
    if not is_distributed():
        return obj
    box = [_to_bytes(obj) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return _from_bytes(box[0])


def broadcast_rows(rows: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor `rows` (of `shape` and `dtype`; None on the other ranks) on every rank, on
    `device` (a CUDA device under NCCL)."""
    if not is_distributed():
        return rows.to(device, dtype)
    buffer = rows.to(device, dtype).contiguous() if dist.get_rank() == src else torch.empty(shape, dtype=dtype,
                                                                                           device=device)
    dist.broadcast(buffer, src=src)
    return buffer


def all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (the types broadcast_object takes)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _to_bytes(obj))
    return [_from_bytes(data) for data in gathered]
