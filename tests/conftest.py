import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tests read configs/ by relative path
torch.set_num_threads(min(2, torch.get_num_threads()))
