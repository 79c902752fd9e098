"""One Checkpointer: named checkpointables and every hook's state in one layout (written atomically, read
with weights_only=True), and every older layout read as this one.

Layout 2 (`"layout": 2`), a dict of:
  iteration, config (YAML), world_size      what the run is; xbm-eval and the serving tools read these
  model, optimizer, scheduler, scaler,      each checkpointable's own state_dict() under its name
  objective, guard[, plateau][, key_encoder] (objective: the memory's buffers as memory.*, the adapter's
                                            filter in its extra state; guard: the skipped-step count;
                                            key_encoder: XBM.KEY_MOMENTUM's moving-average weights)
  hooks: {name: state}                      each hook with state under its name (its class name, or its
                                            `checkpoint_name`)
  rng[, rng_per_rank]                       the random states (every rank's under torch.distributed)

The flat layout it replaces (xbm 0.1 and later, no "layout" key) kept "memory" and "adapter" apart,
"skipped_steps" and "plateau" beside them, and merged hook state into the top level ("drift",
"best_metric", "best_on_test", and whatever a user's hook returned); `upgrade_layout` reads it as layout 2.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..utils.distributed import all_gather_object
from ..checkpoint.io import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, restore_rng_states, rng_states, save_checkpoint

LAYOUT = 2
# The flat layout's entries that upgrade_layout places; any other top-level entry was a user hook's.
_FLAT_KEYS = {"iteration", "config", "model", "optimizer", "scheduler", "scaler", "rng", "rng_per_rank", "world_size",
              "memory", "adapter", "skipped_steps", "plateau", "drift", "best_metric", "best_on_test"}
FLAT_HOOK_STATE = "flat_hook_state"  # those other entries, for a hook that finds no state under its name


def hook_name(hook) -> str:
    """The name a hook's state is saved under: its `checkpoint_name`, else its class name."""
    return getattr(hook, "checkpoint_name", None) or type(hook).__name__


class Checkpointer:
    """Saves `checkpointables` (name -> an object with state_dict / load_state_dict) and the state of `hooks`
    into `folder`, and restores them. Saving is a collective under torch.distributed (every rank's random
    state is gathered); rank 0 writes.

    `hooks` is read when saving and restoring (pass the trainer's list: hooks registered later count)."""

    def __init__(self, folder: str, checkpointables: dict[str, Any], hooks: Sequence = (), *, rank: int = 0,
                 world_size: int = 1):
        self.folder, self.checkpointables, self.hooks = folder, checkpointables, hooks
        self.rank, self.world_size = rank, world_size

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    # ------------------------------------------------------------------ saving
    def state(self, **run: Any) -> dict | None:
        """The checkpoint of now, with `run`'s entries (iteration, config); a collective: rank 0 gets it."""
        state = {"layout": LAYOUT, **run, "world_size": self.world_size}
        for name, obj in self.checkpointables.items():
            state[name] = obj.state_dict()
        state["hooks"] = self._hook_states()
        state["rng"] = rng_states()
        if self.world_size > 1:
            state["rng_per_rank"] = all_gather_object(state["rng"])
        return state if self.rank == 0 else None

    def _hook_states(self) -> dict:
        states = {}
        for hook in self.hooks:
            saved = hook.state_dict()
            if not saved:
                continue
            name = hook_name(hook)
            if name in states:
                raise ValueError(f"two hooks save their state as {name!r}: give one a checkpoint_name of its own")
            states[name] = saved
        return states

    def save(self, name: str, keep: int = 0, **run: Any) -> None:
        """`name` in the folder (atomically); with `keep` > 0 also iter_<N>.pth, the newest `keep` of them kept."""
        state = self.state(**run)
        if self.rank != 0:
            return
        save_checkpoint(state, self.path(name))
        if keep > 0:
            save_checkpoint(state, self.path(f"iter_{run['iteration']:07d}.pth"))
            numbered = sorted(f for f in os.listdir(self.folder) if f.startswith("iter_") and f.endswith(".pth"))
            for old in numbered[:-keep]:
                os.remove(self.path(old))

    # ------------------------------------------------------------------ loading
    @staticmethod
    def load(path: str) -> dict:
        """The checkpoint at `path`, on the CPU, in layout 2 whatever layout it was written in. (load_state_dict
        moves each state to its device; the random states must stay CPU tensors, see restore_rng_states.)"""
        return upgrade_layout(load_checkpoint(path, map_location="cpu", required=CHECKPOINT_KEYS), path)

    def restore(self, state: dict) -> list[str]:
        """Every checkpointable, every hook and this rank's random state from a layout-2 `state`; the notes of
        what could not be restored (CUDA random states of devices not here)."""
        for name, obj in self.checkpointables.items():
            if state.get(name) is not None:
                obj.load_state_dict(state[name])
        flat = state.get(FLAT_HOOK_STATE)
        for hook in self.hooks:
            saved = state["hooks"].get(hook_name(hook))
            if saved is not None:
                hook.load_state_dict(saved)
            elif flat and not type(hook).__module__.startswith("xbm."):
                hook.load_state_dict(flat)  # a user's hook of the flat layout read its entries from the whole checkpoint
        per_rank = state.get("rng_per_rank")
        same_world = per_rank is not None and len(per_rank) == self.world_size
        return restore_rng_states(per_rank[self.rank] if same_world else state["rng"])


def upgrade_layout(state: dict, path: str = "checkpoint") -> dict:
    """A checkpoint of any layout xbm has written, in layout 2 (a new dict; `state` is left alone)."""
    layout = state.get("layout")
    if layout == LAYOUT:
        return state
    if layout is not None:
        raise CheckpointError(f"{path} has checkpoint layout {layout!r}, and this xbm reads layouts up to {LAYOUT}: "
                              "it was written by a newer xbm")
    upgraded = {key: state[key] for key in ("iteration", "config", "model", "optimizer", "scheduler", "scaler", "rng",
                                            "rng_per_rank", "world_size") if key in state}
    upgraded["layout"] = LAYOUT
    objective = {f"memory.{key}": value for key, value in (state.get("memory") or {}).items()}
    objective["_extra_state"] = {"adapter": state.get("adapter")}
    upgraded["objective"] = objective
    upgraded["guard"] = {"skipped_steps": state.get("skipped_steps", 0)}  # absent from xbm 0.1's
    if state.get("plateau") is not None:  # SOLVER.SCHEDULER plateau only, as in layout 2
        upgraded["plateau"] = state["plateau"]
    hooks = {"BestCheckpointer": {"best_metric": state.get("best_metric")}}
    if state.get("drift") is not None:
        hooks["DriftProbe"] = state["drift"]
    if state.get("best_on_test") is not None:
        hooks["BestOnTestReport"] = {"best_on_test": state["best_on_test"]}
    upgraded["hooks"] = hooks
    upgraded[FLAT_HOOK_STATE] = {key: value for key, value in state.items() if key not in _FLAT_KEYS}
    return upgraded
