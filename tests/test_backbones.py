"""Backbones: shapes, BN-Inception's port naming and wiring, pretrained loading, frozen BatchNorm."""
from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
from torch.nn import functional as F
from torchvision import models

from xbm.config import get_cfg
from xbm.modeling.backbones import BNInception, GlobalPool, PretrainedWeightsError, build_backbone
from xbm.modeling.backbones import pretrained as pretrained_module


def backbone_cfg(name, **overrides):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = name
    for key, value in overrides.items():
        setattr(cfg.MODEL.BACKBONE, key, value)
    return cfg


# -- the BN-Inception port's layers, transcribed from pretrainedmodels' bninception.py -----------------
# conv name -> (in_channels, out_channels, kernel); every conv has a bias and a BatchNorm "<name>_bn".
PORT_STEM = {"conv1_7x7_s2": (3, 64, 7), "conv2_3x3_reduce": (64, 64, 1), "conv2_3x3": (64, 192, 3)}
PORT_BLOCKS = """
3a 192: 1x1 64, 3x3_reduce 64, 3x3 64/64, double_3x3_reduce 64, double_3x3_1 64/96, double_3x3_2 96/96, pool_proj 32
3b 256: 1x1 64, 3x3_reduce 64, 3x3 64/96, double_3x3_reduce 64, double_3x3_1 64/96, double_3x3_2 96/96, pool_proj 64
3c 320: 3x3_reduce 128, 3x3 128/160, double_3x3_reduce 64, double_3x3_1 64/96, double_3x3_2 96/96
4a 576: 1x1 224, 3x3_reduce 64, 3x3 64/96, double_3x3_reduce 96, double_3x3_1 96/128, double_3x3_2 128/128, pool_proj 128
4b 576: 1x1 192, 3x3_reduce 96, 3x3 96/128, double_3x3_reduce 96, double_3x3_1 96/128, double_3x3_2 128/128, pool_proj 128
4c 576: 1x1 160, 3x3_reduce 128, 3x3 128/160, double_3x3_reduce 128, double_3x3_1 128/160, double_3x3_2 160/160, pool_proj 128
4d 608: 1x1 96, 3x3_reduce 128, 3x3 128/192, double_3x3_reduce 160, double_3x3_1 160/192, double_3x3_2 192/192, pool_proj 128
4e 608: 3x3_reduce 128, 3x3 128/192, double_3x3_reduce 192, double_3x3_1 192/256, double_3x3_2 256/256
5a 1056: 1x1 352, 3x3_reduce 192, 3x3 192/320, double_3x3_reduce 160, double_3x3_1 160/224, double_3x3_2 224/224, pool_proj 128
5b 1024: 1x1 352, 3x3_reduce 192, 3x3 192/320, double_3x3_reduce 192, double_3x3_1 192/224, double_3x3_2 224/224, pool_proj 128
"""


def port_convs() -> dict[str, tuple[int, int, int]]:
    convs = dict(PORT_STEM)
    for line in PORT_BLOCKS.strip().splitlines():
        head, body = line.split(":")
        block, block_in = head.split()
        for part in body.split(","):
            branch, channels = part.split()
            cin, cout = channels.split("/") if "/" in channels else (block_in, channels)
            kernel = 3 if branch in ("3x3", "double_3x3_1", "double_3x3_2") else 1
            convs[f"inception_{block}_{branch}"] = (int(cin), int(cout), kernel)
    return convs


