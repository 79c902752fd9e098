"""Retrieval evaluation: exact k-NN search (faiss or torch) and Recall@K, MAP@R, R-precision."""

from xbm.evaluation.search import knn
from xbm.evaluation.metrics import evaluate, map_at_r, r_precision, recall_at_k

__all__ = ["knn", "recall_at_k", "map_at_r", "r_precision", "evaluate"]
