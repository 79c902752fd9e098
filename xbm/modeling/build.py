"""build_model(cfg): backbone + embedding head, returning unit-length embeddings."""
import torch
from torch import nn

from ..data.transforms import model_input_convention
from ..input_convention import InputConvention, to_backbone_input
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
        self.dim = self.head.dim
        self.convention = convention

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if self.convention is None:
                raise ValueError("this model was built without an input convention and cannot take uint8 pixels")
            images = to_backbone_input(images, self.convention)
        return self.head(self.backbone(images))


def build_model(cfg) -> EmbeddingModel:
    if cfg.MODEL.HEAD.DIM < 0:
        raise ValueError(f"MODEL.HEAD.DIM must be positive, or 0 for no projection, got {cfg.MODEL.HEAD.DIM}")
    if cfg.MODEL.HEAD.DIM == 0 and cfg.SOLVER.HEAD_WARMUP_ITERS > 0:
        raise ValueError("SOLVER.HEAD_WARMUP_ITERS trains only the head, and MODEL.HEAD.DIM 0 has none: set it to 0")
    return EmbeddingModel(build_backbone(cfg), cfg.MODEL.HEAD.DIM, model_input_convention(cfg),
                          head_init=cfg.MODEL.HEAD.INIT)


def embedding_dim(cfg) -> int:
    """The width of this config's embeddings: MODEL.HEAD.DIM, or with 0 (no head) the backbone's feature
    width, read off the backbone built on the meta device (no memory, no weights)."""
    if cfg.MODEL.HEAD.DIM > 0:
        return int(cfg.MODEL.HEAD.DIM)
    from .backbones import BACKBONE_REGISTRY

    with torch.device("meta"):
        return int(BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME).from_config(cfg).out_features)
