"""The CUDA paths: skipped without a GPU, run by `make gpu-check` (scripts/gpu_check.py) on one.

Each test compares the CUDA result with the CPU result of the same code, or checks a CUDA-only
behaviour (mixed precision, resume with states saved on a GPU, search without host copies).
"""
import pytest
import torch

from xbm.config import load_cfg
from xbm.checkpoint.io import load_checkpoint
from xbm.engine.defaults import DefaultTrainer
from xbm.evaluation import evaluate, search
from xbm.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss, TripletLoss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cuda",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "36", "XBM.START_ITERATION", "2", "TEST.EVAL_PERIOD", "0", *extra,
    ]


def _clustered(n, dim, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // 10 + 1, dim, generator=gen)
    labels = torch.randint(0, centres.shape[0], (n,), generator=gen)
    x = torch.nn.functional.normalize(centres[labels] + 0.5 * torch.randn(n, dim, generator=gen), dim=1)
    return x.to(device), labels


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_training_and_resume_on_the_gpu(glyph_root, tmp_path, amp):
    out = tmp_path / "run"
    first = DefaultTrainer(load_cfg("configs/glyphs_xbn.yaml", _opts(glyph_root, out, "SOLVER.AMP", amp,
                                                               "SOLVER.MAX_ITERS", "6")))
    assert first.objective.memory.feats.is_cuda
    first.train()
    state = load_checkpoint(str(out / "checkpoints" / "last.pth"))
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    # The crash this guards against: resuming on a GPU put the random states on the GPU.
    resumed = DefaultTrainer(load_cfg("configs/glyphs_xbn.yaml", _opts(glyph_root, out, "SOLVER.AMP", amp,
                                                                 "SOLVER.MAX_ITERS", "8")), resume="auto")
    assert resumed.iteration == 6
    results = resumed.train()
    assert resumed.iteration == 8 and 0 < results["test"]["R@1"] <= 1
    assert resumed.guard.streak == 0


def test_evaluation_stays_on_the_gpu_and_matches_the_cpu(glyph_root, tmp_path):
    trainer = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "run")))
    dataset = trainer.evaluator.tasks["test"][0]
    from xbm.evaluation.evaluator import compute_embeddings

    feats, labels = compute_embeddings(trainer.model, dataset, trainer.device)
    assert feats.is_cuda
    on_gpu = evaluate(feats, labels, ks=(1, 10), backend="torch")
    on_cpu = evaluate(feats.cpu(), labels, ks=(1, 10), backend="torch")
    assert on_gpu == pytest.approx(on_cpu, abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_gpu_search_matches_the_cpu_up_to_ties(backend):
    if backend == "faiss" and (search.faiss is None or search.faiss.get_num_gpus() == 0):
        pytest.skip("faiss has no GPU support here")
    x, _ = _clustered(20_000, 128, device="cuda")
    cpu_sims, cpu_ids = search.knn(x.cpu(), k=10, backend="torch")
    sims, ids = search.knn(x, k=10, backend=backend)
    assert sims.is_cuda and ids.is_cuda
    torch.testing.assert_close(sims.cpu(), cpu_sims, rtol=0, atol=1e-5)
    differs = ids.cpu() != cpu_ids
    # where the neighbour lists differ, the similarities tie
    assert torch.all((sims.cpu() - cpu_sims).abs()[differs] <= 1e-5)


def test_faiss_gpu_index_is_built_once(monkeypatch):
    if search.faiss is None or search.faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU support here")
    built = []
    real = search._faiss_gpu_index
    monkeypatch.setattr(search, "_faiss_gpu_index", lambda g: built.append(g.shape) or real(g))
    x, _ = _clustered(5_000, 64, device="cuda")
    search.knn(x, k=5, backend="faiss", chunk_size=512)  # ten chunks
    assert built == [(5_000, 64)]


@pytest.mark.parametrize("cls", [ContrastiveLoss, MultiSimilarityLoss, TripletLoss, SupConLoss])
def test_unchecked_loss_on_the_gpu_gives_the_same_bits(cls):
    emb, labels = _clustered(64, 32, device="cuda")
    ref, ref_labels = _clustered(2_000, 32, seed=1, device="cuda")
    ref_labels = ref_labels.cuda() % 7
    labels = labels.cuda() % 7
    for refs in (ref, ref * 1.5):  # unit rows (XBM) and rescaled rows (an adapted memory)
        a = emb.clone().requires_grad_(True)
        b = emb.clone().requires_grad_(True)
        checked = cls()(a, labels, refs, ref_labels)
        unchecked = cls()(b, labels, refs, ref_labels, check_values=False)
        checked.backward()
        unchecked.backward()
        assert torch.equal(checked, unchecked) and torch.equal(a.grad, b.grad)


def test_uint8_transfer_and_channels_last_on_the_gpu(glyph_root, tmp_path):
    plain = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "a")))
    fast = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "b", "DATA.UINT8_TRANSFER", "True",
                                                              "PERF.CHANNELS_LAST", "True")))
    images = next(iter(plain.train_loader()))[0]
    pixels = next(iter(fast.train_loader()))[0]
    assert pixels.dtype == torch.uint8
    with torch.no_grad():
        expected = plain.model(images.cuda())
        got = fast.model(pixels.cuda().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_compile_with_inductor_trains_on_the_gpu(glyph_root, tmp_path):
    trainer = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "run", "PERF.COMPILE", "inductor",
                                                                 "SOLVER.MAX_ITERS", "3")))
    results = trainer.train()
    assert trainer.iteration == 3 and trainer.guard.skipped_steps == 0 and 0 < results["test"]["R@1"] <= 1
