"""Cross-batch memory (XBM) and memory adaptation (XBN, AXBN, EMA)."""

from .adaptation import EMAMomentMatching, KalmanMomentMatching, MomentMatching, moment_match
from .build import ADAPTER_REGISTRY, build_adapter, build_memory
from .cross_batch_memory import CrossBatchMemory

__all__ = [
    "CrossBatchMemory",
    "moment_match",
    "MomentMatching",
    "KalmanMomentMatching",
    "EMAMomentMatching",
    "build_memory",
    "build_adapter",
    "ADAPTER_REGISTRY",
]