def port_state_dict() -> dict[str, torch.Tensor]:
    """A file shaped like bn_inception-52deb4733.pth: BN vectors as (1, C), no num_batches_tracked."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, (cin, cout, k) in port_convs().items():
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=gen) * 0.1
        state[f"{name}_bn.weight"] = 1 + 0.1 * torch.randn(1, cout, generator=gen)
        state[f"{name}_bn.bias"] = 0.1 * torch.randn(1, cout, generator=gen)
        state[f"{name}_bn.running_mean"] = 0.1 * torch.randn(1, cout, generator=gen)
        state[f"{name}_bn.running_var"] = 1 + torch.rand(1, cout, generator=gen)
    state["last_linear.weight"] = torch.randn(1000, 1024, generator=gen) * 0.01
    state["last_linear.bias"] = torch.zeros(1000)
    return state


def test_bninception_keys_equal_the_port_naming():
    convs = port_convs()
    assert len(convs) == 69
    suffixes = (".weight", ".bias", "_bn.weight", "_bn.bias", "_bn.running_mean", "_bn.running_var")
    expected = {f"{name}{s}" for name in convs for s in suffixes}
    assert len(expected) + 2 == 416  # + last_linear.weight/bias, the classifier we drop
    own = BNInception().state_dict()
    assert {k for k in own if not k.endswith("num_batches_tracked")} == expected
    for name, (cin, cout, k) in convs.items():
        assert own[f"{name}.weight"].shape == (cout, cin, k, k)
        assert own[f"{name}_bn.running_var"].shape == (cout,)


def reference_bninception(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The port's forward pass written out with functional ops on its state dict (eval mode)."""
    convs = port_convs()

    def unit(name, t, stride=1):
        k = convs[name][2]
        t = F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], stride=stride, padding=k // 2)
        bn = {p: state[f"{name}_bn.{p}"].flatten() for p in ("weight", "bias", "running_mean", "running_var")}
        return F.relu(F.batch_norm(t, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-5))

    x = F.max_pool2d(unit("conv1_7x7_s2", x, stride=2), 3, 2, ceil_mode=True)
    x = F.max_pool2d(unit("conv2_3x3", unit("conv2_3x3_reduce", x)), 3, 2, ceil_mode=True)
    for block in ("3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b"):
        p = f"inception_{block}"
        if block in ("3c", "4e"):
            outs = [unit(f"{p}_3x3", unit(f"{p}_3x3_reduce", x), stride=2),
                    unit(f"{p}_double_3x3_2", unit(f"{p}_double_3x3_1", unit(f"{p}_double_3x3_reduce", x)), stride=2),
                    F.max_pool2d(x, 3, 2, ceil_mode=True)]
        else:
            pool = (F.max_pool2d(x, 3, 1, 1, ceil_mode=True) if block == "5b"
                    else F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True))
            outs = [unit(f"{p}_1x1", x), unit(f"{p}_3x3", unit(f"{p}_3x3_reduce", x)),
                    unit(f"{p}_double_3x3_2", unit(f"{p}_double_3x3_1", unit(f"{p}_double_3x3_reduce", x))),
                    unit(f"{p}_pool_proj", pool)]
        x = torch.cat(outs, 1)
    return x


def test_bninception_loads_port_file_and_matches_reference_forward(tmp_path, caplog):
    state = port_state_dict()
    path = tmp_path / "bn_inception_port.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        model = build_backbone(backbone_cfg("bninception", PRETRAINED=str(path))).eval()
    assert "last_linear.weight" in caplog.text and "last_linear.bias" in caplog.text
    assert torch.equal(model.inception_4d_3x3_bn.running_mean, state["inception_4d_3x3_bn.running_mean"][0])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        features = model.forward_features(x)
        expected = reference_bninception(state, x)
        pooled = model(x)
    assert features.shape == expected.shape == (2, 1024, 2, 2)
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(pooled, expected.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def default_backbones():
    """Each backbone built once with the default config (building ResNet-50 takes about a second)."""
    return {name: build_backbone(backbone_cfg(name)).eval() for name in ("convnet", "resnet18", "resnet50", "bninception")}


@pytest.mark.slow
def test_bninception_224_gives_7x7_and_1024_features(default_backbones):
    model = default_backbones["bninception"]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, 1024, 7, 7) and model.out_features == 1024


def test_bninception_odd_size_is_a_clear_error(default_backbones):
    with pytest.raises(ValueError, match="multiple of 32"), torch.no_grad():
        default_backbones["bninception"](torch.randn(1, 3, 72, 72))


# -- every backbone -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, size, width",
    [("convnet", 32, 256), ("resnet18", 64, 512), ("resnet50", 64, 2048), ("bninception", 64, 1024)],
)
def test_every_backbone_builds_and_runs(default_backbones, name, size, width):
    model = default_backbones[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, width) and model.out_features == width and torch.isfinite(out).all()


def test_convnet_widths_and_downsampling():
    model = build_backbone(backbone_cfg("convnet", CONVNET_WIDTHS=(8, 16, 24, 40))).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 40, 4, 4)
    assert model.out_features == 40


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_pooling_modes_against_loops(mode):
    x = torch.randn(2, 3, 4, 5)
    out = GlobalPool(mode)(x)
    for n in range(2):
        for c in range(3):
            values = [float(x[n, c, i, j]) for i in range(4) for j in range(5)]
            avg, top = sum(values) / len(values), max(values)
            expected = {"avg": avg, "max": top, "avgmax": avg + top}[mode]
            assert float(out[n, c]) == pytest.approx(expected, abs=1e-5)


