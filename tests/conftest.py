import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tests read configs/ by relative path
torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory):
    """A tiny real Glyphs dataset (10 fonts, 43 characters, >= 4 fonts per class) shared by the
    tests that train: generated once per session by the real generator."""
    from xbm.data.glyphs import bundled_fonts, generate_glyphs

    root = tmp_path_factory.mktemp("glyphs")
    fonts = [f for f in bundled_fonts() if f.startswith(("DejaVu", "STIX"))][:10]
    generate_glyphs(root, min_fonts=4, fonts=fonts, codepoints="ABCDEFGHJKLMNPQRSTUVWXYZabdefghnqrt23456789",
                    progress=False)
    return root
