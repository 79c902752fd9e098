"""build_model(cfg): backbone + embedding head, returning unit-length embeddings."""
import torch
from torch import nn

from ..data.transforms import InputConvention, model_input_convention, to_backbone_input
from .backbones import build_backbone
from .head import EmbeddingHead


class EmbeddingModel(nn.Module):
    """Images -> unit embeddings. Images are float tensors in the backbone's input convention, or
    uint8 RGB pixels (DATA.UINT8_TRANSFER), which are converted to it here, on the model's device."""

    def __init__(self, backbone: nn.Module, dim: int, convention: InputConvention | None = None,
                 head_init: str = "pytorch"):
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.out_features, dim, init=head_init)
        self.convention = convention

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if self.convention is None:
                raise ValueError("this model was built without an input convention and cannot take uint8 pixels")
            images = to_backbone_input(images, self.convention)
        return self.head(self.backbone(images))


def build_model(cfg) -> EmbeddingModel:
    if cfg.MODEL.HEAD.DIM < 1:
        raise ValueError(f"MODEL.HEAD.DIM must be positive, got {cfg.MODEL.HEAD.DIM}")
    return EmbeddingModel(build_backbone(cfg), cfg.MODEL.HEAD.DIM, model_input_convention(cfg),
                          head_init=cfg.MODEL.HEAD.INIT)
