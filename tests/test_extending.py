"""Extending xbm from outside it: a loss, a memory adapter and a dataset registered in this file (and the
README's four example files) train through the public Trainer, selected by their names in the config."""
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xbm.config import load_cfg
from xbm.data.datasets import DATASET_REGISTRY, build_dataset
from xbm.data.datasets.base import ImageListDataset, Record, read_lines
from xbm.engine.defaults import DefaultTrainer
from xbm.losses import LOSS_REGISTRY, build_loss
from xbm.memory import ADAPTER_REGISTRY, build_adapter
from xbm.modeling.backbones import BACKBONE_REGISTRY, build_backbone
from xbm.utils.registry import Registry

ITERS, START, BATCH, MEMORY = 10, 4, 8, 24
CALLS = {"inbatch": 0, "memory": 0, "own_copy_found": 0, "adapter": 0}


# -- a loss, an adapter and a dataset defined here, as a user's module would ------------------------------
class CountingCosineLoss(nn.Module):
    """Mean cosine distance of same-label pairs plus mean hinge of other pairs; counts its calls and checks
    that row k's own copy sits in the memory at ref_self_index[k] (the contract of the memory term)."""

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, *, ref_self_index=None,
                check_values=True):
        if ref_embeddings is None:
            CALLS["inbatch"] += 1
            ref_embeddings, ref_labels = embeddings, labels
            ref_self_index = torch.arange(len(labels))
        else:
            CALLS["memory"] += 1
            own_rows = ref_embeddings[ref_self_index].float()
            CALLS["own_copy_found"] += bool(torch.equal(own_rows, embeddings.detach()))
        sim = F.normalize(embeddings) @ F.normalize(ref_embeddings.float()).T
        own = F.one_hot(ref_self_index, sim.shape[1]).bool()
        same = labels[:, None] == ref_labels[None, :]
        return (1 - sim)[same & ~own].mean() + F.relu(sim - 0.3)[~same].mean()


class CountingShift(nn.Module):
    """Adds 0.5 to every stored feature before each step, counting its calls."""

    def forward(self, memory_feats, batch_feats):
        CALLS["adapter"] += 1
        return memory_feats + 0.5


class ToyList(ImageListDataset):
    """`<split>.txt` of `path label` lines; evaluated as the task `toys`, leave-one-out."""

    NAME = "toy list"
    EVAL_TASKS = {"toys": ("test", None)}
    RECALL_KS = (1, 2)

    def _read_records(self, split):
        return [Record(*line.split()) for _, line in read_lines(self.require_file(f"{split}.txt"))]


@pytest.fixture
def registered_here():
    """The three parts above, registered for one test (registered at import, they would stay in the
    registries of every other test that pytest's worker runs)."""

    @LOSS_REGISTRY.register("test_counting_cosine")
    def build_counting_cosine(cfg):
        return CountingCosineLoss()

    @ADAPTER_REGISTRY.register("test_counting_shift")
    def build_counting_shift(cfg):
        return CountingShift()

    DATASET_REGISTRY.register("test_toy_list", ToyList)
    try:
        yield
    finally:
        LOSS_REGISTRY.unregister("test_counting_cosine")
        ADAPTER_REGISTRY.unregister("test_counting_shift")
        DATASET_REGISTRY.unregister("test_toy_list")


