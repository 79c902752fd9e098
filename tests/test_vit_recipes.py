"""The DINO ViT-S/16 recipes (configs/base/vit_s16_dino.yaml, configs/*_vit_{baseline,xbm,xbn}.yaml,
configs/sop_vit_dinov2_*.yaml): each loads, resolves to the Hyp-DINO settings it cites, differs from its
base only in the keys it means to change, and trains two steps and evaluates on a fake tree in its
dataset's real on-disk format (random weights, CPU, small batches: nothing is downloaded)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

timm = pytest.importorskip("timm")

from test_datasets import make_cars, make_inshop, write_image, write_text  # noqa: E402
from test_recipes import _base_of, _leaf_lines, _leaves  # noqa: E402

from xbm.config import load_cfg  # noqa: E402
from xbm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms  # noqa: E402

DATASETS = ("cub200", "cars196", "sop", "inshop")
BASE = "base/vit_s16_dino.yaml"
EXPERIMENTS = [f"{ds}_vit_{kind}.yaml" for ds in DATASETS for kind in ("baseline", "xbm", "xbn")] + [
    "sop_vit_dinov2_baseline.yaml", "sop_vit_dinov2_xbm.yaml"]
CONFIGS = [BASE] + EXPERIMENTS


def _cfg(name, *opts):
    return load_cfg(f"configs/{name}", list(opts))


def _merged(name):
    return dict(_leaves(yaml.safe_load(_cfg(name).dump())))


def _changes(name, base):
    """{key: (base value, value)} of the merged keys where `name` differs from `base`."""
    merged, inherited = _merged(name), _merged(base)
    return {k: (inherited[k], merged[k]) for k in merged if merged[k] != inherited[k]}


# ---------------------------------------------------------------- loading and citations
@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_cites_each_setting_it_changes(name):
    cfg = _cfg(name)
    base = _base_of(name)
    inherited = _cfg(base) if base else load_cfg(None, [])
    uncited = []
    for key, line in _leaf_lines(f"configs/{name}"):
        if key in {"_BASE_", "OUTPUT_DIR", "DATA.NAME", "DATA.ROOT"}:
            continue
        value, before = cfg, inherited
        for part in key.split("."):
            value, before = value[part], before[part]
        if value != before and "#" not in line:
            uncited.append(key)
    assert not uncited, f"{name}: no source beside {uncited}"
    text = open(f"configs/{name}").read()
    assert "DESIGN" not in text and "../" not in text  # the recipe cites nothing outside the repository
    assert text.startswith("# ")  # a header comment


def test_there_is_one_config_per_dataset_and_kind():
    shipped = {n for n in os.listdir("configs") if "_vit_" in n and not n.startswith("glyphs")}
    assert shipped == set(EXPERIMENTS)


# ---------------------------------------------------------------- the Hyp-DINO settings
# hyp_metric README.md:32-44: (epochs, batch, m, classes in the training split)
HYP_DINO = {"cub200": (50, 900, 9, 100), "cars196": (300, 882, 9, 98), "sop": (200, 900, 2, 11318),
            "inshop": (400, 900, 2, 3997)}
SPH_DINO_R1 = {"cub200": "78.7", "cars196": "86.6", "sop": "82.2", "inshop": "90.1"}


@pytest.mark.parametrize("ds", DATASETS)
def test_baseline_resolves_to_the_hyp_dino_settings(ds):
    name = f"{ds}_vit_baseline.yaml"
    cfg = _cfg(name)
    epochs, batch, m, classes = HYP_DINO[ds]
    b = cfg.MODEL.BACKBONE
    assert (b.NAME, b.PRETRAINED, b.POOLING, b.TIMM.FREEZE_PATCH_EMBED) == (
        "timm:vit_small_patch16_224.dino", "hub", "", True)
    assert cfg.MODEL.HEAD.DIM == 384 and cfg.MODEL.DEVICE == "auto"
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.NO_DECAY_NORM_BIAS) == ("adamw", 1e-5, 0.01, False)
    assert (s.BACKBONE_LR_FACTOR, s.LAYER_DECAY, s.SCHEDULER, s.WARMUP_ITERS) == (1.0, 1.0, "none", 0)
    assert (s.GRAD_CLIP, s.AMP) == (3.0, "fp16")
    assert (cfg.LOSS.NAME, cfg.LOSS.SUPCON.TEMPERATURE, cfg.LOSS.SUPCON.MINING, cfg.LOSS.INBATCH_WEIGHT) == (
        "supcon", 0.1, False, 1.0)
    assert not cfg.XBM.ENABLE
    assert (cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES, cfg.DATA.SAMPLER) == (batch, m, "uniform")
    # one epoch = one pass over the classes (hyp_metric sampler.py:39-40), whole batches only
    assert s.MAX_ITERS == epochs * (classes // (batch // m))
    assert cfg.TEST.EVAL_PERIOD == s.MAX_ITERS and tuple(cfg.TEST.RECALL_KS) == ()
    assert SPH_DINO_R1[ds] in open(f"configs/{name}").read()

    resize = 256 if ds == "cub200" else 224  # CUB: --resize 256 (README.md:32)
    test = build_transforms(cfg, train=False).transforms
    assert [type(t).__name__ for t in test] == ["Resize", "CenterCrop", "BackboneInput"]
    assert test[0].size == resize and test[0].interpolation.value == "bicubic"
    assert tuple(test[1].size) == (224, 224)
    convention = test[2].convention  # dino_vits16 takes ImageNet mean/std (hyp_metric train.py:87-90)
    assert convention.mean == pytest.approx(IMAGENET_MEAN) and convention.std == pytest.approx(IMAGENET_STD)
    train = build_transforms(cfg, train=True).transforms
    assert [type(t).__name__ for t in train] == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip",
                                                 "BackboneInput"]
    crop = train[1]
    assert tuple(crop.size) == (224, 224) and tuple(crop.scale) == (0.2, 1.0)
    assert crop.interpolation.value == "bicubic"


def test_timms_dino_weights_are_the_ones_hyp_metric_loads():
    pretrained = timm.models.get_pretrained_cfg("vit_small_patch16_224.dino")
    assert pretrained.url.endswith("/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth")
    dinov2 = _cfg("sop_vit_dinov2_baseline.yaml")
    assert dinov2.MODEL.BACKBONE.NAME == "timm:vit_small_patch14_dinov2.lvd142m"
    assert dinov2.INPUT.IMAGE_SIZE == 224 and dinov2.MODEL.BACKBONE.TIMM.FREEZE_PATCH_EMBED


# ---------------------------------------------------------------- each variant is its base plus its keys
MEMORY = {"OUTPUT_DIR", "DATA.BATCH_SIZE", "DATA.NUM_INSTANCES", "LOSS.NAME", "LOSS.CONTRASTIVE.REDUCTION",
          "XBM.ENABLE", "XBM.SIZE", "XBM.START_ITERATION", "SOLVER.MAX_ITERS", "SOLVER.CHECKPOINT_PERIOD",
          "TEST.EVAL_PERIOD"}
INHERITANCE = {
    **{f"{ds}_vit_baseline.yaml": (BASE, {"OUTPUT_DIR", "DATA.NAME", "DATA.ROOT", "SOLVER.MAX_ITERS",
                                          "TEST.EVAL_PERIOD"}) for ds in DATASETS},
    **{f"{ds}_vit_xbm.yaml": (f"{ds}_vit_baseline.yaml", MEMORY) for ds in DATASETS},
    **{f"{ds}_vit_xbn.yaml": (f"{ds}_vit_xbm.yaml", {"OUTPUT_DIR", "XBM.ADAPT.NAME"}) for ds in DATASETS},
    "sop_vit_dinov2_baseline.yaml": ("sop_vit_baseline.yaml", {"OUTPUT_DIR", "MODEL.BACKBONE.NAME"}),
    "sop_vit_dinov2_xbm.yaml": ("sop_vit_dinov2_baseline.yaml", MEMORY),
}
# the dataset keys beyond those (hyp_metric README.md:32,36; checkpoints and logs: our choice)
INHERITANCE["cub200_vit_baseline.yaml"][1].update({"DATA.NUM_INSTANCES", "INPUT.RESIZE",
                                                   "SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD"})
INHERITANCE["cars196_vit_baseline.yaml"][1].update({"DATA.BATCH_SIZE", "DATA.NUM_INSTANCES",
                                                    "SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD"})
INHERITANCE["inshop_vit_baseline.yaml"][1].add("SOLVER.CHECKPOINT_PERIOD")
MEMORY_SIZE = {"cub200": -1, "cars196": -1, "sop": 55000, "inshop": -1}


def test_every_vit_config_is_its_base_plus_its_own_keys():
    assert sorted(INHERITANCE) == sorted(EXPERIMENTS)
    for name, (base, changed) in INHERITANCE.items():
        assert _base_of(name) == base, name
        assert set(_changes(name, base)) == changed, name


@pytest.mark.parametrize("ds", DATASETS)
def test_memory_variants_see_the_baselines_images_at_batch_128(ds):
    baseline, xbm, xbn = (_cfg(f"{ds}_vit_{kind}.yaml") for kind in ("baseline", "xbm", "xbn"))
    for cfg in (xbm, xbn):
        assert (cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES) == (128, 4)
        assert (cfg.LOSS.NAME, cfg.LOSS.CONTRASTIVE.REDUCTION, cfg.LOSS.CONTRASTIVE.MARGIN) == (
            "contrastive", "pairs", 0.5)
        assert cfg.XBM.ENABLE and cfg.XBM.SIZE == MEMORY_SIZE[ds] and cfg.XBM.WEIGHT == 1.0
        images = baseline.SOLVER.MAX_ITERS * baseline.DATA.BATCH_SIZE
        assert cfg.SOLVER.MAX_ITERS == round(images / 128)
        assert 0.09 <= cfg.XBM.START_ITERATION / cfg.SOLVER.MAX_ITERS <= 0.11
        assert cfg.TEST.EVAL_PERIOD == cfg.SOLVER.MAX_ITERS
        # the solver and the input stay the baseline's
        for key in ("OPTIMIZER", "BASE_LR", "WEIGHT_DECAY", "SCHEDULER", "GRAD_CLIP", "AMP"):
            assert cfg.SOLVER[key] == baseline.SOLVER[key], key
        assert cfg.INPUT == baseline.INPUT and cfg.MODEL == baseline.MODEL
    assert (xbm.XBM.ADAPT.NAME, xbn.XBM.ADAPT.NAME) == ("none", "xbn")
    # XBN is XBM plus the adaptation, nothing else
    assert set(_changes(f"{ds}_vit_xbn.yaml", f"{ds}_vit_xbm.yaml")) == {"OUTPUT_DIR", "XBM.ADAPT.NAME"}


def test_dinov2_memory_variant_changes_what_the_dino_one_changes():
    dino = _changes("sop_vit_xbm.yaml", "sop_vit_baseline.yaml")
    dinov2 = _changes("sop_vit_dinov2_xbm.yaml", "sop_vit_dinov2_baseline.yaml")
    dino.pop("OUTPUT_DIR"), dinov2.pop("OUTPUT_DIR")
    assert dino == dinov2


# ---------------------------------------------------------------- two steps on each dataset's format
def _image(root: Path, path: str, label: int, index: int) -> None:
    write_image(root / path, color=(37 * label % 256, 91 * index % 256, 150), size=(48, 40))


def make_sop_tree(root: Path) -> None:
    """Ebay_train.txt / Ebay_test.txt: 4 training classes of 3 images, 3 test classes of 2."""
    header = "image_id class_id super_class_id path"
    splits = {"train": [(c, i) for c in (11, 12, 13, 14) for i in range(3)],
              "test": [(c, i) for c in (21, 22, 23) for i in range(2)]}
    for split, rows in splits.items():
        lines = [header]
        for n, (c, i) in enumerate(rows, 1):
            path = f"bicycle_final/{c}_{i}.JPG"
            lines.append(f"{n} {c} 1 {path}")
            _image(root, path, c, n)
        write_text(root / f"Ebay_{split}.txt", lines)


def make_cub_tree(root: Path) -> None:
    """images.txt + image_class_labels.txt: classes 1-4 (train, 3 images each) and 101-103 (test, 2 each)."""
    images = [(c, i) for c in (1, 2, 3, 4) for i in range(3)] + [(c, i) for c in (101, 102, 103) for i in range(2)]
    rows = [(n, f"{c:03d}.Bird_{c}/B_{c}_{i}.jpg", c) for n, (c, i) in enumerate(images, 1)]
    write_text(root / "images.txt", [f"{n} {p}" for n, p, _ in rows])
    write_text(root / "image_class_labels.txt", [f"{n} {c}" for n, _, c in rows])
    for n, path, c in rows:
        _image(root / "images", path, c, n)


def make_cars_tree(root: Path) -> None:
    """cars_annos.mat: classes 1-4 (train, 3 images each) and 99-101 (test, 2 each)."""
    classes = [c for c in (1, 2, 3, 4) for _ in range(3)] + [c for c in (99, 100, 101) for _ in range(2)]
    make_cars(root, classes=tuple(classes), tests=tuple(i % 2 for i in range(len(classes))))


def make_inshop_tree(root: Path) -> None:
    """Eval/list_eval_partition.txt: 4 training items of 3 images, 3 test items in query and gallery."""
    rows = [(f"img/WOMEN/Dresses/id_{c:08d}/{i:02d}_1_front.jpg", f"id_{c:08d}", "train")
            for c in (1, 2, 3, 4) for i in range(3)]
    for c in (7, 8, 9):
        rows += [(f"img/MEN/Denim/id_{c:08d}/01_1_front.jpg", f"id_{c:08d}", "query"),
                 (f"img/MEN/Denim/id_{c:08d}/01_2_side.jpg", f"id_{c:08d}", "gallery")]
    make_inshop(root, rows=rows)


TREES = {"cub200": make_cub_tree, "cars196": make_cars_tree, "sop": make_sop_tree, "inshop": make_inshop_tree}
# one 2-step run stays in make test; the other ViT-S builds are heavy (pytest.ini)
FAST_RUN = "sop_vit_xbn.yaml"


def _two_step_run(name, tmp_path):
    from xbm.engine.defaults import DefaultTrainer

    ds = name.split("_vit_")[0]
    root = tmp_path / "data"
    TREES[ds](root)
    base = _cfg(name)
    size = 56 if "dinov2" in name else 64  # whole patches: 4 x 4 of 14 px, 4 x 4 of 16 px
    opts = ["OUTPUT_DIR", str(tmp_path / "run"), "DATA.ROOT", str(root), "MODEL.DEVICE", "cpu",
            "MODEL.BACKBONE.PRETRAINED", "", "SOLVER.AMP", "none", "DATA.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0",
            "INPUT.IMAGE_SIZE", str(size), "INPUT.RESIZE", "64", "SOLVER.MAX_ITERS", "2", "TEST.EVAL_PERIOD", "2",
            "SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.LOG_PERIOD", "1", "TEST.BATCH_SIZE", "8"]
    if base.XBM.ENABLE:  # batches of 2 classes x 4; the memory (-1: the 12 training images) from step 2
        opts += ["XBM.START_ITERATION", "1"] + (["XBM.SIZE", "16"] if base.XBM.SIZE > 0 else [])
    else:  # batches of 4 classes x 2 (CUB and Cars take 9 per class)
        opts += ["DATA.NUM_INSTANCES", "2"]
    trainer = DefaultTrainer(load_cfg(f"configs/{name}", opts))
    model = trainer.model
    assert model.backbone.model_name == base.MODEL.BACKBONE.NAME.split(":", 1)[1]
    assert model.head.fc.out_features == 384
    frozen = {k: v.detach().clone() for k, v in model.backbone.model.patch_embed.named_parameters()}
    assert frozen and not any(p.requires_grad for p in model.backbone.model.patch_embed.parameters())
    block = model.backbone.model.blocks[0].attn.qkv.weight.detach().clone()
    batches = iter(trainer.train_loader())
    steps = []
    for _ in range(2):
        images, labels, item_ids = next(batches)
        assert tuple(images.shape) == (8, 3, size, size)
        steps.append(trainer.train_step(images, labels, item_ids))
        trainer.iteration += 1
    for parts in steps:
        assert math.isfinite(float(parts["loss/total"]))
    if base.XBM.ENABLE:
        assert "loss/memory" not in steps[0] and "loss/memory" in steps[1]
        assert trainer.cfg.XBM.SIZE == (12 if base.XBM.SIZE == -1 else 16)  # -1: one entry per training image
        assert len(trainer.objective.memory) == min(16, trainer.cfg.XBM.SIZE)
    for key, value in model.backbone.model.patch_embed.named_parameters():
        assert torch.equal(value, frozen[key]), key  # FREEZE_PATCH_EMBED: never updated
    assert not torch.equal(model.backbone.model.blocks[0].attn.qkv.weight, block)
    results = trainer.evaluate()
    assert 0.0 <= results["test"]["R@1"] <= 1.0


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == FAST_RUN else pytest.mark.heavy)
                                  for n in EXPERIMENTS])
def test_two_training_steps_on_a_fake_tree_of_its_dataset(name, tmp_path):
    _two_step_run(name, tmp_path)
