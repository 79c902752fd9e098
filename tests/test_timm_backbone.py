"""timm models as backbones (MODEL.BACKBONE.NAME timm:<name>): building, weights from files and the local
Hugging Face cache, the pixels timm's data config asks for, pooling, the head, and every error in one
sentence. The references are timm's own: its forward, its checkpoint loading, its transforms, its layer
grouping. Offline: every weight file is written here from a randomly initialised timm model."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from xbm.config import get_cfg, load_cfg  # noqa: E402
from xbm.data.transforms import build_transforms, input_geometry  # noqa: E402
from xbm.engine.solver import parameter_groups  # noqa: E402
from xbm.modeling import build_model, embedding_dim  # noqa: E402
from xbm.modeling.backbones import PretrainedWeightsError, build_backbone  # noqa: E402

TINY = "timm:test_vit"  # timm's own test model: a 64-wide ViT at 160 px, 0.4 M parameters


def _cfg(name=TINY, *opts, **timm_keys):
    """A checked config of a timm backbone on a list dataset (no data is read)."""
    cfg = load_cfg(None, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", name, "DATA.NAME", "list", "DATA.ROOT", "/nowhere",
                          "INPUT.IMAGE_SIZE", "0", "INPUT.RESIZE", "0", *opts], check=False)
    cfg.defrost()
    for key, value in timm_keys.items():
        cfg.MODEL.BACKBONE.TIMM[key] = value
    cfg.freeze()
    return cfg


def _random_timm(name="test_vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(size=160, count=2, seed=1):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_the_backbone_is_timms_model_with_its_weights_from_a_safetensors_file(tmp_path):
    source = _random_timm(num_classes=0)
    path = tmp_path / "vit.safetensors"
    _save_safetensors(source.state_dict(), path)
    backbone = build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(path))).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(backbone(x), source(x))  # the class token after the final norm, as timm returns it
    assert backbone.out_features == 64


def test_a_classifier_file_in_a_wrapper_with_a_module_prefix_loads_with_its_head_dropped(tmp_path, caplog):
    source = _random_timm(num_classes=10)  # an ImageNet-style file: its classifier `head` the backbone lacks
    state = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    for name in ("vit.pth", "vit.bin"):
        torch.save(state, tmp_path / name)
        with caplog.at_level(logging.WARNING):
            backbone = build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(tmp_path / name))).eval()
        assert "head.weight" in caplog.text and "head.bias" in caplog.text
        x = _images()
        with torch.no_grad():
            assert torch.equal(backbone(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_weights_of_another_size_are_resampled_as_timm_loads_them(tmp_path, caplog):
    """160 px weights into a 64 px ViT: the position embedding is interpolated, and logged; the result is
    what timm's own loader (its checkpoint filter) gives for the same file."""
    source = _random_timm(num_classes=0)
    path = tmp_path / "vit160.safetensors"
    _save_safetensors(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="xbm"):
        backbone = build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(path), "INPUT.IMAGE_SIZE", "64")).eval()
    assert "resampled" in caplog.text
    reference = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=64,
                                  pretrained_cfg_overlay={"file": str(path)}).eval()
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(backbone(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.0.attn.qkv.weight"), "1 missing keys: blocks.0.attn.qkv.weight"),
    (lambda s: s.update({"blocks.9.mlp.fc1.weight": torch.zeros(2, 2)}), "1 unexpected keys: blocks.9.mlp.fc1.weight"),
    (lambda s: s.update({"cls_token": torch.zeros(1, 1, 32)}), r"1 shape mismatches .*cls_token \(1, 1, 32\) vs \(1, 1, 64\)"),
])
def test_a_file_that_does_not_fit_names_the_keys(tmp_path, edit, message):
    state = dict(_random_timm(num_classes=0).state_dict())
    edit(state)
    path = tmp_path / "bad.safetensors"
    _save_safetensors(state, path)
    with pytest.raises(ValueError, match=message):
        build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(path)))


