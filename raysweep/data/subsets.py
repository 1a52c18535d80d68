"""Stratified, nested, seeded training subsets (pure numpy; knows nothing of Ray).

For one seed, each class gets one fixed permutation of its rows; a fraction takes a prefix
of it. So smaller subsets sit inside larger ones, and class balance is kept at every size.
"""

from __future__ import annotations

import numpy as np

from raysweep.errors import RaysweepError


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted unique row indices: per class round(fraction * n_class) rows, at least 1.

    The permutation of a class depends only on (seed, class id) and is applied to that
    class's rows sorted by index, so the result is the same whatever order the rows were
    read in, and whatever the worker count.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise RaysweepError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise RaysweepError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise RaysweepError("stratified_subset: no labels given")
    if not np.issubdtype(labels.dtype, np.integer):
        raise RaysweepError(f"stratified_subset: labels must be integers, got {labels.dtype}")
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)  # ascending row index
        k = max(1, int(round(fraction * len(rows))))
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c) & 0xFFFFFFFF, 0x5EED])
        picked.append(rows[rng.permutation(len(rows))[:k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)
