"""Fit an image of any size onto the best grid of at most `max_tiles` square tiles.

The grids are the aspect ratios of Llama 3.2 Vision: every (cols, rows) with cols * rows <=
max_tiles, ordered by cols then rows; for 4 tiles: 1x1 1x2 1x3 1x4 2x1 2x2 3x1 4x1. An image's
aspect-ratio id is its grid's index + 1 (0 is left for padding).
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def supported_grids(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with at most max_tiles tiles."""
    return tuple(
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if cols * rows <= max_tiles
    )


def best_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid whose canvas holds the image with the least resizing.

    If some canvas holds the image at scale >= 1, take the one needing the least upscaling
    (no detail lost); otherwise the one needing the least downscaling. Ties go to the
    smaller canvas (fewer tiles, less compute).
    """
    candidates = []
    for cols, rows in supported_grids(max_tiles):
        scale = min(cols * tile_size / width, rows * tile_size / height)
        candidates.append((scale, cols * rows, (cols, rows)))
    upscales = [c for c in candidates if c[0] >= 1.0]
    if upscales:
        return min(upscales, key=lambda c: (c[0], c[1]))[2]
    return max(candidates, key=lambda c: (c[0], -c[1]))[2]


def aspect_ratio_id(grid: tuple[int, int], max_tiles: int) -> int:
    return supported_grids(max_tiles).index(grid) + 1


def fit_size(height: int, width: int, grid: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """(height, width) of the image resized, aspect kept, to fit the grid's canvas."""
    cols, rows = grid
    scale = min(cols * tile_size / width, rows * tile_size / height)
    return (
        max(1, min(rows * tile_size, round(height * scale))),
        max(1, min(cols * tile_size, round(width * scale))),
    )
