"""The loop without a config: `Trainer` given hand-made parts, as in a notebook, trains exactly as the same
steps written out by hand; and the loop and the hooks read no config and the loop names no hook class."""
from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbm.engine.hooks import HookBase
from xbm.engine.trainer import Trainer
from xbm.losses import ContrastiveLoss
from xbm.memory import CrossBatchMemory, MomentMatching
from xbm.objective import CrossBatchObjective

ENGINE = Path(__file__).resolve().parents[1] / "xbm" / "engine"
STEPS, BATCH, DIM = 6, 8, 16


class TinyEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU())
        self.head = nn.Linear(32, DIM)

    def forward(self, images):
        return F.normalize(self.head(self.backbone(images)), dim=1)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyEmbedder()
    # The loop checks finiteness once per step, so the memory and the loss may skip their own checks (a
    # non-finite batch must reach the loop's check, not stop inside the objective).
    memory = CrossBatchMemory(32, DIM, check_finite=False)
    objective = CrossBatchObjective(ContrastiveLoss(), memory, MomentMatching(), start_iteration=2, check_values=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / (2 * STEPS))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 8, 8, generator=generator), torch.arange(BATCH) // 2) for _ in range(STEPS)]
    return model, objective, optimizer, scheduler, batches


class Losses(HookBase):
    def __init__(self):
        self.seen = []

    def after_step(self):
        self.seen.append((self.trainer.iteration, float(self.trainer.step_outputs["loss/total"])))


def test_a_trainer_of_hand_made_parts_trains_as_the_steps_written_out():
    model, objective, optimizer, scheduler, batches = _parts()
    hook = Losses()
    trainer = Trainer(model, objective, batches, optimizer, scheduler, hooks=[hook], max_iters=STEPS)
    trainer.train()
    assert trainer.iteration == STEPS and [i for i, _ in hook.seen] == list(range(1, STEPS + 1))

    # the reference: the same steps in a plain loop
    ref_model, ref_objective, ref_optimizer, ref_scheduler, ref_batches = _parts()
    ref_losses = []
    for iteration, (images, labels) in enumerate(ref_batches):
        total, _ = ref_objective(ref_model(images), labels, iteration)
        ref_optimizer.zero_grad()
        total.backward()
        ref_optimizer.step()
        ref_scheduler.step()
        ref_losses.append(float(total))
    assert [loss for _, loss in hook.seen] == ref_losses
    for (name, ours), theirs in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    for key, value in objective.memory.state_dict().items():
        assert torch.equal(value, ref_objective.memory.state_dict()[key]), key
    assert optimizer.param_groups[0]["lr"] == ref_optimizer.param_groups[0]["lr"]


def test_a_non_finite_step_is_taken_back_in_the_bare_loop():
    model, objective, optimizer, scheduler, batches = _parts()
    images, labels = batches[3]
    batches[3] = (torch.full_like(images, float("nan")), labels)
    trainer = Trainer(model, objective, batches[:4], optimizer, scheduler, max_iters=4)
    trainer.train()
    assert trainer.guard.skipped_steps == 1
    # the same three good steps; the fourth was undone whole
    ref_model, ref_objective, ref_optimizer, ref_scheduler, ref_batches = _parts()
    reference = Trainer(ref_model, ref_objective, ref_batches[:3], ref_optimizer, ref_scheduler, max_iters=3)
    reference.train()
    for (name, ours), theirs in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    for key, value in objective.memory.state_dict().items():
        assert torch.equal(value, ref_objective.memory.state_dict()[key]), key


def _attribute_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def _names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | _attribute_names(path)


def test_the_loop_and_the_hooks_read_no_config_and_the_loop_names_no_hook_class():
    for module in ("trainer.py", "hooks.py"):
        assert "cfg" not in _attribute_names(ENGINE / module), module  # no trainer.cfg, no self.cfg
    hook_classes = {node.name for node in ast.walk(ast.parse((ENGINE / "hooks.py").read_text()))
                    if isinstance(node, ast.ClassDef)} - {"HookBase"}
    assert {"EvalHook", "StopOnSignal", "MetricWriter"} <= hook_classes
    assert hook_classes.isdisjoint(_names(ENGINE / "trainer.py"))
