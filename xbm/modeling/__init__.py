from .build import EmbeddingModel, build_model, embedding_dim

__all__ = ["EmbeddingModel", "build_model", "embedding_dim"]
