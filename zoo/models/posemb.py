"""Fixed sin-cos position embeddings, as in MAE's ``util/pos_embed.py`` (MoCo v3 style)."""
from __future__ import annotations

import numpy as np


def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), width]: sin of position * omega in the first half, cos in the second."""
    if width % 2:
        raise ValueError(f"sincos_1d: width must be even, got {width}")
    omega = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[grid_h * grid_w, width] row-major over the patch grid.

    Matches MAE's ``get_2d_sincos_pos_embed``: its meshgrid puts the column index first, so the
    first half of the channels encodes the column and the second half the row.
    """
    if width % 4:
        raise ValueError(f"sincos_2d: width must be a multiple of 4, got {width}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb_cols = sincos_1d(width // 2, cols)
    emb_rows = sincos_1d(width // 2, rows)
    return np.concatenate([emb_cols, emb_rows], axis=1)
