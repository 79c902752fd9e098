"""xbm-export, xbm-index and xbm-search with a timm ViT (MODEL.BACKBONE.NAME timm:<name>): checkpoints of a
tiny ViT trained for a few steps on the generated Glyphs, with a projection head and without one
(MODEL.HEAD.DIM 0); the TorchScript and ONNX files against the PyTorch model on the same preprocessed
images, search against a brute-force ranking, and the bicubic resize of timm's test transform replayed
without torchvision."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from test_serving import _brute_force, _run  # noqa: E402

from xbm.serving import cli  # noqa: E402
from xbm.serving.images import describe_transform, preprocess  # noqa: E402
from xbm.serving.index import load_index  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/glyphs_vit_baseline.yaml made smaller still (its img_size 32 and patch_size 4 kept): TIMM.KWARGS can
# be set in a YAML file only, not on the command line.
TINY_VIT_YAML = """\
_BASE_: {base}
MODEL:
  BACKBONE:
    TIMM:
      KWARGS:
        depth: 2
        embed_dim: 32
        num_heads: 2
"""
HEAD_DIMS = {"head": 16, "no_head": 0}  # no head: the embedding is the L2-normalised 32-wide class token


@pytest.fixture(scope="module")
def vit(glyph_root, tmp_path_factory):
    """Checkpoints of the tiny ViT after 3 training steps (one per HEAD_DIMS entry), each with its model and
    the evaluator's embeddings of the test split (the reference)."""
    from xbm.config import load_cfg
    from xbm.data.datasets import build_dataset
    from xbm.data.transforms import build_transforms
    from xbm.evaluation.evaluator import compute_embeddings
    from xbm.engine.defaults import DefaultTrainer

    base = tmp_path_factory.mktemp("timm_serving")
    config = base / "tiny_vit.yaml"
    config.write_text(TINY_VIT_YAML.format(base=os.path.join(ROOT, "configs", "glyphs_vit_baseline.yaml")))
    runs = {}
    for name, dim in HEAD_DIMS.items():
        cfg = load_cfg(str(config), [
            "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(base / name), "MODEL.HEAD.DIM", str(dim), "SOLVER.MAX_ITERS", "3",
            "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "0", "TEST.EVAL_PERIOD", "0",
            "TEST.BATCH_SIZE", "64"])
        trainer = DefaultTrainer(cfg)
        trainer.train()
        model = trainer.model.eval()
        test = build_dataset(cfg, "test", build_transforms(cfg, train=False))
        reference, labels = compute_embeddings(model, test, "cpu", 64)
        runs[name] = SimpleNamespace(
            ckpt=str(base / name / "checkpoints" / "last.pth"), model=model, dim=dim or 32, cfg=cfg,
            reference=reference.numpy(), labels=labels.numpy(),
            files=[os.path.abspath(str(test.full_path(i))) for i in range(len(test))])
    return runs


