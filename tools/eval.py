#!/usr/bin/env python
"""Evaluate: python tools/eval.py --ckpt output/run/checkpoints/last.pth [--cfg FILE] [KEY VALUE ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
