#!/usr/bin/env python
"""Train: python tools/train_net.py --cfg configs/glyphs_xbn.yaml [KEY VALUE ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