def test_last_stride_one_doubles_the_final_map(default_backbones):
    x = torch.randn(1, 3, 64, 64)
    strided = default_backbones["resnet50"]
    unstrided = build_backbone(backbone_cfg("resnet50", LAST_STRIDE=1)).eval()
    unstrided.load_state_dict(strided.state_dict())  # same parameters, only the stride differs
    with torch.no_grad():
        assert strided.forward_features(x).shape == (1, 2048, 2, 2)
        assert unstrided.forward_features(x).shape == (1, 2048, 4, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [({"NAME": "vgg"}, "MODEL.BACKBONE.NAME"), ({"POOLING": "sum"}, "MODEL.BACKBONE.POOLING"),
     ({"LAST_STRIDE": 3, "NAME": "resnet18"}, "LAST_STRIDE"), ({"LAST_STRIDE": 1}, "ResNets only"),
     ({"CONVNET_WIDTHS": (8, 16)}, "CONVNET_WIDTHS")],
)
def test_bad_backbone_config(overrides, message):
    cfg = backbone_cfg("convnet", **overrides)
    with pytest.raises(ValueError, match=message):
        build_backbone(cfg)


# -- pretrained loading -----------------------------------------------------------------------------
def test_resnet_loads_torchvision_state_dict_and_drops_fc(tmp_path, caplog):
    source = models.resnet18(weights=None)
    torch.nn.init.normal_(source.layer3[1].conv2.weight)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        model = build_backbone(backbone_cfg("resnet18", PRETRAINED=str(path)))
    assert "fc.weight" in caplog.text
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda s: s.update({"layer9.weight": torch.zeros(1)}), ValueError, "unexpected keys: layer9.weight"),
        (lambda s: s.pop("layer2.0.bn1.running_var"), ValueError, "missing keys: layer2.0.bn1.running_var"),
        (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), ValueError, r"conv1.weight \(64, 3, 3, 3\)"),
        (lambda s: s.update({"epoch": 3}), TypeError, "not tensors"),
    ],
)
def test_state_dict_problems_are_errors(tmp_path, edit, error, message):
    state = models.resnet18(weights=None).state_dict()
    edit(state)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(error, match=message):
        build_backbone(backbone_cfg("resnet18", PRETRAINED=str(path)))


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        build_backbone(backbone_cfg("resnet18", PRETRAINED=str(tmp_path / "nothing.pth")))


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A private torch hub cache whose download function must not be reached (no network in tests)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_imagenet_weights_read_from_hub_cache(hub_dir):
    url = models.ResNet18_Weights.IMAGENET1K_V1.url
    source = models.resnet18(weights=None)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), hub_dir / "checkpoints" / url.rsplit("/", 1)[1])
    model = build_backbone(backbone_cfg("resnet18", PRETRAINED="imagenet"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("name, filename", [("resnet50", "resnet50-0676ba61.pth"),
                                            ("bninception", "bn_inception-52deb4733.pth")])
def test_imagenet_offline_error_names_file_cache_path_and_url(hub_dir, name, filename):
    with pytest.raises(PretrainedWeightsError) as err:
        build_backbone(backbone_cfg(name, PRETRAINED="imagenet"))
    message = str(err.value)
    assert filename in message
    assert str(hub_dir / "checkpoints" / filename) in message
    assert pretrained_module.imagenet_url(name) in message and "http" in message


def test_convnet_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="not available for 'convnet'"):
        build_backbone(backbone_cfg("convnet", PRETRAINED="imagenet"))


# -- frozen BatchNorm -------------------------------------------------------------------------------
def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_frozen_bn_stays_in_eval_mode_and_keeps_statistics():
    model = build_backbone(backbone_cfg("convnet", FROZEN_BN=True))
    model.train()
    assert model.training and all(not bn.training for bn in batchnorms(model))
    assert all(not p.requires_grad for bn in batchnorms(model) for p in bn.parameters())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.weight.requires_grad for c in convs)
    before = [bn.running_mean.clone() for bn in batchnorms(model)]
    model(torch.randn(4, 3, 32, 32) * 3 + 1).sum().backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, batchnorms(model)))
    assert model.body[0].weight.grad is not None


def test_unfrozen_bn_trains():
    model = build_backbone(backbone_cfg("convnet")).train()
    assert all(bn.training for bn in batchnorms(model))
    before = batchnorms(model)[0].running_mean.clone()
    model(torch.randn(4, 3, 32, 32) + 1)
    assert not torch.equal(before, batchnorms(model)[0].running_mean)


@pytest.mark.slow
def test_resnet50_forward_at_224_with_frozen_bn():
    model = build_backbone(backbone_cfg("resnet50", FROZEN_BN=True, POOLING="max")).train()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 2048)
