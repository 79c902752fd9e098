"""The speed switches (PERF.*, DATA.UINT8_TRANSFER, SOLVER.AMP, TEST.KNN_BACKEND): what they do on
the CPU, and the one sentence each gives where this machine cannot honour it, before any data is read."""
import logging

import pytest
import torch

from xbm.config import load_cfg
from xbm.data.datasets import build_dataset
from xbm.data.transforms import BNINCEPTION_CONVENTION, BackboneInput, build_transforms, to_backbone_input
from xbm.checkpoint import io as checkpoint_module
from xbm import runtime
from xbm.engine.defaults import DefaultTrainer
from xbm.evaluation import search
from xbm.utils.env import resolve_device


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "36", "XBM.START_ITERATION", "2", "TEST.EVAL_PERIOD", "0", *extra,
    ]


@pytest.fixture
def torch_flags():
    """DefaultTrainer() sets process-wide backend flags: put them back after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[1:]


# ------------------------------------------------------------------ bad input: one sentence, no data read
def _refused(tmp_path, *extra):
    # DATA.ROOT does not exist: an error about anything but the data proves none was read.
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(tmp_path / "no_data", tmp_path / "run", *extra))
    with pytest.raises(ValueError) as info:
        DefaultTrainer(cfg)
    message = str(info.value)
    assert "\n" not in message and "no_data" not in message
    return message


def test_fp16_on_the_cpu_is_refused_before_any_data_is_read(tmp_path):
    assert "SOLVER.AMP fp16 needs a CUDA device" in _refused(tmp_path, "SOLVER.AMP", "fp16")
    assert "SOLVER.AMP 'fp8' is not one of" in _refused(tmp_path, "SOLVER.AMP", "fp8")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    cfg = load_cfg("configs/glyphs_xbm.yaml", ["SOLVER.AMP", "bf16"])
    with pytest.raises(ValueError, match="SOLVER.AMP bf16 is not supported by Tesla V100.*use fp16 or none"):
        runtime.amp_dtype(cfg, torch.device("cuda", 0))


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"MODEL.DEVICE is 'cuda:3' but this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_faiss_asked_for_but_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(search, "_FAISS_ERROR", "No module named 'faiss'")
    monkeypatch.setattr(search, "faiss", None)
    message = _refused(tmp_path, "TEST.KNN_BACKEND", "faiss")
    assert "TEST.KNN_BACKEND faiss, but faiss cannot be imported (No module named 'faiss')" in message
    # auto falls back to torch and says so in one log line
    cfg = load_cfg("configs/glyphs_xbm.yaml", ["TEST.KNN_BACKEND", "auto"])
    logger = logging.getLogger("xbm")
    monkeypatch.setattr(logger, "handlers", [caplog.handler])  # xbm's logger does not propagate
    with caplog.at_level(logging.INFO, logger="xbm"):
        runtime.check_knn_backend(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "faiss cannot be imported (No module named 'faiss'): evaluation searches with torch"]
    assert search.resolve_backend("auto", torch.device("cpu"), 10) == "torch"


def test_an_unknown_or_unusable_compile_backend_is_refused(tmp_path, monkeypatch):
    assert "PERF.COMPILE 'warp-drive' is not a torch.compile backend here" in _refused(
        tmp_path, "PERF.COMPILE", "warp-drive")
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert "PERF.COMPILE inductor on the CPU needs a C++ compiler" in _refused(tmp_path, "PERF.COMPILE", "inductor")


def test_prefetch_factor_must_be_positive(tmp_path):
    assert "DATA.PREFETCH_FACTOR must be at least 1" in _refused(tmp_path, "DATA.PREFETCH_FACTOR", "0")


# ------------------------------------------------------------------ the switches themselves
def test_backend_flags_follow_the_config(torch_flags):
    cfg = load_cfg(opts=["PERF.CUDNN_BENCHMARK", "True", "PERF.TF32", "False"])
    runtime.configure_backends(cfg)
    assert torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()
    # determinism wins over autotuning (cuDNN's benchmark picks algorithms by timing)
    runtime.configure_backends(load_cfg(opts=["PERF.DETERMINISTIC", "True", "PERF.TF32", "True"]))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32


def test_uint8_pixels_converted_by_the_model_give_the_same_bits(glyph_root):
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, "unused"))
    pixels_cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, "unused", "DATA.UINT8_TRANSFER", "True"))
    floats = build_dataset(cfg, "test", build_transforms(cfg, train=False))
    pixels = build_dataset(pixels_cfg, "test", build_transforms(pixels_cfg, train=False))
    assert pixels[0][0].dtype == torch.uint8 and floats[0][0].dtype == torch.float32
    batch = torch.stack([pixels[i][0] for i in range(6)])
    assert torch.equal(to_backbone_input(batch, build_transforms(cfg, train=False).transforms[-1].convention),
                       torch.stack([floats[i][0] for i in range(6)]))
    # BN-Inception's BGR, 0-255, mean-only convention, against a plain per-pixel reference
    image = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    expected = torch.stack([image[2].float() - 104, image[1].float() - 117, image[0].float() - 128])
    assert torch.equal(to_backbone_input(image[None], BNINCEPTION_CONVENTION)[0], expected)
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(BackboneInput(BNINCEPTION_CONVENTION)(pil), expected)


def test_uint8_transfer_trains_to_the_same_weights(glyph_root, tmp_path, torch_flags):
    runs = {}
    for flag in ("False", "True"):
        cfg = load_cfg("configs/glyphs_xbn.yaml", _opts(glyph_root, tmp_path / flag, "DATA.UINT8_TRANSFER", flag,
                                                         "SOLVER.MAX_ITERS", "3"))
        trainer = DefaultTrainer(cfg)
        runs[flag] = (trainer.train(), trainer.model.state_dict())
    assert runs["True"][0] == runs["False"][0]
    for name, value in runs["False"][1].items():
        assert torch.equal(runs["True"][1][name], value), name


def test_channels_last_and_compile_train_on_the_cpu(glyph_root, tmp_path, torch_flags):
    plain = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "plain", "SOLVER.MAX_ITERS", "3")))
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "fast", "SOLVER.MAX_ITERS", "3",
                                                     "PERF.CHANNELS_LAST", "True", "PERF.COMPILE", "aot_eager"))
    fast = DefaultTrainer(cfg)
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.network is not fast.model  # the compiled module, sharing the model's parameters
    # Same initial weights (same seed): the compiled channels_last network computes the same
    # embeddings up to rounding (after a step, Adam's sign-like first update can amplify rounding).
    images = next(iter(plain.train_loader()))[0]
    with torch.no_grad():
        expected = plain.network(images)
        got = fast.network(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    results = fast.train()
    assert fast.iteration == 3 and fast.guard.skipped_steps == 0 and 0 < results["test"]["R@1"] <= 1


# ------------------------------------------------------------------ resume: random states stay on the CPU
def test_resume_reads_random_states_on_the_cpu_whatever_the_device(glyph_root, tmp_path, monkeypatch, torch_flags):
    out = tmp_path / "run"
    DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "2"))).train()
    real_load = checkpoint_module.load_checkpoint
    mapped_to = []

    def load_like_torch(path, map_location="cpu", **kwargs):
        # What torch.load(map_location="cuda") does to the random states on a GPU machine: they
        # arrive as tensors of that device, which torch.set_rng_state and .numpy() refuse. "meta"
        # stands in for the GPU here (it refuses the same way).
        mapped_to.append(str(map_location))
        state = real_load(path, **kwargs)
        if str(map_location) != "cpu":
            state["rng"]["torch"] = state["rng"]["torch"].to("meta")
        return state

    monkeypatch.setattr("xbm.engine.checkpointer.load_checkpoint", load_like_torch)
    trainer = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "4")))
    trainer.device = torch.device("meta")  # as if the run were on a GPU
    trainer.resume("auto")
    assert trainer.iteration == 2 and mapped_to == ["cpu"]


def test_cuda_random_states_of_missing_gpus_are_skipped_and_named(monkeypatch):
    states = checkpoint_module.rng_states()
    states["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # saved on 8 GPUs
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state}))
    notes = checkpoint_module.restore_rng_states(states)
    assert list(restored) == [0] and torch.equal(restored[0], states["cuda"][0])
    assert notes == ["the random states of 7 of 8 saved CUDA devices were not restored: 1 visible here"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert checkpoint_module.restore_rng_states(states) == [] and sorted(restored) == list(range(8))


def test_evaluation_shows_progress_and_keeps_embeddings_on_the_device(glyph_root, tmp_path, capsys, torch_flags):
    from xbm.evaluation.evaluator import compute_embeddings

    trainer = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "run")))
    trainer.evaluate()
    assert "embed test" in capsys.readouterr().err
    dataset = trainer.evaluator.tasks["test"][0]
    feats, labels = compute_embeddings(trainer.model, dataset, "cpu", batch_size=64)
    assert feats.device.type == "cpu" and feats.shape == (len(dataset), 32) and labels.shape == (len(dataset),)


def test_two_faiss_packages_in_one_environment_are_named(monkeypatch, caplog):
    logger = logging.getLogger("xbm")
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    monkeypatch.setattr(runtime, "installed_faiss_packages", lambda: ["faiss-cpu", "faiss-gpu"])
    with caplog.at_level(logging.INFO, logger="xbm"):
        runtime.check_knn_backend(load_cfg(opts=[]))
    assert caplog.records[0].levelname == "WARNING" and caplog.records[0].getMessage().startswith(
        "faiss-cpu and faiss-gpu are both installed and overwrite each other's `faiss` module")
    monkeypatch.undo()
    # this environment itself has at most one (make installs the cpu extra)
    assert len(runtime.installed_faiss_packages()) <= 1


def test_a_checkpoint_trained_with_fp16_evaluates_on_the_cpu(glyph_root, tmp_path, torch_flags):
    from xbm.checkpoint.config import config_of_checkpoint
    from xbm.evaluation.checkpoints import evaluate_checkpoints

    out = tmp_path / "run"
    DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "2"))).train()
    path = str(out / "checkpoints" / "last.pth")
    # as if trained on a GPU with fp16: the CPU embeds in float32 instead of refusing
    cfg = config_of_checkpoint(path, ["SOLVER.AMP", "fp16"])
    (row,) = evaluate_checkpoints(cfg, [path])
    assert row["task"] == "test" and 0 < row["R@1"] <= 1
    assert runtime.evaluation_amp_dtype(cfg, torch.device("cpu")) is None
