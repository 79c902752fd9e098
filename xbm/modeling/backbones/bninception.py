"""BN-Inception (Inception with Batch Normalization; Ioffe & Szegedy 2015), 1024-d pooled features.

Written from the architecture; its parameter names follow the widely used ImageNet
port `bn_inception-52deb4733.pth` (Cadene's pretrainedmodels), so that file loads
strictly (its `last_linear` classifier is dropped):

    conv1_7x7_s2, conv2_3x3_reduce, conv2_3x3, and for each block 3a..5b
    inception_<block>_{1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3_1,
    double_3x3_2, pool_proj}, every conv followed by a BatchNorm named <conv>_bn.

Each unit is conv (with bias) -> BN -> ReLU. A block concatenates, in this order,
its 1x1, 3x3, double-3x3 and pooling branches. The reduction blocks 3c and 4e have
no 1x1 branch, stride 2 in their 3x3 and second double-3x3 convs, and a plain
3x3/2 max-pool branch. Pooling branches: 3x3/1 average pooling (padding counted),
except block 5b, which max-pools. Input: BGR, 0-255, mean (104, 117, 128); see
xbm.data.transforms. At 224 px the last map is 7x7; the input side must keep the
maps at blocks 3c and 4e even in size (any multiple of 32 does).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...input_convention import BNINCEPTION_CONVENTION
from .build import BACKBONE_REGISTRY
from .convnet import Backbone

# block, in_channels, 1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool branch, pool_proj
_BLOCKS = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    ("3c", 320, 0, 128, 160, 64, 96, "reduce", 0),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    ("4e", 608, 0, 128, 192, 192, 256, "reduce", 0),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


@BACKBONE_REGISTRY.register("bninception")
class BNInception(Backbone):
    """BN-Inception trunk + global pooling; `out_features` = 1024."""

    # The Caffe-era ImageNet port's pixels: BGR, 0-255, mean subtracted.
    INPUT_CONVENTION = BNINCEPTION_CONVENTION

    def __init__(self, pooling: str = "avg"):
        super().__init__(pooling)
        self._unit("conv1_7x7_s2", 3, 64, kernel=7, stride=2)
        self._unit("conv2_3x3_reduce", 64, 64, kernel=1)
        self._unit("conv2_3x3", 64, 192, kernel=3)
        for name, cin, c1, c3r, c3, cdr, cd, pool, cproj in _BLOCKS:
            prefix = f"inception_{name}"
            stride = 2 if pool == "reduce" else 1
            if c1:
                self._unit(f"{prefix}_1x1", cin, c1, kernel=1)
            self._unit(f"{prefix}_3x3_reduce", cin, c3r, kernel=1)
            self._unit(f"{prefix}_3x3", c3r, c3, kernel=3, stride=stride)
            self._unit(f"{prefix}_double_3x3_reduce", cin, cdr, kernel=1)
            self._unit(f"{prefix}_double_3x3_1", cdr, cd, kernel=3)
            self._unit(f"{prefix}_double_3x3_2", cd, cd, kernel=3, stride=stride)
            if cproj:
                self._unit(f"{prefix}_pool_proj", cin, cproj, kernel=1)
        self.out_features = 1024

    def _unit(self, name: str, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        self.add_module(name, nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(out_channels))

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._modules[f"{name}_bn"](self._modules[name](x)), inplace=True)

    def _block(self, spec: tuple, x: torch.Tensor) -> torch.Tensor:
        name, _, c1, _, _, _, _, pool, _ = spec
        prefix = f"inception_{name}"
        branches = [self._run(f"{prefix}_1x1", x)] if c1 else []
        branches.append(self._run(f"{prefix}_3x3", self._run(f"{prefix}_3x3_reduce", x)))
        double = self._run(f"{prefix}_double_3x3_reduce", x)
        branches.append(self._run(f"{prefix}_double_3x3_2", self._run(f"{prefix}_double_3x3_1", double)))
        if pool == "reduce":
            branches.append(F.max_pool2d(x, 3, stride=2, ceil_mode=True))
        else:
            if pool == "avg":
                pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
            else:
                pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
            branches.append(self._run(f"{prefix}_pool_proj", pooled))
        sizes = {tuple(b.shape[2:]) for b in branches}
        if len(sizes) > 1:
            raise ValueError(
                f"BN-Inception block {name}: branch maps of sizes {sorted(sizes)} cannot be concatenated; "
                "use an input side that is a multiple of 32 (e.g. 224)"
            )
        return torch.cat(branches, dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self._run("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = self._run("conv2_3x3", self._run("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for spec in _BLOCKS:
            x = self._block(spec, x)
        return x
