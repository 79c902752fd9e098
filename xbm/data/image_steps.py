"""The pixel steps before the tensor: the input geometry a backbone expects and the natural-image augmentation.

`input_geometry` resolves INPUT.IMAGE_SIZE, RESIZE and INTERPOLATION (0 / "": the backbone's, from its
registered class's `data_config`); `natural_image_steps` is every dataset's default augmentation (see
xbm/data/transforms.py); `ToRGB` the picklable RGB conversion. The datasets import this module, and
transforms.py imports the datasets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image
from torchvision import transforms as T

from ..input_convention import DataConfig, InputConvention

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class InputGeometry:
    """INPUT.IMAGE_SIZE, RESIZE and INTERPOLATION of a config, with 0 / "" resolved from the backbone."""

    size: int
    resize: int
    interpolation: str


def backbone_data_config(cfg) -> DataConfig:
    """The data config of MODEL.BACKBONE.NAME (its registered class's `data_config`)."""
    # Imported when asked: a backbone registered at run time must be found, and xbm.modeling (whose
    # build imports the transforms) need not be loaded for a dataset to be.
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
