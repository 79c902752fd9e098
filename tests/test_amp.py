"""Mixed precision and non-finite steps: bf16 autocast on the CPU, skipped steps that change nothing."""
import copy

import pytest
import torch

from xbm.config import load_cfg
from xbm import runtime
from xbm.engine.defaults import DefaultTrainer


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "36", "XBM.START_ITERATION", "2", "TEST.EVAL_PERIOD", "0", "SOLVER.LOG_PERIOD", "2", *extra,
    ]


def _batches(trainer, count):
    batches = iter(trainer.train_loader())
    return [next(batches) for _ in range(count)]


def _state(trainer):
    """Everything a step may change, copied."""
    return copy.deepcopy({
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "memory": trainer.objective.memory.state_dict(), "adapter": trainer.objective.adapter.state_dict(),
    })


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("poison", ["loss", "embeddings"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(glyph_root, tmp_path, poison):
    # XBN: the step would adapt (rewrite) the whole memory and move the adapter's filter state.
    cfg = load_cfg("configs/glyphs_axbn.yaml", _opts(glyph_root, tmp_path / "run"))
    trainer = DefaultTrainer(cfg)
    batches = _batches(trainer, 5)
    for images, labels, _ in batches[:3]:
        trainer.train_step(images, labels)
        trainer.iteration += 1
    before = _state(trainer)
    assert trainer.objective.memory.pointer == 24 and len(trainer.objective.memory) == 24

    if poison == "loss":
        real = trainer.objective.loss.forward
        trainer.objective.loss.forward = lambda *a, **k: real(*a, **k) * float("inf")
    else:
        real = trainer.model.head.forward
        trainer.model.head.forward = lambda x: real(x) * float("nan")
    parts = trainer.train_step(*batches[3])
    assert "loss/total" not in parts
    assert (trainer.guard.skipped_steps, trainer.guard.streak) == (1, 1)
    _assert_same(_state(trainer), before)  # weights, BatchNorm statistics, Adam moments, memory, filter
    assert trainer.objective.memory.pointer == 24

    # Once the values are finite again, training goes on from exactly there.
    if poison == "loss":
        trainer.objective.loss.forward = real
    else:
        trainer.model.head.forward = real
    trainer.iteration += 1
    parts = trainer.train_step(*batches[4])
    assert torch.isfinite(parts["loss/total"]) and trainer.guard.streak == 0 and trainer.guard.skipped_steps == 1
    assert trainer.objective.memory.pointer == 32


def test_skipped_steps_are_counted_in_the_log_and_the_checkpoint(glyph_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "6"))
    trainer = DefaultTrainer(cfg)
    real = trainer.objective.loss.forward
    trainer.objective.loss.forward = lambda *a, **k: real(*a, **k) * (float("nan") if trainer.iteration in (1, 3) else 1)
    trainer.train()
    log = (out / "log.txt").read_text()
    assert "iteration 1: non-finite loss or embeddings; step skipped (1 in a row, 1 in all" in log
    assert "iteration 3: non-finite loss or embeddings; step skipped (1 in a row, 2 in all" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("amp/skipped_steps")] == [(2, 1.0), (4, 2.0), (6, 2.0)]
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["guard"]["skipped_steps"] == 2


def test_bf16_autocast_trains_on_the_cpu(glyph_root, tmp_path):
    cfg = load_cfg("configs/glyphs_xbn.yaml", _opts(glyph_root, tmp_path / "run", "SOLVER.AMP", "bf16",
                                                     "SOLVER.MAX_ITERS", "4"))
    trainer = DefaultTrainer(cfg)
    seen = []
    trainer.model.backbone.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    results = trainer.train()
    assert seen and set(seen) == {torch.bfloat16}  # the network really ran in bf16 ...
    assert trainer.objective.memory.dtype == torch.float32 and trainer.guard.skipped_steps == 0  # ... the memory did not
    assert 0 < results["test"]["R@1"] <= 1
    # evaluation runs under the same autocast where the CPU has native bfloat16, else in float32
    assert trainer.evaluator.amp_dtype == (torch.bfloat16 if runtime.cpu_bf16_support()[0] else None)


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_on_a_cpu_without_native_bfloat16_evaluates_in_float32_and_warns_once(monkeypatch, caplog, avx512_bf16,
                                                                                     amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    runtime._warn_emulated_bf16.cache_clear()
    cfg = load_cfg("configs/glyphs_xbn.yaml", ["SOLVER.AMP", "bf16"])
    cpu = torch.device("cpu")
    assert runtime.cpu_bf16_support() == (native, "AVX2")
    with caplog.at_level("WARNING", logger="xbm"):
        assert runtime.check_runtime(cfg, cpu) == torch.bfloat16  # training keeps what was asked
        for _ in range(2):
            assert runtime.evaluation_amp_dtype(cfg, cpu) == (torch.bfloat16 if native else None)
    warnings = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "AVX2" in warnings[0] and "SOLVER.AMP none" in warnings[0]
    # other settings and devices are not affected
    assert runtime.evaluation_amp_dtype(load_cfg("configs/glyphs_xbn.yaml", []), cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert runtime.evaluation_amp_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    # a torch without the checks: assumed native (never refuse what might run well)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.cpu_bf16_support() == (True, "AVX2")
