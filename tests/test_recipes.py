"""The official-code options of the paper recipes (issue 12), each against a reference written
differently: torch's own ReduceLROnPlateau, a plain-loop sampler, a hand-written ResNet stem."""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from xbm.config import check_cfg, get_cfg, load_cfg
from xbm.data.sampler import ChunkedClassBatchSampler, MPerClassBatchSampler, sampler_class
from xbm.engine.solver import PlateauFactor
from xbm.modeling.backbones import ResNet
from xbm.modeling.head import EmbeddingHead


# ---------------------------------------------------------------- head initialisation
def test_official_head_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    head = EmbeddingHead(2048, 128, init="kaiming_fan_out")
    w = head.fc.weight.detach().numpy().ravel()
    # He normal over fan_out = 128 outputs: mean 0, std sqrt(2 / 128) = 0.125 (262,144 draws: se ~ 1.7e-4)
    assert w.std() == pytest.approx(math.sqrt(2 / 128), rel=0.01)
    assert abs(w.mean()) < 1e-3
    assert torch.count_nonzero(head.fc.bias) == 0
    # PyTorch's default: uniform on +-1/sqrt(fan_in), std 1/sqrt(3 * 2048), about 10x smaller
    default = EmbeddingHead(2048, 128).fc.weight.detach().numpy().ravel()
    assert np.abs(default).max() <= 1 / math.sqrt(2048)
    assert default.std() == pytest.approx(1 / math.sqrt(3 * 2048), rel=0.01)
    assert 9 < w.std() / default.std() < 11


def test_head_init_key_reaches_the_model_and_default_draws_are_unchanged():
    from xbm.modeling import build_model
    from xbm.modeling.backbones import build_backbone

    cfg = get_cfg()
    torch.manual_seed(3)
    default = build_model(cfg).head.fc.weight.detach().clone()
    # the default keeps nn.Linear's draws (Glyphs runs stay bit-identical): the same weights as a
    # bare layer created after the same backbone
    torch.manual_seed(3)
    build_backbone(cfg)
    assert torch.equal(default, nn.Linear(cfg.MODEL.BACKBONE.CONVNET_WIDTHS[-1], cfg.MODEL.HEAD.DIM).weight)
    cfg.MODEL.HEAD.INIT = "kaiming_fan_out"
    torch.manual_seed(3)
    official = build_model(cfg).head.fc
    assert torch.count_nonzero(official.bias) == 0
    assert official.weight.std().item() > 3 * default.std().item()
    cfg.MODEL.HEAD.INIT = "xavier"
    with pytest.raises(ValueError, match="MODEL.HEAD.INIT"):
        build_model(cfg)


