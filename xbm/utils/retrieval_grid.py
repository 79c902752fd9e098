"""The retrieval picture: one row per query, the query framed blue, then its results framed
green (same label), red (another label) or grey (label unknown), a title above each cell.

Shared by scripts/visualize_retrieval.py (a checkpoint on its dataset's test split) and
xbm-search --plot (queries against a gallery index). Drawn on a pyplot-free Agg figure.
"""
from __future__ import annotations

import numpy as np

from .plotting import new_figure, save_figure

CELL_PIXELS = 160
DPI = 100
QUERY_COLOR, HIT_COLOR, MISS_COLOR, UNKNOWN_COLOR = "#1f5fbf", "#1a9a1a", "#d62020", "#8c8c8c"
FRAME_WIDTH = 4


def grid_pixel_size(num_queries: int, topk: int) -> tuple[int, int]:
    """(width, height) of the PNG in pixels."""
    return (1 + topk) * CELL_PIXELS, num_queries * CELL_PIXELS


def result_color(query_label, result_label) -> str:
    """Green for the same label, red for another, grey when either label is unknown (None)."""
    if query_label is None or result_label is None:
        return UNKNOWN_COLOR
    return HIT_COLOR if int(query_label) == int(result_label) else MISS_COLOR


def draw_cell(ax, image, color: str, title: str) -> None:
    """One framed image; `image` None leaves the cell blank (e.g. a result file that is gone)."""
    if image is not None:
        pixels = np.asarray(image)
        if pixels.ndim == 2:  # grayscale (Glyphs: mode "L")
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(FRAME_WIDTH)
    ax.set_title(title, fontsize=7, pad=2)


def draw_retrieval_grid(rows: list[list[tuple]], path: str) -> None:
    """Write the PNG: `rows` holds, per query, its cells as (image, frame colour, title), query first.

    Rows shorter than the longest leave their last cells empty.
    """
    num_rows, k = len(rows), max(len(r) for r in rows) - 1
    width, height = grid_pixel_size(num_rows, k)
    figure = new_figure(width / DPI, height / DPI, dpi=DPI)
    axes = figure.subplots(num_rows, 1 + k, squeeze=False)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.16 / num_rows, wspace=0.1, hspace=0.25)
    for r, cells in enumerate(rows):
        for c in range(1 + k):
            if c < len(cells):
                draw_cell(axes[r][c], *cells[c])
            else:
                axes[r][c].set_axis_off()
    save_figure(figure, path)
