"""What every backbone shares (global pooling, frozen BatchNorm), and the small CPU conv net.

A backbone maps images (N, 3, H, W) to pooled features (N, out_features):
`forward_features` gives the last feature map, `forward` pools it.

The conv net is the small Glyphs network (BENCHMARKS.md): 4 stages of two
conv3x3-BN-ReLU each (widths MODEL.BACKBONE.CONVNET_WIDTHS), a 2x2 max-pool
between stages, then global pooling. Built for 32 px inputs (32 -> 16 -> 8 -> 4),
it runs at any size of at least 8 px.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...input_convention import DEFAULT_CROP_PCT, IMAGENET_CONVENTION, DataConfig, InputConvention
from .build import BACKBONE_REGISTRY
from .pretrained import load_pretrained

POOLINGS = ("avg", "max", "avgmax")


class GlobalPool(nn.Module):
    """Global pooling of a feature map to one vector per image: avg | max | avgmax (their sum); "" = avg."""

    def __init__(self, mode: str = "avg"):
        super().__init__()
        mode = mode or "avg"  # MODEL.BACKBONE.POOLING "": the backbone's own pooling, which is avg here
        if mode not in POOLINGS:
            raise ValueError(f"MODEL.BACKBONE.POOLING must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return self.mode


class Backbone(nn.Module):
    """Base of the backbones: pooling of `forward_features`, and optional frozen BatchNorm.

    With frozen BatchNorm every BatchNorm layer stays in eval mode (running statistics
    are used and never updated) and its affine parameters get requires_grad False,
    also after `model.train()`. Keeping ImageNet statistics matters when batches are
    small or drawn from few classes.
    """

    out_features: int
    # The pixels the weights expect (channel order, range, mean/std); the transforms read it by name.
    INPUT_CONVENTION: InputConvention = IMAGENET_CONVENTION

    def __init__(self, pooling: str | None = "avg"):
        """`pooling` None: the subclass pools in its own forward (a timm model)."""
        super().__init__()
        self.pool = GlobalPool(pooling) if pooling is not None else None
        self.frozen_bn = False

    @classmethod
    def data_config(cls, backbone: str, kwargs=None):
        """The pixels this backbone's weights expect: INPUT_CONVENTION, any input size, timm's default
        test crop, bilinear resizing (torchvision's)."""
        return DataConfig(cls.INPUT_CONVENTION, None, DEFAULT_CROP_PCT, "bilinear")

    def load_weights(self, spec) -> None:
        """MODEL.BACKBONE.PRETRAINED ("" | imagenet | a state-dict file) into this freshly built backbone."""
        load_pretrained(self, spec.NAME.lower(), spec.PRETRAINED)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters of more than one dimension that SOLVER.NO_DECAY_NORM_BIAS also spares (none here)."""
        return set()

    @classmethod
    def from_config(cls, cfg) -> "Backbone":
        """Built from MODEL.BACKBONE: this default takes POOLING, and refuses the ResNet-only keys."""
        spec = cfg.MODEL.BACKBONE
        refuse_resnet_keys(spec)
        return cls(pooling=spec.POOLING)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.pool(self.forward_features(x))

    def batchnorm_layers(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def freeze_batchnorm(self, frozen: bool = True) -> "Backbone":
        self.frozen_bn = frozen
        for layer in self.batchnorm_layers():
            for parameter in layer.parameters():
                parameter.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.frozen_bn:
            for layer in self.batchnorm_layers():
                layer.eval()
        return self


def refuse_resnet_keys(spec) -> None:
    """MODEL.BACKBONE.STEM_RELU and LAST_STRIDE change ResNets only: another backbone keeps their defaults."""
    name = spec.NAME.lower()
    if not spec.STEM_RELU:
        raise ValueError(f"MODEL.BACKBONE.STEM_RELU False applies to ResNets only; keep True for {name}")
    if int(spec.LAST_STRIDE) != 2:
        raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE {spec.LAST_STRIDE} applies to ResNets only; keep 2 for {name}")


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@BACKBONE_REGISTRY.register("convnet")
class ConvNet(Backbone):
    """Small VGG-style net for 32 px images; `out_features` = the last width."""

    @classmethod
    def from_config(cls, cfg) -> "ConvNet":
        """MODEL.BACKBONE.CONVNET_WIDTHS and POOLING."""
        spec = cfg.MODEL.BACKBONE
        refuse_resnet_keys(spec)
        return cls(spec.CONVNET_WIDTHS, pooling=spec.POOLING)

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), pooling: str = "avg"):
        super().__init__(pooling)
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"MODEL.BACKBONE.CONVNET_WIDTHS must be 4 positive widths, got {tuple(widths)}")
        layers: list[nn.Module] = []
        in_channels = 3
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            layers += conv_bn_relu(in_channels, width) + conv_bn_relu(width, width)
            in_channels = width
        self.body = nn.Sequential(*layers)
        self.out_features = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
