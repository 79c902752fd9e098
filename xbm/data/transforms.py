"""Image transforms: augmentation, then the input convention of the backbone's weights.

Natural images (the default of every dataset):
  train: Resize(INPUT.RESIZE) -> RandomResizedCrop(INPUT.IMAGE_SIZE, scale=INPUT.CROP_SCALE)
         -> RandomHorizontalFlip (if INPUT.HFLIP)
  test:  Resize(INPUT.RESIZE) -> CenterCrop(INPUT.IMAGE_SIZE)
  (interpolation INPUT.INTERPOLATION; 0 / "" for IMAGE_SIZE, RESIZE, INTERPOLATION: the backbone's, which
  for a timm model is timm's data config of its weights: input size, floor(size / crop_pct), bicubic)
  then `BackboneInput`, the convention the pretrained weights were trained with:
    bninception      BGR channel order, 0-255 range, mean (B, G, R) = (104, 117, 128), std 1
                     (the Caffe-era ImageNet port; feeding it RGB/ImageNet-normalised input
                     silently costs accuracy);
    resnet*, convnet RGB, 0-1 range, ImageNet mean/std (torchvision's weights);
    timm:<name>      RGB, 0-1 range, the mean/std of the model's pretrained config.
A dataset may declare its own steps and convention instead (`transform_steps`, `INPUT_CONVENTION`
of its class): Glyphs (32x32 grayscale "L" images) has no augmentation, RGB, a resize only when
INPUT.IMAGE_SIZE differs from DATA.GLYPHS.IMAGE_SIZE, then 0-1 range and Normalize(0.5, 0.5).
With DATA.UINT8_TRANSFER the transform stops at uint8 RGB pixels, and the model applies the
convention on its device (the same arithmetic, `to_backbone_input`).
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..input_convention import (BNINCEPTION_CONVENTION, DEFAULT_CROP_PCT, IMAGENET_CONVENTION,  # noqa: F401
                                         IMAGENET_MEAN, IMAGENET_STD, DataConfig, InputConvention,
                                         to_backbone_input)
from .datasets import dataset_class
from .image_steps import (INTERPOLATIONS, InputGeometry, ToRGB, backbone_data_config, input_convention,  # noqa: F401
                          input_geometry, natural_image_steps)

# The names above are re-exported: xbm.data.transforms is where users and tools have found them.


class BackboneInput:
    """PIL RGB image -> float tensor (3, H, W) in a backbone's input convention."""

    def __init__(self, convention: InputConvention):
        self.convention = convention

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_backbone_input(TF.pil_to_tensor(image), self.convention)

    def __repr__(self) -> str:
        c = self.convention
        return f"BackboneInput({c.channel_order}, 0-{c.max_value:g}, mean={c.mean}, std={c.std})"


class RGBPixels:
    """PIL RGB image -> uint8 tensor (3, H, W), for DATA.UINT8_TRANSFER: the model converts it to
    its input convention on the device (`to_backbone_input`), after a 4x smaller copy."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = TF.pil_to_tensor(image)
        if pixels.shape[0] != 3:
            raise ValueError(f"expected an RGB image with 3 channels, got {pixels.shape[0]}")
        return pixels

    def __repr__(self) -> str:
        return "RGBPixels()"


def model_input_convention(cfg) -> InputConvention:
    """The input convention of this config's images: the dataset's own if it has one, else the backbone's."""
    own = dataset_class(cfg).INPUT_CONVENTION
    return own if own is not None else backbone_data_config(cfg).convention


def build_transforms(cfg, train: bool) -> T.Compose:
    """The transform of training (`train=True`) or test images for this config."""
    steps = dataset_class(cfg).transform_steps(cfg, train)
    last = RGBPixels() if cfg.DATA.UINT8_TRANSFER else BackboneInput(model_input_convention(cfg))
    return T.Compose(steps + [last])
