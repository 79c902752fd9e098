"""Steps with a non-finite loss are taken back whole, as GradScaler skips a step whose gradients
overflow; SOLVER.MAX_NONFINITE_STEPS of them in a row stop the run."""
from __future__ import annotations

import logging

import torch

from ..objective import CrossBatchObjective, ObjectiveUndoPoint


class NonFiniteLossError(FloatingPointError):
    """The loss stayed NaN or infinite for SOLVER.MAX_NONFINITE_STEPS steps in a row; the run
    stops, and none of those steps changed any weight."""


@torch.no_grad()
def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]) for all i, in a few fused kernels where torch has them."""
    if not targets:  # a model without buffers (a ViT has no BatchNorm); _foreach_copy_ refuses empty lists
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)


class NonFiniteGuard:
    """Remembers what a step changes before its loss is known to be finite (the model's buffers:
    BatchNorm statistics see the forward pass; the memory rows; the adapter's filters) and puts it
    back when the loss is not, so that a skipped step leaves no trace but the counters."""

    def __init__(self, model: torch.nn.Module, objective: CrossBatchObjective, max_in_a_row: int,
                 logger: logging.Logger, world_size: int, checkpoint_path: str | None):
        self.model, self.objective = model, objective
        self.max_in_a_row = max_in_a_row
        self.logger, self.world_size, self.checkpoint_path = logger, world_size, checkpoint_path
        self.skipped_steps = 0  # in all (saved in checkpoints)
        self.streak = 0  # in a row, up to now
        self._buffer_backup = None
        self._objective_point: ObjectiveUndoPoint | None = None

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def before_step(self, global_batch: int) -> None:
        buffers = list(self.model.buffers())
        if self._buffer_backup is None:
            self._buffer_backup = [torch.empty_like(b) for b in buffers]
        copy_all(self._buffer_backup, buffers)
        self._objective_point = self.objective.undo_point(global_batch)

    def step_was_finite(self) -> None:
        self.streak = 0

    def skip(self, iteration: int) -> None:
        """Take the step back; raise NonFiniteLossError after `max_in_a_row` in a row."""
        copy_all(list(self.model.buffers()), self._buffer_backup)
        self.objective.restore_(self._objective_point)
        self.skipped_steps += 1
        self.streak += 1
        where = "" if self.world_size == 1 else f" on at least one of {self.world_size} ranks"
        self.logger.warning(f"iteration {iteration}: non-finite loss or embeddings{where}; step skipped "
                            f"({self.streak} in a row, {self.skipped_steps} in all; the run stops at "
                            f"{self.max_in_a_row} in a row)")
        if self.streak >= self.max_in_a_row:
            first = iteration - self.streak + 1
            last_good = (f"The last good checkpoint is {self.checkpoint_path} (if one was saved)"
                         if self.checkpoint_path else "A checkpoint saved before them holds the last good state")
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.streak} steps in a row (iterations {first} to "
                f"{iteration}); training stopped, and none of those steps changed any weight. {last_good}; "
                "lower SOLVER.BASE_LR, set SOLVER.GRAD_CLIP or SOLVER.AMP bf16/none, and resume from it.")