def test_another_architectures_file_gives_counts_and_first_names(tmp_path):
    path = tmp_path / "convnext.safetensors"
    _save_safetensors(_random_timm("test_convnext", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(path)))
    text = str(err.value)
    assert str(path) in text and "unexpected keys: " in text and "missing keys: " in text and "in all)" in text
    assert "\n" not in text


def test_an_unreadable_file_is_one_sentence(tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(ValueError, match=f"cannot read {path}"):
        build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", str(path)))


def _fake_hub_cache(root, repo, state):
    """The layout huggingface_hub keeps a download in: models--org--name/{refs/main, snapshots/<rev>/file}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    _save_safetensors(state, snapshot / "model.safetensors")


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_hub_weights_come_from_the_local_cache_without_a_download(tmp_path, monkeypatch):
    import huggingface_hub

    source = _random_timm(num_classes=0)
    repo = timm.models.get_pretrained_cfg("test_vit").hf_hub_id  # timm/test_vit.r160_in1k
    _fake_hub_cache(tmp_path, repo, source.state_dict())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    backbone = build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", "hub")).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(backbone(x), source(x))


def test_hub_weights_missing_from_the_cache_stop_without_a_download(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    with pytest.raises(PretrainedWeightsError) as err:
        build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", "hub"))
    text = str(err.value)
    assert "timm/test_vit.r160_in1k" in text and str(tmp_path) in text and "HUB_DOWNLOAD True" in text


def test_imagenet_is_refused_for_a_timm_model():
    with pytest.raises(ValueError, match="use hub"):
        build_backbone(_cfg(TINY, "MODEL.BACKBONE.PRETRAINED", "imagenet"))


def test_an_unknown_name_names_it_and_the_closest_timm_names():
    with pytest.raises(ValueError) as err:
        load_cfg(None, ["MODEL.BACKBONE.NAME", "timm:vit_smal_patch16_224"])
    text = str(err.value)
    assert "'vit_smal_patch16_224'" in text and "vit_small_patch16_224" in text and "closest names" in text
    with pytest.raises(ValueError, match="knows no weights 'dinov9' for vit_small_patch16_224.*vit_small_patch16_224.dino"):
        load_cfg(None, ["MODEL.BACKBONE.NAME", "timm:vit_small_patch16_224.dinov9"])
    with pytest.raises(ValueError, match="names no model"):
        load_cfg(None, ["MODEL.BACKBONE.NAME", "timm:"])


def test_without_timm_the_run_stops_before_reading_data_naming_the_extra(monkeypatch, capsys, tmp_path):
    from xbm.cli import train_main

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(SystemExit) as stop:
        train_main(["MODEL.BACKBONE.NAME", "timm:vit_small_patch16_224.dino", "DATA.NAME", "sop",
                    "DATA.ROOT", str(tmp_path / "no_sop_here"), "OUTPUT_DIR", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[timm]'" in err and "no_sop_here" not in err


def test_the_pixels_are_timms_eval_transform():
    """INPUT.IMAGE_SIZE / RESIZE 0 and INTERPOLATION '': the test transform is timm's own for the weights
    (bicubic resize to 224 / 0.9 = 248, centre crop 224, ImageNet mean/std), value for value."""
    cfg = _cfg("timm:vit_small_patch16_224.dino", "DATA.NAME", "sop")
    assert input_geometry(cfg) == type(input_geometry(cfg))(224, 248, "bicubic")
    ours = build_transforms(cfg, train=False)
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg("vit_small_patch16_224.dino").to_dict())
    theirs = timm.data.create_transform(**config, is_training=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    assert torch.allclose(ours(image), theirs(image), atol=1e-6)
    dinov2 = _cfg("timm:vit_small_patch14_dinov2.lvd142m", "DATA.NAME", "sop")
    assert input_geometry(dinov2) == type(input_geometry(cfg))(518, 518, "bicubic")  # crop_pct 1.0


def test_a_vit_built_for_another_size_takes_the_configs_size():
    cfg = _cfg("timm:vit_small_patch14_dinov2.lvd142m", "INPUT.IMAGE_SIZE", "224")
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    assert tuple(backbone.model.patch_embed.grid_size) == (16, 16) and backbone.out_features == 384
    convnext = _cfg("timm:test_convnext", "INPUT.IMAGE_SIZE", "64")  # no img_size argument: any size works
    assert build_backbone(convnext).eval()(_images(64)).shape == (2, 64)


def test_pooling_follows_timm():
    x = _images()
    for pooling in ("token", "avg"):
        torch.manual_seed(0)
        backbone = build_backbone(_cfg(TINY, "MODEL.BACKBONE.POOLING", pooling)).eval()
        reference = _random_timm(num_classes=0, global_pool=pooling)
        with torch.no_grad():
            assert torch.equal(backbone(x), reference(x))
    with pytest.raises(ValueError, match="MODEL.BACKBONE.POOLING 'sum' does not fit timm model test_vit"):
        load_cfg(None, ["MODEL.BACKBONE.NAME", TINY, "MODEL.BACKBONE.POOLING", "sum", "INPUT.IMAGE_SIZE", "0"])


def test_head_dim_0_is_the_normalised_feature_and_sizes_the_memory():
    cfg = _cfg(TINY, "MODEL.HEAD.DIM", "0", "XBM.ENABLE", "True")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.dim == embedding_dim(cfg) == 64 and not list(model.head.parameters())
    x = _images()
    with torch.no_grad():
        features = model.backbone(x)
        assert torch.allclose(model(x), features / features.norm(dim=1, keepdim=True), atol=1e-6)
    from xbm.memory.build import build_memory

    assert build_memory(cfg).dim == 64
    assert embedding_dim(_cfg("timm:vit_small_patch16_224.dino", "MODEL.HEAD.DIM", "0")) == 384


def test_the_fine_tuning_switches():
    x = _images()
    torch.manual_seed(0)
    plain = build_backbone(_cfg(TINY))
    torch.manual_seed(0)
    switched = build_backbone(_cfg(TINY, FUSED_ATTN=False, GRAD_CHECKPOINTING=True, FREEZE_PATCH_EMBED=True))
    assert all(not p.requires_grad for p in switched.model.patch_embed.parameters())
    assert all(not m.fused_attn for m in switched.modules() if hasattr(m, "fused_attn"))
    assert switched.model.grad_checkpointing
    plain(x).sum().backward()
    switched(x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), switched.named_parameters()):
        if "patch_embed" in name:
            assert b.grad is None
        else:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_timm_keys_with_another_backbone_and_unknown_kwargs_are_refused():
    with pytest.raises(ValueError, match="MODEL.BACKBONE.TIMM.GRAD_CHECKPOINTING applies to timm backbones"):
        load_cfg(None, ["MODEL.BACKBONE.TIMM.GRAD_CHECKPOINTING", "True"])
    with pytest.raises(ValueError, match="SOLVER.LAYER_DECAY"):
        load_cfg(None, ["SOLVER.LAYER_DECAY", "0.75"])
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = TINY
    cfg.MODEL.BACKBONE.TIMM.KWARGS["depht"] = 2
    from xbm.config import check_cfg

    with pytest.raises(ValueError, match="MODEL.BACKBONE.TIMM.KWARGS.*depht"):
        check_cfg(cfg)
    with pytest.raises(ValueError, match="FREEZE_PATCH_EMBED: timm model test_convnext has no patch"):
        load_cfg(None, ["MODEL.BACKBONE.NAME", "timm:test_convnext", "MODEL.BACKBONE.TIMM.FREEZE_PATCH_EMBED", "True"])


def test_kwargs_come_from_yaml(tmp_path):
    path = tmp_path / "vit.yaml"
    path.write_text("MODEL:\n  BACKBONE:\n    NAME: timm:vit_tiny_patch16_224\n    TIMM:\n      KWARGS:\n"
                    "        img_size: 32\n        patch_size: 4\n        depth: 2\n        embed_dim: 32\n        num_heads: 2\n")
    cfg = load_cfg(str(path), ["INPUT.IMAGE_SIZE", "32"])
    backbone = build_backbone(cfg)
    assert len(backbone.model.blocks) == 2 and backbone.out_features == 32
    assert backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 32)


# ------------------------------------------------------------------ the optimizer's groups
def _groups_by_name(cfg, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in parameter_groups(cfg, model) for p in g["params"]}


def test_default_solver_keys_give_one_plain_parameter_list():
    model = build_model(_cfg(TINY))
    assert parameter_groups(_cfg(TINY), model) == [p for p in model.parameters() if p.requires_grad]


def test_no_decay_for_norms_biases_and_the_models_own_names_and_a_slower_backbone():
    cfg = _cfg(TINY, "SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.NO_DECAY_NORM_BIAS", "True",
               "SOLVER.BACKBONE_LR_FACTOR", "0.01")
    model = build_model(cfg)
    groups = _groups_by_name(cfg, model)
    for name, param in model.named_parameters():
        spared = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        lr = 0.01 * (0.01 if name.startswith("backbone.") else 1.0)
        assert groups[name] == (pytest.approx(lr), 0.0 if spared else 0.05), name
    assert groups["head.fc.weight"] == (pytest.approx(0.01), 0.05)
    assert groups["backbone.model.cls_token"][1] == 0.0 and groups["backbone.model.blocks.0.norm1.weight"][1] == 0.0


def test_layer_decay_scales_are_timms():
    cfg = _cfg(TINY, "SOLVER.BASE_LR", "0.1", "SOLVER.LAYER_DECAY", "0.5")
    model = build_model(cfg)
    groups = _groups_by_name(cfg, model)
    reference = timm.optim.param_groups_layer_decay(model.backbone.model, weight_decay=0.0, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in reference for p in g["params"]}
    for name, param in model.backbone.model.named_parameters():
        assert groups[f"backbone.model.{name}"][0] == pytest.approx(0.1 * scales[id(param)]), name
    assert groups["head.fc.weight"][0] == pytest.approx(0.1)
    # A ViT of L blocks, as timm groups it: the stem (patch embedding, tokens) at decay^L, block i at
    # decay^(L - 1 - i), the last block and the final norm at 1
    blocks = len(model.backbone.model.blocks)
    assert groups["backbone.model.patch_embed.proj.weight"][0] == pytest.approx(0.1 * 0.5 ** blocks)
    assert groups["backbone.model.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.1 * 0.5 ** (blocks - 1))
    assert groups["backbone.model.norm.weight"][0] == pytest.approx(0.1)


def test_tools_reading_a_checkpoint_never_read_the_initial_weights(tmp_path, monkeypatch):
    """xbm-eval / xbm-index on a machine whose Hugging Face cache lacks the hub weights the run started from:
    the checkpoint holds every weight, so the initial ones are neither read nor downloaded."""
    import huggingface_hub

    from xbm.checkpoint.config import config_of_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    cfg = _cfg(TINY, "MODEL.BACKBONE.PRETRAINED", "hub")
    with pytest.raises(PretrainedWeightsError):
        build_model(cfg)  # training from it needs the cache
    torch.manual_seed(0)
    trained = build_model(_cfg(TINY))
    path = tmp_path / "last.pth"
    torch.save({"iteration": 7, "config": cfg.dump(), "model": trained.state_dict()}, path)
    read = config_of_checkpoint(str(path))
    assert read.MODEL.BACKBONE.PRETRAINED == "" and read.MODEL.BACKBONE.NAME == TINY
    model = build_model(read)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
