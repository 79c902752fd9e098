from .build import EmbeddingModel, build_model

__all__ = ["EmbeddingModel", "build_model"]
