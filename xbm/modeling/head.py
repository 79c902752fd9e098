"""The embedding head: a linear projection of pooled features onto the unit sphere."""
import torch
from torch import nn
from torch.nn import functional as F


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.fc = nn.Linear(in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)
