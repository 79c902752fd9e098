"""Cross-batch memory (XBM) and memory adaptation (XBN, AXBN, EMA)."""

from .adaptation import (EMAMomentMatching, KalmanMomentMatching, MomentMatching, kalman_r_for_gain,
                         kalman_steady_gain, moment_match)
from .adapter import CallableAdapter, MemoryAdapter, as_memory_adapter
from .build import ADAPTER_REGISTRY, build_adapter, build_memory
from .cohort_matching import CohortMomentMatching
from .covariance_matching import CovarianceMatching
from .cross_batch_memory import CrossBatchMemory

__all__ = [
    "CrossBatchMemory",
    "MemoryAdapter",
    "CallableAdapter",
    "as_memory_adapter",
    "moment_match",
    "MomentMatching",
    "KalmanMomentMatching",
    "EMAMomentMatching",
    "CovarianceMatching",
    "CohortMomentMatching",
    "kalman_steady_gain",
    "kalman_r_for_gain",
    "build_memory",
    "build_adapter",
    "ADAPTER_REGISTRY",
]