def _write_images(root: Path, split: str, classes: int, per_class: int, seed: int) -> list[str]:
    """Class c: a square of colour c at a random place on noise; paths <split>/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        colour = np.array([(c * 97) % 256, (c * 151 + 60) % 256, (c * 43 + 120) % 256], dtype=np.uint8)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
            x, y = rng.integers(0, 16, size=2)
            pixels[y:y + 24, x:x + 24] = colour
            path = f"{split}/class{c}/{i}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    for split, classes, seed in (("train", 6, 0), ("test", 4, 1)):
        paths = _write_images(root, split, classes, 5, seed)
        (root / f"{split}.txt").write_text("".join(f"{p} {p.split('/')[1]}\n" for p in paths))
    return root


def _opts(root, out, *names):
    return ["OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "MODEL.DEVICE", "cpu",
            "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 8, 16, 16)", "MODEL.HEAD.DIM", "16",
            "INPUT.IMAGE_SIZE", "32", "INPUT.RESIZE", "36", "DATA.BATCH_SIZE", str(BATCH), "DATA.NUM_INSTANCES", "4",
            "XBM.ENABLE", "True", "XBM.SIZE", str(MEMORY), "XBM.START_ITERATION", str(START),
            "SOLVER.MAX_ITERS", str(ITERS), "SOLVER.CHECKPOINT_PERIOD", "0", "TEST.EVAL_PERIOD", "0", *names]


@pytest.mark.slow
def test_parts_registered_in_this_file_train_by_name(registered_here, image_root, tmp_path):
    names = ["LOSS.NAME", "test_counting_cosine", "XBM.ADAPT.NAME", "test_counting_shift", "DATA.NAME", "test_toy_list"]
    cfg = load_cfg(None, _opts(image_root, tmp_path / "run", *names))  # the config check accepts the new names
    CALLS.update(dict.fromkeys(CALLS, 0))
    results = DefaultTrainer(cfg).train()
    assert CALLS["inbatch"] == ITERS
    assert CALLS["memory"] == ITERS - START  # from XBM.START_ITERATION on
    assert CALLS["own_copy_found"] == CALLS["memory"]
    assert CALLS["adapter"] == ITERS - 1  # before every step but the first, when the memory is empty
    assert list(results) == ["toys"]
    assert set(results["toys"]) >= {"R@1", "R@2"} and 0.0 <= results["toys"]["R@1"] <= results["toys"]["R@2"] <= 1.0


def test_an_unregistered_name_is_refused_by_the_config_check(registered_here, image_root, tmp_path):
    with pytest.raises(ValueError, match=r"LOSS.NAME 'no_such_loss' is not a known loss; choose one of \[.*'test_counting_cosine'"):
        load_cfg(None, _opts(image_root, tmp_path, "LOSS.NAME", "no_such_loss"))


# -- the README's files, run as written there ------------------------------------------------------------
def readme_files() -> dict[str, str]:
    """The python blocks of README's "Extending xbm" section, by the file name on their first line."""
    text = Path("README.md").read_text(encoding="utf-8")
    section = text.split("\n## Extending xbm\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {re.match(r"# (\S+\.py)", block).group(1): block for block in blocks}


@pytest.fixture
def readme_modules():
    """Each README file executed as a module (registering its entry); unregistered afterwards."""
    names = {"my_loss.py": (LOSS_REGISTRY, "cosine_margin"), "my_adapter.py": (ADAPTER_REGISTRY, "mean_shift"),
             "my_backbone.py": (BACKBONE_REGISTRY, "tiny"), "my_dataset.py": (DATASET_REGISTRY, "class_folders")}
    modules = {}
    try:
        for file, code in readme_files().items():
            if file in names:
                module = types.ModuleType(file[:-3])
                exec(compile(code, f"README.md ({file})", "exec"), module.__dict__)
                modules[file[:-3]] = module
        yield modules
    finally:
        for file, (registry, name) in names.items():
            if name in registry:
                registry.unregister(name)


def test_readme_parts_match_their_reference(readme_modules, image_root):
    assert sorted(readme_modules) == ["my_adapter", "my_backbone", "my_dataset", "my_loss"]
    assert "my_hook.py" in readme_files()
    cfg = load_cfg(None, ["DATA.NAME", "class_folders", "DATA.ROOT", str(image_root), "LOSS.NAME", "cosine_margin",
                          "XBM.ADAPT.NAME", "mean_shift", "MODEL.BACKBONE.NAME", "tiny"])
    gen = torch.Generator().manual_seed(0)
    emb, labels = F.normalize(torch.randn(6, 4, generator=gen)), torch.tensor([0, 0, 1, 1, 2, 2])
    memory, memory_labels = torch.randn(9, 4, generator=gen), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
    loss = build_loss(cfg)
    slots = torch.tensor([0, 1, 2, 3, 4, 5])  # row k's own copy: same label, left out
    expected = 0.0  # a plain loop over the pairs
    mem_unit = F.normalize(memory)
    for i in range(6):
        for j in range(9):
            s = float(emb[i] @ mem_unit[j])
            if j == slots[i]:
                continue
            expected += (1 - s) if labels[i] == memory_labels[j] else max(0.0, s - cfg.LOSS.CONTRASTIVE.MARGIN)
    assert float(loss(emb, labels, memory, memory_labels, ref_self_index=slots)) == pytest.approx(expected / 6, rel=1e-5)

    adapted = build_adapter(cfg)(memory.half(), emb)
    assert adapted.dtype == torch.float16
    assert torch.allclose(adapted.float().mean(0), emb.mean(0), atol=2e-3)

    backbone = build_backbone(cfg)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)

    train = build_dataset(cfg, "train")
    assert len(train) == 30 and train.num_classes == 6
    image, label = train[7]
    assert image.size == (40, 40) and label == 1  # class1/2.png: the 8th file in sorted order