# ---------------------------------------------------------------- ResNet stem
def test_resnet_without_stem_relu_matches_a_hand_written_forward():
    torch.manual_seed(0)
    net = ResNet("resnet18", stem_relu=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = net.bn1(net.conv1(x))
        assert (y < 0).any()  # the ReLU would change something
        y = torch.nn.functional.max_pool2d(y, kernel_size=3, stride=2, padding=1)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
        expected = y.mean(dim=(2, 3))
        assert torch.allclose(net(x), expected, atol=1e-6)
        net.stem_relu = True
        assert not torch.allclose(net(x), expected, atol=1e-3)


def test_stem_relu_key_applies_to_resnets_only():
    from xbm.modeling.backbones import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.STEM_RELU = "resnet18", False
    assert build_backbone(cfg).stem_relu is False
    cfg.MODEL.BACKBONE.NAME = "convnet"
    with pytest.raises(ValueError, match="MODEL.BACKBONE.STEM_RELU"):
        build_backbone(cfg)


# ---------------------------------------------------------------- the official class sampler
# Classes of 2, 4, 6 and 12 images with m = 2: 1, 2, 3 and 6 chunks; batches of 2 classes.
SIZES = [2, 4, 6, 12]
LABELS = np.repeat(np.arange(len(SIZES)), SIZES)


def _first_batch_inclusion_reference(chunks, per_batch):
    """P(class in the first batch): ordered draws without replacement, each proportional to chunks (plain loop)."""
    total = sum(chunks)
    inclusion = [0.0] * len(chunks)
    assert per_batch == 2
    for i in range(len(chunks)):
        for j in range(len(chunks)):
            if i != j:
                p = chunks[i] / total * chunks[j] / (total - chunks[i])
                inclusion[i] += p
                inclusion[j] += p
    return inclusion


def test_official_sampler_draws_classes_in_proportion_to_their_chunks():
    n = 3000
    counts = Counter()
    for seed in range(n):
        batch = ChunkedClassBatchSampler(LABELS, 4, 2, seed=seed).batch(0)
        counts.update(set(LABELS[batch].tolist()))
    expected = _first_batch_inclusion_reference([s // 2 for s in SIZES], 2)
    for c, p in enumerate(expected):
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts[c] / n - p) < 4 * se, (c, counts[c] / n, p)
    # the uniform sampler would put every class in half the first batches; this one does not
    assert expected[3] > 0.8 and expected[0] < 0.25


def _epoch_length_reference(chunks, per_batch, rng):
    """Batches in one epoch of the official algorithm, drawn with Python's random in a plain loop."""
    left = list(chunks)
    batches = 0
    while sum(1 for c in left if c > 0) >= per_batch:
        chosen = []
        for _ in range(per_batch):
            weights = [0 if (k in chosen or c == 0) else c for k, c in enumerate(left)]
            r, acc = rng.random() * sum(weights), 0.0
            for k, w in enumerate(weights):
                acc += w
                if w > 0 and r < acc:
                    chosen.append(k)
                    break
        for k in chosen:
            left[k] -= 1
        batches += 1
    return batches


def test_official_sampler_epoch_length_distribution_matches_a_plain_loop():
    import random

    rng = random.Random(0)
    chunks = [s // 2 for s in SIZES]
    n = 2000
    reference = Counter(_epoch_length_reference(chunks, 2, rng) for _ in range(n))
    ours = Counter(len(ChunkedClassBatchSampler(LABELS, 4, 2, seed=s).epoch_batches(0)) for s in range(n))
    assert set(ours) <= set(reference) | {max(reference)}
    for length in set(reference) | set(ours):
        p = (reference[length] + ours[length]) / (2 * n)
        se = math.sqrt(2 * p * (1 - p) / n) + 1e-9
        assert abs(reference[length] / n - ours[length] / n) < 4 * se + 1e-3, (length, reference, ours)


def test_official_sampler_batches_are_chunks_of_one_class_and_use_each_image_once_per_epoch():
    sampler = ChunkedClassBatchSampler(LABELS, 4, 2, seed=7)
    for epoch in range(3):
        used = Counter()
        for batch in sampler.epoch_batches(epoch):
            classes = LABELS[batch]
            assert len(batch) == 4 and classes[0] == classes[1] and classes[2] == classes[3]
            assert classes[0] != classes[2]
            used.update(batch)
        # sizes are multiples of m here: no padding, so no image appears twice in an epoch
        assert max(used.values()) == 1


def test_official_sampler_stream_resumes_and_splits_over_ranks():
    full = ChunkedClassBatchSampler(LABELS, 4, 2, seed=1)
    stream = [full.batch(i) for i in range(40)]  # several epochs of 4-6 batches
    resumed = iter(ChunkedClassBatchSampler(LABELS, 4, 2, seed=1, start_batch=17))
    assert [next(resumed) for _ in range(23)] == stream[17:]
    ranks = [iter(ChunkedClassBatchSampler(LABELS, 4, 2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [next(ranks[i % 2]) for i in range(20)] == stream[:20]


def test_sampler_key():
    assert sampler_class("uniform") is MPerClassBatchSampler
    assert sampler_class("official") is ChunkedClassBatchSampler
    with pytest.raises(ValueError, match="DATA.SAMPLER"):
        sampler_class("random")


# ---------------------------------------------------------------- reduce on plateau
SCORES = [0.50, 0.52, 0.52, 0.5201, 0.51, 0.50, 0.49, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53,
          0.53, 0.53, 0.53, 0.53, 0.53, 0.53, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60]


def test_plateau_factor_matches_torch_reduce_lr_on_plateau():
    base_lr = 1e-4
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr)
    # the official settings (research-xbm solver/build.py): mode max, patience 4, threshold 1e-3, cooldown 2
    torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=0.1, patience=4, threshold=0.001, cooldown=2, min_lr=base_lr / 20)
    ours = PlateauFactor(factor=0.1, patience=4, threshold=0.001, cooldown=2, min_factor=0.05, base_lr=base_lr)
    lrs_torch, lrs_ours = [], []
    for score in SCORES:
        torch_sched.step(score)
        ours.step(score)
        lrs_torch.append(opt.param_groups[0]["lr"])
        lrs_ours.append(base_lr * ours.scale)
    assert lrs_ours == pytest.approx(lrs_torch, rel=1e-12)
    assert lrs_torch[-1] == pytest.approx(base_lr / 20)  # reduced twice, the second time to the floor
    assert len(set(lrs_torch)) == 3


def _plateau_trainer(glyph_root, tmp_path, *extra):
    from xbm.engine.defaults import DefaultTrainer

    cfg = load_cfg("configs/glyphs_xbm.yaml", [
        "OUTPUT_DIR", str(tmp_path / "run"), "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4",
        "MODEL.DEVICE", "cpu", "MODEL.HEAD.DIM", "16", "DATA.BATCH_SIZE", "8", "XBM.SIZE", "32",
        "SOLVER.MAX_ITERS", "5", "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "1",
        "SOLVER.CHECKPOINT_PERIOD", "0", "DATA.VAL_FRACTION", "0.3", *extra])
    return DefaultTrainer(cfg)


def _scripted(trainer, val_scores, test_scores):
    """Replace the evaluator by one returning the given scores, one evaluation per call."""
    scores = iter(zip(val_scores, test_scores))

    def evaluator(model):
        val, test = next(scores)
        return {"val": {"R@1": val, "MAP@R": val / 2}, "test": {"R@1": test, "MAP@R": test / 2}}
    trainer.evaluator = evaluator


def test_plateau_schedule_is_driven_by_the_validation_split(glyph_root, tmp_path):
    trainer = _plateau_trainer(glyph_root, tmp_path, "SOLVER.SCHEDULER", "plateau",
                               "SOLVER.PLATEAU.PATIENCE", "1", "SOLVER.PLATEAU.COOLDOWN", "0")
    # validation stalls from the 2nd evaluation while test keeps improving: the rate drops after
    # two evaluations without improvement, as torch's rule with patience 1 says
    _scripted(trainer, [0.5, 0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5])
    lrs = []
    for _ in range(5):
        trainer.evaluate()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 5e-5])
    assert trainer.checkpoint_state()["plateau"]["scale"] == pytest.approx(0.05)


def test_plateau_on_validation_needs_a_validation_split():
    cfg = get_cfg()
    cfg.SOLVER.SCHEDULER, cfg.TEST.EVAL_PERIOD = "plateau", 1000
    with pytest.raises(ValueError, match="DATA.VAL_FRACTION"):
        check_cfg(cfg)
    cfg.SOLVER.PLATEAU.SPLIT = "test"  # asked for explicitly: allowed
    check_cfg(cfg)
    cfg.TEST.EVAL_PERIOD = 0
    with pytest.raises(ValueError, match="TEST.EVAL_PERIOD"):
        check_cfg(cfg)


def test_report_best_on_test_is_labelled_optimistic_and_leaves_best_pth_to_validation(glyph_root, tmp_path):
    trainer = _plateau_trainer(glyph_root, tmp_path, "TEST.REPORT_BEST_ON_TEST", "True",
                               "TEST.SELECT_METRIC", "MAP@R")
    _scripted(trainer, [0.9, 0.1, 0.2], [0.3, 0.8, 0.4])
    for i in range(3):
        trainer.iteration = i + 1
        trainer.evaluate()
    report = json.loads((tmp_path / "run" / "best_on_test_OPTIMISTIC.json").read_text())
    assert report["optimistic"] is True and report["iteration"] == 2 and report["score"] == pytest.approx(0.4)
    assert report["chosen_on"] == "test MAP@R"
    assert trainer.checkpoint_state()["hooks"]["BestCheckpointer"]["best_metric"] == pytest.approx(0.45)  # best.pth: validation MAP@R of evaluation 1
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pth", weights_only=True)
    assert best["iteration"] == 1
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "OPTIMISTIC" in log


def test_no_best_on_test_report_by_default(glyph_root, tmp_path):
    trainer = _plateau_trainer(glyph_root, tmp_path)
    _scripted(trainer, [0.5], [0.5])
    trainer.evaluate()
    assert not (tmp_path / "run" / "best_on_test_OPTIMISTIC.json").exists()


# ---------------------------------------------------------------- when the memory starts filling
@pytest.mark.parametrize("fill_from, expected", [("iteration_0", [8, 16, 24, 32, 32]),
                                                 ("start_iteration", [0, 0, 0, 8, 16])])
def test_memory_fill_from(glyph_root, tmp_path, fill_from, expected):
    from xbm.engine.defaults import DefaultTrainer

    cfg = load_cfg("configs/glyphs_xbm.yaml", [
        "OUTPUT_DIR", str(tmp_path / "run"), "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4",
        "MODEL.DEVICE", "cpu", "MODEL.HEAD.DIM", "16", "DATA.BATCH_SIZE", "8", "XBM.SIZE", "32",
        "XBM.START_ITERATION", "3", "XBM.FILL_FROM", fill_from, "SOLVER.MAX_ITERS", "5",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "0"])
    trainer = DefaultTrainer(cfg)
    batches = iter(trainer.train_loader())
    sizes, memory_losses = [], []
    for _ in range(5):
        images, labels, _ = next(batches)
        parts = trainer.train_step(images, labels)
        trainer.iteration += 1
        sizes.append(len(trainer.objective.memory))
        memory_losses.append("loss/memory" in parts)
    assert sizes == expected
    assert memory_losses == [False, False, False, True, True]  # the loss starts at 3 either way


def test_bad_fill_from_is_refused():
    cfg = get_cfg()
    cfg.XBM.FILL_FROM = "later"
    with pytest.raises(ValueError, match="XBM.FILL_FROM"):
        check_cfg(cfg)


# ---------------------------------------------------------------- every paper setting cites its source
SELF_EXPLANATORY = {"OUTPUT_DIR", "DATA.NAME", "DATA.ROOT"}
PAPER_CONFIGS = sorted(
    [n for n in os.listdir("configs") if n.endswith(".yaml") and not n.startswith("glyphs")]
    + [f"base/{n}" for n in os.listdir("configs/base") if n.endswith(".yaml")])


def _leaf_lines(path):
    """(full key, line) for every `key: value` line of a config file, from its indentation."""
    stack = []
    for line in open(path).read().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        key, _, value = line.strip().partition(":")
        stack = stack[:indent] + [key]
        if value.split("#")[0].strip():
            yield ".".join(stack), line


def _base_of(name):
    """The config file `configs/<name>` names as _BASE_ (relative to configs/), or None."""
    base = (yaml.safe_load(open(f"configs/{name}")) or {}).get("_BASE_")
    return None if base is None else os.path.relpath(os.path.join(os.path.dirname(f"configs/{name}"), base), "configs")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_setting_cites_a_source_where_it_is_set(name):
    """A line that changes what the file inherits (from its _BASE_, or the defaults) says where the value
    comes from; a setting inherited from a base is cited in the base (tested as its own file here)."""
    base = _base_of(name)
    cfg, inherited = load_cfg(f"configs/{name}", []), load_cfg(f"configs/{base}", []) if base else get_cfg()
    missing = []
    for key, line in _leaf_lines(f"configs/{name}"):
        if key == "_BASE_":
            continue
        value, inherited_value = cfg, inherited
        for part in key.split("."):
            value, inherited_value = value[part], inherited_value[part]
        if key not in SELF_EXPLANATORY and value != inherited_value and "#" not in line:
            missing.append(key)
    assert not missing, f"{name}: no source beside {missing}"
    assert "DESIGN" not in open(f"configs/{name}").read()


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# Each config and what it changes in its _BASE_ (merged values): a paper's variant is its base plus
# these keys and nothing else, so a baseline and its memory run differ only in the memory.
MEMORY_ON = {"OUTPUT_DIR", "XBM.ENABLE"}
DATASET = {"OUTPUT_DIR", "DATA.NAME", "DATA.ROOT", "XBM.SIZE"}
XBN_SCHEDULE = {"SOLVER.MAX_ITERS", "SOLVER.STEPS", "SOLVER.HEAD_WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD",
                "TEST.EVAL_PERIOD"}
AXBN = {"OUTPUT_DIR", "XBM.ADAPT.NAME", "XBM.ADAPT.KALMAN_INTERVAL"}  # q, p0 and r are the defaults
INHERITANCE = {
    "glyphs_xbm.yaml": ("glyphs_baseline.yaml", MEMORY_ON),
    "glyphs_xbn.yaml": ("glyphs_xbm.yaml", {"OUTPUT_DIR", "XBM.ADAPT.NAME"}),
    "glyphs_axbn.yaml": ("glyphs_xbn.yaml", {"OUTPUT_DIR", "XBM.ADAPT.NAME"}),  # the gain every step, as the default
    "sop_baseline.yaml": ("base/xbm_official_r50.yaml", DATASET),
    "sop_xbm_official.yaml": ("sop_baseline.yaml", MEMORY_ON | {
        "MODEL.BACKBONE.STEM_RELU", "DATA.SAMPLER", "DATA.VAL_FRACTION", "SOLVER.PLATEAU.SPLIT", "TEST.SELECT_METRIC",
        "TEST.REPORT_BEST_ON_TEST"}),
    "sop_xbm.yaml": ("sop_baseline.yaml", MEMORY_ON | {
        "DATA.VAL_FRACTION", "XBM.SIZE", "SOLVER.BASE_LR", "SOLVER.MAX_ITERS", "SOLVER.SCHEDULER", "SOLVER.STEPS"}),
    "sop_bninception_baseline.yaml": ("sop_baseline.yaml", {"OUTPUT_DIR", "MODEL.BACKBONE.NAME", "MODEL.HEAD.DIM"}),
    "sop_bninception_xbm.yaml": ("sop_bninception_baseline.yaml", MEMORY_ON),
    "inshop_baseline.yaml": ("base/xbm_official_r50.yaml", DATASET),
    "inshop_xbm.yaml": ("inshop_baseline.yaml", MEMORY_ON),
    "deepfashion2_baseline.yaml": ("base/xbm_official_r50.yaml", DATASET),
    "deepfashion2_xbm.yaml": ("deepfashion2_baseline.yaml", MEMORY_ON),
    "sop_xbn.yaml": ("base/xbn_r50.yaml", DATASET | XBN_SCHEDULE),
    "sop_axbn.yaml": ("sop_xbn.yaml", AXBN),
    "inshop_xbn.yaml": ("base/xbn_r50.yaml", DATASET | XBN_SCHEDULE),
    "inshop_axbn.yaml": ("inshop_xbn.yaml", AXBN),
    "deepfashion2_xbn.yaml": ("base/xbn_r50.yaml", DATASET | XBN_SCHEDULE),
    "deepfashion2_axbn.yaml": ("deepfashion2_xbn.yaml", AXBN),
    "cub200_baseline.yaml": ("base/ms_loss_bninception.yaml", DATASET),
    "cub200_xbm.yaml": ("cub200_baseline.yaml", MEMORY_ON | {"XBM.START_ITERATION", "XBM.FILL_FROM"}),
    "cars196_baseline.yaml": ("base/ms_loss_bninception.yaml", DATASET),
    "cars196_xbm.yaml": ("cars196_baseline.yaml", MEMORY_ON | {"XBM.START_ITERATION", "XBM.FILL_FROM"}),
    "glyphs_vit_baseline.yaml": ("glyphs_baseline.yaml", {
        "OUTPUT_DIR", "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.POOLING", *(f"MODEL.BACKBONE.TIMM.KWARGS.{k}" for k in (
            "img_size", "patch_size", "depth", "embed_dim", "num_heads")), "LOSS.CONTRASTIVE.REDUCTION",
        "SOLVER.OPTIMIZER", "SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.NO_DECAY_NORM_BIAS", "SOLVER.WARMUP_ITERS",
        "SOLVER.MAX_ITERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD"}),
    "glyphs_vit_xbm.yaml": ("glyphs_vit_baseline.yaml", MEMORY_ON),
    "glyphs_vit_xbn.yaml": ("glyphs_vit_xbm.yaml", {"OUTPUT_DIR", "XBM.ADAPT.NAME"}),
}


def test_every_experiment_is_its_base_plus_its_own_keys():
    experiments = sorted(n for n in os.listdir("configs") if n.endswith(".yaml"))
    # the ViT-S/16 recipes (configs/*_vit_*.yaml but Glyphs') are checked the same way in tests/test_vit_recipes.py
    vit_recipes = {n for n in experiments if "_vit_" in n and not n.startswith("glyphs_")}
    assert sorted(INHERITANCE) == [n for n in experiments if n != "glyphs_baseline.yaml" and n not in vit_recipes]
    for name, (base, changed) in INHERITANCE.items():
        assert _base_of(name) == base, name
        merged = dict(_leaves(yaml.safe_load(load_cfg(f"configs/{name}").dump())))
        inherited = dict(_leaves(yaml.safe_load(load_cfg(f"configs/{base}").dump())))
        # (a key of TIMM.KWARGS exists only where a file sets it)
        assert {k for k in merged if merged[k] != inherited.get(k, KeyError)} == changed, name
        # a variant is a few lines: what it changes, not a copy of its base (the AXBN block also spells
        # out q, p0 and r, the defaults, to cite them)
        settings = [key for key, _ in _leaf_lines(f"configs/{name}") if key != "_BASE_"]
        assert len(settings) <= len(changed) + 4, (name, settings)


def test_official_sop_config_is_the_official_behaviour():
    cfg = load_cfg("configs/sop_xbm_official.yaml", [])
    assert (cfg.DATA.SAMPLER, cfg.MODEL.BACKBONE.STEM_RELU, cfg.SOLVER.PLATEAU.SPLIT) == ("official", False, "test")
    assert cfg.TEST.REPORT_BEST_ON_TEST and cfg.TEST.SELECT_METRIC == "MAP@R" and cfg.DATA.VAL_FRACTION == 0
    assert cfg.SOLVER.SCHEDULER == "plateau" and cfg.XBM.SIZE == 55000 and cfg.SOLVER.BASE_LR == 1e-4
    paper = load_cfg("configs/sop_xbm.yaml", [])
    assert (paper.DATA.SAMPLER, paper.MODEL.BACKBONE.STEM_RELU) == ("uniform", True)
    # the paper's SOP solver as research-xbm issue #12 quotes it: memory ratio 1, 3e-4, x0.1 at 24k of 34k
    assert (paper.XBM.SIZE, paper.SOLVER.BASE_LR, paper.SOLVER.SCHEDULER, tuple(paper.SOLVER.STEPS),
            paper.SOLVER.MAX_ITERS) == (-1, 3e-4, "step", (24000,), 34000)
    for c in (cfg, paper):
        assert tuple(c.INPUT.CROP_SCALE) == (0.2, 1.0) and c.MODEL.HEAD.INIT == "kaiming_fan_out"
        assert c.XBM.FILL_FROM == "start_iteration"
