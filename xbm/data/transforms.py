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

import functools
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConvention:
    """How a backbone's weights expect pixels: channel order, value range, then (x - mean) / std."""

    channel_order: str  # "RGB" or "BGR"
    max_value: float  # 1.0: pixels in [0, 1]; 255.0: pixels in [0, 255]
    mean: tuple[float, float, float]  # in the channel order above
    std: tuple[float, float, float]


BNINCEPTION_CONVENTION = InputConvention("BGR", 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0))
IMAGENET_CONVENTION = InputConvention("RGB", 1.0, IMAGENET_MEAN, IMAGENET_STD)
# timm's test-time crop when a model's config gives none (timm.data.constants.DEFAULT_CROP_PCT): 224 of 256
DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class DataConfig:
    """What a backbone's weights expect beyond the convention: the input side, test crop and interpolation
    (a timm model's are timm's resolution of its pretrained config; `data_config` of the backbone class)."""

    convention: InputConvention
    input_size: int | None  # the side it was trained at; None: any (xbm's own backbones)
    crop_pct: float  # test-time centre crop as a fraction of the resized side
    interpolation: str  # bilinear | bicubic


@dataclass(frozen=True)
class InputGeometry:
    """INPUT.IMAGE_SIZE, RESIZE and INTERPOLATION of a config, with 0 / "" resolved from the backbone."""

    size: int
    resize: int
    interpolation: str


def backbone_data_config(cfg) -> DataConfig:
    """The data config of MODEL.BACKBONE.NAME (its registered class's `data_config`)."""
    # Imported here: the backbones import this module's conventions, and a backbone registered at
    # run time must be found, so the registry is read when asked.
    from ..modeling.backbones import BACKBONE_REGISTRY

    name = cfg.MODEL.BACKBONE.NAME
    return BACKBONE_REGISTRY.get(name).data_config(name, dict(cfg.MODEL.BACKBONE.TIMM.KWARGS))


def input_convention(backbone_name: str) -> InputConvention:
    """The input convention of a backbone (MODEL.BACKBONE.NAME): its registered class's INPUT_CONVENTION, or a
    timm model's mean and std."""
    from ..modeling.backbones import BACKBONE_REGISTRY

    return BACKBONE_REGISTRY.get(backbone_name).data_config(backbone_name).convention


def input_geometry(cfg) -> InputGeometry:
    """The input side, test resize and interpolation of this config: INPUT.* where set, else the backbone's."""
    size, resize = int(cfg.INPUT.IMAGE_SIZE), int(cfg.INPUT.RESIZE)
    interpolation = cfg.INPUT.INTERPOLATION.lower()
    if size < 0 or resize < 0:
        raise ValueError(f"INPUT.IMAGE_SIZE and INPUT.RESIZE must be >= 0 (0: the backbone's), got {size} and {resize}")
    if interpolation and interpolation not in INTERPOLATIONS:
        raise ValueError(f"INPUT.INTERPOLATION {cfg.INPUT.INTERPOLATION!r} is not one of {sorted(INTERPOLATIONS)} "
                         "or '' (the backbone's)")
    if size and resize and interpolation:
        return InputGeometry(size, resize, interpolation)
    data = backbone_data_config(cfg)
    if not size:
        if data.input_size is None:
            raise ValueError(f"INPUT.IMAGE_SIZE 0 takes the backbone's pretrained input size, and "
                             f"{cfg.MODEL.BACKBONE.NAME} has none: set INPUT.IMAGE_SIZE")
        size = data.input_size
    if not resize:
        resize = int(math.floor(size / data.crop_pct))  # timm's test transform (transforms_factory.py)
    return InputGeometry(size, resize, interpolation or data.interpolation)


def to_backbone_input(pixels: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """uint8 RGB pixels, (3, H, W) or (N, 3, H, W), -> float32 in `convention`, on their device."""
    if pixels.shape[-3] != 3:
        raise ValueError(f"expected an RGB image with 3 channels, got {pixels.shape[-3]}")
    pixels = pixels.float()  # RGB, 0-255
    if convention.max_value != 255.0:
        pixels = pixels * (convention.max_value / 255.0)
    if convention.channel_order == "BGR":
        pixels = pixels.flip(-3)
    mean, std = _mean_std(convention, pixels.device)
    return (pixels - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std(convention: InputConvention, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (3, 1, 1) float32 tensors on `device`, made once (this runs per image)."""
    return (torch.tensor(convention.mean, device=device).view(3, 1, 1),
            torch.tensor(convention.std, device=device).view(3, 1, 1))


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
    own = _dataset_class(cfg).INPUT_CONVENTION
    return own if own is not None else backbone_data_config(cfg).convention


def _dataset_class(cfg):
    # Imported here: the datasets build their steps from this module's pieces.
    from .datasets import dataset_class

    return dataset_class(cfg)


def natural_image_steps(cfg, train: bool) -> list:
    """Resize, then a random resized crop and flip (train) or a centre crop (test)."""
    geometry = input_geometry(cfg)
    size, resize, mode = geometry.size, geometry.resize, INTERPOLATIONS[geometry.interpolation]
    scale = tuple(float(s) for s in cfg.INPUT.CROP_SCALE)
    if resize < size:
        raise ValueError(
            f"INPUT.RESIZE ({resize}) is smaller than INPUT.IMAGE_SIZE ({size}): the centre crop would "
            "need padding; raise INPUT.RESIZE"
        )
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"INPUT.CROP_SCALE must be (low, high) with 0 < low <= high <= 1, got {scale}")
    if not train:
        return [T.Resize(resize, interpolation=mode), T.CenterCrop(size)]
    steps = [T.Resize(resize, interpolation=mode), T.RandomResizedCrop(size, scale=scale, interpolation=mode)]
    if cfg.INPUT.HFLIP:
        steps.append(T.RandomHorizontalFlip())
    return steps


class ToRGB:
    """image.convert("RGB") as a picklable transform (DataLoader workers pickle transforms)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transforms(cfg, train: bool) -> T.Compose:
    """The transform of training (`train=True`) or test images for this config."""
    steps = _dataset_class(cfg).transform_steps(cfg, train)
    last = RGBPixels() if cfg.DATA.UINT8_TRANSFER else BackboneInput(model_input_convention(cfg))
    return T.Compose(steps + [last])
