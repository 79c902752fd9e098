import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tests read configs/ by relative path
torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


def generate_tiny_glyphs(root) -> None:
    """A tiny real Glyphs dataset (10 fonts, 43 characters, >= 4 fonts per class; DATA.GLYPHS.MIN_FONTS 4)
    by the real generator; also the data of the checkpoint in tests/fixtures/old_checkpoint."""
    from xbm.data.glyphs import bundled_fonts, generate_glyphs

    fonts = [f for f in bundled_fonts() if f.startswith(("DejaVu", "STIX"))][:10]
    generate_glyphs(root, min_fonts=4, fonts=fonts, codepoints="ABCDEFGHJKLMNPQRSTUVWXYZabdefghnqrt23456789",
                    progress=False)


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory):
    """generate_tiny_glyphs, shared by the tests that train: generated once per session."""
    root = tmp_path_factory.mktemp("glyphs")
    generate_tiny_glyphs(root)
    return root


@pytest.fixture
def xbm_log(caplog):
    """caplog for the "xbm" logger, which stops propagating to the root once a Trainer set it up."""
    import logging

    logger = logging.getLogger("xbm")
    propagate, logger.propagate = logger.propagate, False  # each record once, whichever state it was in
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def checkpoint_memory(state: dict) -> dict:
    """The memory's entries of a layout-2 checkpoint (xbm/engine/checkpointer.py): its objective's memory.* keys."""
    return {key[len("memory."):]: value for key, value in state["objective"].items() if key.startswith("memory.")}


def checkpoint_adapter(state: dict) -> dict | None:
    """The adapter's filter state of a layout-2 checkpoint (the objective's extra state)."""
    return state["objective"]["_extra_state"]["adapter"]
