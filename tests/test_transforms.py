"""Transforms: each backbone's input convention, checked against plain PIL/numpy arithmetic."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from xbm.config import get_cfg
from xbm.data.transforms import BackboneInput, build_transforms, input_convention


def natural_cfg(backbone="resnet50", size=224, resize=256):
    cfg = get_cfg()
    cfg.DATA.NAME = "sop"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.INPUT.IMAGE_SIZE = size
    cfg.INPUT.RESIZE = resize
    return cfg


def test_convention_values():
    bn = input_convention("bninception")
    assert (bn.channel_order, bn.max_value, bn.mean, bn.std) == ("BGR", 255.0, (104, 117, 128), (1, 1, 1))
    for name in ("resnet18", "resnet50", "convnet"):
        conv = input_convention(name)
        assert (conv.channel_order, conv.max_value) == ("RGB", 1.0)
        assert conv.mean == (0.485, 0.456, 0.406) and conv.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="vgg16"):
        input_convention("vgg16")


def test_bninception_input_is_bgr_0_255_mean_subtracted():
    pixels = np.array([[[10, 20, 30], [200, 150, 100]]], dtype=np.uint8)  # 1 x 2, RGB
    out = BackboneInput(input_convention("bninception"))(Image.fromarray(pixels))
    assert out.shape == (3, 1, 2) and out.dtype == torch.float32
    for x in range(2):
        r, g, b = pixels[0, x].astype(float)
        assert out[:, 0, x].tolist() == [b - 104, g - 117, r - 128]


def test_imagenet_input_is_rgb_0_1_normalised():
    pixels = np.array([[[10, 20, 30], [200, 150, 100]]], dtype=np.uint8)
    out = BackboneInput(input_convention("resnet50"))(Image.fromarray(pixels))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for x in range(2):
        expected = [(pixels[0, x, c] / 255.0 - mean[c]) / std[c] for c in range(3)]
        assert out[:, 0, x].tolist() == pytest.approx(expected, abs=1e-6)


def test_test_pipeline_matches_plain_pil_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))  # W 400, H 300
    out = build_transforms(natural_cfg("bninception"), train=False)(image)
    # by hand: shorter side to 256 (bilinear), centre 224 crop, BGR, minus the mean
    resized = image.resize((341, 256), Image.BILINEAR)
    left, top = round((341 - 224) / 2), round((256 - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224))).astype(np.float32)
    expected = crop[:, :, ::-1].transpose(2, 0, 1) - np.array([104, 117, 128], dtype=np.float32).reshape(3, 1, 1)
    assert out.shape == (3, 224, 224)
    assert np.abs(out.numpy() - expected).max() < 1e-4


def test_train_pipeline_shape_and_uniform_colour_kept():
    image = Image.new("RGB", (500, 375), (90, 160, 30))
    out = build_transforms(natural_cfg("bninception"), train=True)(image)
    assert out.shape == (3, 224, 224)
    assert torch.allclose(out[0], torch.full((224, 224), 30.0 - 104))  # blue channel first
    assert torch.allclose(out[2], torch.full((224, 224), 90.0 - 128))


def left_is_red(tensor: torch.Tensor) -> bool:
    return bool(tensor[0, 112, 5] > tensor[2, 112, 5])


@pytest.mark.parametrize("hflip", [True, False])
def test_horizontal_flip_only_when_enabled(hflip):
    image = Image.new("RGB", (256, 256), (250, 0, 0))
    image.paste((0, 0, 250), (128, 0, 256, 256))  # left red, right blue
    cfg = natural_cfg("resnet18")
    cfg.INPUT.CROP_SCALE = (1.0, 1.0)  # the whole image: only the flip can change the left edge
    cfg.INPUT.HFLIP = hflip
    transform = build_transforms(cfg, train=True)
    torch.manual_seed(0)
    sides = {left_is_red(transform(image)) for _ in range(24)}
    assert sides == ({True, False} if hflip else {True})


def test_glyphs_no_augmentation_normalised_to_minus1_1():
    cfg = get_cfg()  # DATA.NAME glyphs, 32 px
    pixels = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    image = Image.fromarray(pixels, mode="L")
    train, test = build_transforms(cfg, train=True), build_transforms(cfg, train=False)
    out = train(image)
    assert out.shape == (3, 32, 32)
    expected = (pixels / 255.0 - 0.5) / 0.5
    for c in range(3):
        assert np.abs(out[c].numpy() - expected).max() < 1e-6
    assert torch.equal(out, train(image)) and torch.equal(out, test(image))
    cfg.INPUT.IMAGE_SIZE = 64
    assert build_transforms(cfg, train=True)(image).shape == (3, 64, 64)


def test_bad_input_config():
    cfg = natural_cfg(size=224, resize=200)
    with pytest.raises(ValueError, match="INPUT.RESIZE"):
        build_transforms(cfg, train=False)
    cfg = natural_cfg()
    cfg.INPUT.CROP_SCALE = (0.5, 0.2)
    with pytest.raises(ValueError, match="INPUT.CROP_SCALE"):
        build_transforms(cfg, train=True)
    cfg = natural_cfg(backbone="alexnet")
    with pytest.raises(ValueError, match="alexnet"):
        build_transforms(cfg, train=True)


def test_transforms_pickle_for_worker_processes():
    for cfg in (natural_cfg("bninception"), get_cfg()):
        transform = pickle.loads(pickle.dumps(build_transforms(cfg, train=True)))
        assert transform(Image.new("RGB", (300, 300))).shape[0] == 3
