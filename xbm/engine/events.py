"""The tensorboard writer the hooks share, opened when the first scalar arrives."""
from __future__ import annotations


class TensorboardWriter:
    """`add_scalar` into an event file in `folder`, created at the first scalar (a run that is built but
    never trained leaves none); `folder` None (the ranks but 0) writes nothing."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._writer = None

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self.folder is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported when used: it loads tensorboard

            self._writer = SummaryWriter(self.folder)
        self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
