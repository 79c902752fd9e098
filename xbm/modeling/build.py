"""build_model(cfg): backbone + embedding head, returning unit-length embeddings."""
import torch
from torch import nn

from .backbones import build_backbone
from .head import EmbeddingHead


class EmbeddingModel(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, head_init: str = "pytorch"):
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.out_features, dim, init=head_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_model(cfg) -> EmbeddingModel:
    if cfg.MODEL.HEAD.DIM < 1:
        raise ValueError(f"MODEL.HEAD.DIM must be positive, got {cfg.MODEL.HEAD.DIM}")
    return EmbeddingModel(build_backbone(cfg), cfg.MODEL.HEAD.DIM, head_init=cfg.MODEL.HEAD.INIT)
