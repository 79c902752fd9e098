"""A momentum key encoder (XBM.KEY_MOMENTUM): the memory is filled by a slowly moving copy of the model.

MoCo (He et al., CVPR 2020, Sec. 3.2) keeps a queue of keys computed by an exponential moving average of
the query encoder, so that the stored keys, computed by networks a few hundred steps apart, stay
consistent with each other: "a slowly progressing key encoder". Here the online model computes the loss's
anchors as before, and this copy computes, from the same images, the rows that enter the memory:

    after each optimizer step:  key <- m * key + (1 - m) * model     (parameters; buffers copied)

The copy is made once from the model (after DistributedDataParallel has broadcast rank 0's weights, so
every rank starts from the same copy) and then only ever updated from the model's parameters, which DDP
keeps identical on every rank: the key encoder is the same on every rank without a collective. It runs
in the model's mode (train mode: BatchNorm on the batch's statistics, as MoCo's key encoder) with no
gradient. Its weights are saved under "key_encoder" in the checkpoint.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumKeyEncoder(nn.Module):
    """An EMA copy of `model` with `momentum` m in [0, 1): m = 0 copies the model at every update."""

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(model)
        self.encoder.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """key <- m key + (1 - m) model for every parameter; buffers (BatchNorm's statistics) copied."""
        keys = dict(self.encoder.named_parameters())
        for name, param in model.named_parameters():
            keys[name].lerp_(param.detach(), 1.0 - self.momentum)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """The model's buffers into the copy: after each update, and after a skipped step (the key encoder's
        train-mode forward moved its BatchNorm statistics; the guard put the model's back, which are what
        the copy's were before the step)."""
        buffers = dict(self.encoder.named_buffers())
        for name, buffer in model.named_buffers():
            buffers[name].copy_(buffer)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"