def test_the_checkpoints_are_timm_vits_with_and_without_a_head(vit):
    from xbm.serving.models import load_embedder

    for name, run in vit.items():
        assert run.cfg.MODEL.BACKBONE.NAME == "timm:vit_tiny_patch16_224"
        assert dict(run.cfg.MODEL.BACKBONE.TIMM.KWARGS) == {"img_size": 32, "patch_size": 4, "depth": 2,
                                                            "embed_dim": 32, "num_heads": 2}
        embedder = load_embedder(ckpt=run.ckpt, device="cpu")
        assert embedder.dim == run.dim and run.reference.shape == (len(run.files), run.dim)
        assert [s["op"] for s in embedder.steps] == ["to_rgb", "normalize"]  # 32 px glyphs: no resize
        assert np.allclose(np.linalg.norm(run.reference, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("runtime,suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
@pytest.mark.parametrize("name", list(HEAD_DIMS))
def test_the_exported_vit_embeds_like_pytorch(vit, tmp_path, capsys, name, runtime, suffix):
    """The serving path of both sides: the exported file and its sidecar's steps, the checkpoint and its
    torchvision transform; batches of 1 and 5 (the ONNX model's batch is dynamic, through the attention)."""
    from xbm.serving.models import load_embedder

    run = vit[name]
    out = tmp_path / f"model{suffix}"
    status, _, err = _run(cli.export_main, ["--ckpt", run.ckpt, "--format", runtime, "--out", out], capsys)
    assert status == 0, err
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["backbone"] == "timm:vit_tiny_patch16_224" and sidecar["input"]["shape"] == ["batch", 3, 32, 32]
    assert sidecar["output"]["dim"] == run.dim
    exported = load_embedder(model=str(out), device="cpu")
    pytorch = load_embedder(ckpt=run.ckpt, device="cpu")
    images = [Image.open(path) for path in run.files[:6]]
    pixels = np.stack([exported.preprocess(image) for image in images])
    assert np.array_equal(pixels, np.stack([pytorch.preprocess(image) for image in images]))
    for batch in (pixels[:1], pixels[1:]):
        expected = pytorch(batch)
        got = exported(batch)
        assert got.shape == expected.shape == (len(batch), run.dim)
        assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(exported(pixels) - run.reference[:6]).max() <= 1e-4


@pytest.mark.slow
def test_index_and_search_with_the_vit_rank_like_brute_force(vit, tmp_path, capsys):
    """xbm-index of the test split by the checkpoint holds the evaluator's embeddings; xbm-search by the
    checkpoint, and by its ONNX export, gives the brute-force neighbours of the query images."""
    run = vit["no_head"]
    out = tmp_path / "idx"
    status, stdout, err = _run(cli.index_main, ["--ckpt", run.ckpt, "--split", "test", "--out", out,
                                                "--no-progress"], capsys)
    assert status == 0 and f"indexed {len(run.files)} images" in stdout, err
    gallery = load_index(str(out))
    assert np.abs(gallery.index.reconstruct_n(0, len(gallery)) - run.reference).max() <= 1e-6
    assert gallery.paths == run.files and gallery.labels == run.labels.tolist() and gallery.dim == 32
    model = tmp_path / "model.onnx"
    assert _run(cli.export_main, ["--ckpt", run.ckpt, "--format", "onnx", "--out", model], capsys)[0] == 0

    queries = [2, 11, 40]
    folder = tmp_path / "queries"
    folder.mkdir()
    for q in queries:  # copies: found by content, not by path
        shutil.copy(run.files[q], folder / f"q{q:03d}.png")
    expected = _brute_force(run.reference, queries, 5)
    for by in ([], ["--model", model]):
        answer = tmp_path / f"r{len(by)}.json"
        status, _, err = _run(cli.search_main, ["--index", out, "--query", folder, "--topk", 5, "--json", answer,
                                                *by], capsys)
        assert status == 0, err
        for result, want in zip(json.loads(answer.read_text())["results"], expected):
            assert [m["path"] for m in result["matches"]] == [run.files[j] for _, j in want], by
            assert [m["score"] for m in result["matches"]] == pytest.approx([s for s, _ in want], abs=1e-4)


def _random_image(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_a_bicubic_resize_is_described_and_replayed_as_torchvision_resizes():
    """INPUT.INTERPOLATION bicubic on a natural-image transform, timm's own test transform (bicubic, from
    the model's pretrained config), and an exact-size bicubic resize: the replay is torchvision's output."""
    from torchvision import transforms as T

    from xbm.config import load_cfg
    from xbm.data.transforms import IMAGENET_CONVENTION, BackboneInput, ToRGB, build_transforms

    rng = np.random.default_rng(0)
    bicubic = build_transforms(load_cfg("configs/sop_baseline.yaml", [
        "INPUT.RESIZE", "45", "INPUT.IMAGE_SIZE", "32", "INPUT.INTERPOLATION", "bicubic"], check=False), False)
    timm_default = build_transforms(load_cfg(None, [
        "MODEL.BACKBONE.NAME", "timm:vit_small_patch16_224.dino", "DATA.NAME", "sop", "DATA.ROOT", "/nowhere",
        "INPUT.IMAGE_SIZE", "0", "INPUT.RESIZE", "0", "INPUT.INTERPOLATION", ""], check=False), False)
    exact = T.Compose([ToRGB(), T.Resize((40, 56), interpolation=T.InterpolationMode.BICUBIC),
                       BackboneInput(IMAGENET_CONVENTION)])
    cases = [(bicubic, {"op": "resize_shorter", "size": 45, "interpolation": "bicubic"},
              [(61, 47), (47, 90), (45, 45), (32, 300)]),
             (timm_default, {"op": "resize_shorter", "size": 248, "interpolation": "bicubic"}, [(300, 410)]),
             (exact, {"op": "resize", "height": 40, "width": 56, "interpolation": "bicubic"}, [(61, 47), (56, 40)])]
    for transform, resize, sizes in cases:
        steps = describe_transform(transform)
        assert resize in steps, steps
        steps = json.loads(json.dumps(steps))  # as a sidecar holds them
        for width, height in sizes:
            image = _random_image(rng, width, height)
            assert np.array_equal(preprocess(image, steps), transform(image).numpy()), (resize, width, height)
    with pytest.raises(ValueError, match="only bilinear or bicubic resizing"):
        describe_transform(T.Compose([T.Resize(40, interpolation=T.InterpolationMode.NEAREST),
                                      BackboneInput(IMAGENET_CONVENTION)]))
    steps = [dict(step, interpolation="lanczos") if step["op"] == "resize_shorter" else step
             for step in describe_transform(bicubic)]
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        preprocess(_random_image(rng, 50, 60), steps)


def test_a_resize_step_without_interpolation_replays_bilinear_as_before():
    """Sidecars and index manifests written before the field: their resize steps have none and mean
    bilinear; bilinear steps are still described without it, so those files match their models' steps."""
    from xbm.config import load_cfg
    from xbm.data.transforms import build_transforms

    rng = np.random.default_rng(1)
    opts = ["INPUT.RESIZE", "45", "INPUT.IMAGE_SIZE", "32"]
    bilinear = build_transforms(load_cfg("configs/sop_baseline.yaml", opts, check=False), False)
    bicubic = build_transforms(load_cfg("configs/sop_baseline.yaml", opts + ["INPUT.INTERPOLATION", "bicubic"],
                                        check=False), False)
    old = describe_transform(bilinear)
    assert old[:2] == [{"op": "resize_shorter", "size": 45}, {"op": "center_crop", "height": 32, "width": 32}]
    stripped = [{k: v for k, v in step.items() if k != "interpolation"} for step in describe_transform(bicubic)]
    assert stripped == old
    explicit = [dict(step, interpolation="bilinear") if step["op"] == "resize_shorter" else step for step in old]
    for width, height in [(61, 47), (47, 90)]:
        image = _random_image(rng, width, height)
        expected = bilinear(image).numpy()
        assert np.array_equal(preprocess(image, stripped), expected)
        assert np.array_equal(preprocess(image, explicit), expected)
        assert not np.array_equal(preprocess(image, describe_transform(bicubic)), expected)
