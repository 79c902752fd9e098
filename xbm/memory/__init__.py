"""Cross-batch memory (XBM) and memory adaptation (XBN, AXBN, EMA)."""

from .adaptation import EMAMomentMatching, KalmanMomentMatching, MomentMatching, moment_match
from .build import build_adapter, build_memory
from .cross_batch_memory import CrossBatchMemory

__all__ = [
    "CrossBatchMemory",
    "moment_match",
    "MomentMatching",
    "KalmanMomentMatching",
    "EMAMomentMatching",
    "build_memory",
    "build_adapter",
]
