"""How a backbone's weights expect their pixels: the model's side of the input, which the data side reads.

`InputConvention` (channel order, value range, mean and std), `DataConfig` (that, plus the input side,
test crop and interpolation of the weights) and `to_backbone_input`, the arithmetic that turns uint8 RGB
pixels into a convention. Each backbone class declares its own (`INPUT_CONVENTION`, `data_config`);
xbm/data builds its transforms from them. It imports nothing of xbm, so that xbm.modeling (whose build
reads the dataset's convention) and xbm.data (whose transforms read the backbone's) both import it without
a circle.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

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

@dataclass(frozen=True)
class DataConfig:
    """What a backbone's weights expect beyond the convention: the input side, test crop and interpolation
    (a timm model's are timm's resolution of its pretrained config; `data_config` of the backbone class)."""

    convention: InputConvention
    input_size: int | None  # the side it was trained at; None: any (xbm's own backbones)
    crop_pct: float  # test-time centre crop as a fraction of the resized side
    interpolation: str  # bilinear | bicubic


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
