"""xbm: deep metric learning with a cross-batch memory (XBM, XBN, AXBN)."""

__version__ = "0.1.0"
