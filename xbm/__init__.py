"""xbm: deep metric learning with a cross-batch memory (XBM, XBN, AXBN)."""

__version__ = "0.1.0"

__all__ = ["CrossBatchObjective", "build_objective", "__version__"]


def __getattr__(name):
    # Lazily, so that `import xbm` (the command-line tools' --help) does not import torch.
    if name in ("CrossBatchObjective", "build_objective"):
        from . import objective

        return getattr(objective, name)
    raise AttributeError(f"module 'xbm' has no attribute {name!r}")