@pytest.mark.slow
def test_readme_parts_train_by_name(readme_modules, image_root, tmp_path):
    names = ["LOSS.NAME", "cosine_margin", "XBM.ADAPT.NAME", "mean_shift", "MODEL.BACKBONE.NAME", "tiny",
             "DATA.NAME", "class_folders"]
    results = DefaultTrainer(load_cfg(None, _opts(image_root, tmp_path / "run", *names))).train()
    assert list(results) == ["test"] and 0.0 <= results["test"]["R@1"] <= 1.0


def test_readme_hook_writes_one_line_per_step(glyph_root, tmp_path):
    module = types.ModuleType("my_hook")
    exec(compile(readme_files()["my_hook.py"], "README.md (my_hook.py)", "exec"), module.__dict__)
    curve = tmp_path / "losses.tsv"
    cfg = load_cfg("configs/glyphs_xbm.yaml", [
        "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "OUTPUT_DIR", str(tmp_path / "run"),
        "XBM.SIZE", "64", "SOLVER.MAX_ITERS", "3", "TEST.EVAL_PERIOD", "0"])
    trainer = DefaultTrainer(cfg, extra_hooks=[module.LossCurve(str(curve))])
    trainer.train()
    lines = [line.split("\t") for line in curve.read_text().splitlines()]
    assert [int(i) for i, _ in lines] == [1, 2, 3]
    assert float(lines[-1][1]) == pytest.approx(float(trainer.step_outputs["loss/total"]), abs=1e-6)


# -- the registry itself -----------------------------------------------------------------------------------
def test_registry_register_get_and_refusals():
    registry = Registry("widget", "WIDGET.NAME")

    @registry.register("Round")
    def build_round(cfg):
        return "round"

    registry.register("square", lambda cfg: "square")
    assert registry.get("round") is build_round and registry.get(" ROUND ") is build_round
    assert registry.names() == ["round", "square"] and "Square" in registry and "oval" not in registry
    with pytest.raises(ValueError, match=r"^WIDGET.NAME 'oval' is not a known widget; choose one of \['round', 'square'\]"):
        registry.get("oval")
    with pytest.raises(ValueError, match="already a registered widget"):
        registry.register("round", lambda cfg: "another")
    replacement = registry.register("round", lambda cfg: "another", replace=True)
    assert registry.get("round") is replacement and registry.names() == ["round", "square"]
    assert registry.unregister("square")(None) == "square" and registry.names() == ["round"]
    with pytest.raises(ValueError, match="must name a widget"):
        registry.get("")
