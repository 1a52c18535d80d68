"""Stratified, seeded row selections (pure numpy; knows nothing of Ray).

`stratified_subset`: the nested training subsets of a sweep. For one seed, each class gets
one fixed permutation of its rows; a fraction takes a prefix of it. So smaller subsets sit
inside larger ones, and class balance is kept at every size.
`carve_validation`: the validation rows held out of a training split that has no
validation split of its own, once, at prepare time.
"""

from __future__ import annotations

import numpy as np

from raysweep.errors import RaysweepError

# Distinct streams, so carving with val_seed s never mirrors the training subsets of seed s.
_SUBSET_STREAM, _CARVE_STREAM = 0x5EED, 0xCA4E


def _class_rows(labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise RaysweepError(f"{what}: no labels given")
    if not np.issubdtype(labels.dtype, np.integer):
        raise RaysweepError(f"{what}: labels must be integers, got {labels.dtype}")
    return labels, np.unique(labels)


def _permuted(rows: np.ndarray, seed: int, c: int, stream: int) -> np.ndarray:
    """The rows of class c (ascending) in an order fixed by (seed, c, stream) alone."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c) & 0xFFFFFFFF, stream])
    return rows[rng.permutation(len(rows))]


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
    labels, classes = _class_rows(labels, "stratified_subset")
    picked = []
    for c in classes:
        rows = np.flatnonzero(labels == c)  # ascending row index
        k = max(1, int(round(fraction * len(rows))))
        picked.append(_permuted(rows, seed, c, _SUBSET_STREAM)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def carve_validation(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a training split to hold out as validation.

    Per class round(fraction * n_class) rows, at least 1 and at most n_class - 1 (the class
    keeps a training row), chosen by `seed` (data.val_seed) alone: the same rows for every
    trial and every sweep seed.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise RaysweepError(f"data.val_fraction must be a number in (0, 1), got {fraction!r}") from None
    if not 0.0 < fraction < 1.0:
        raise RaysweepError(f"data.val_fraction must be in (0, 1), got {fraction}")
    labels, classes = _class_rows(labels, "carve_validation")
    picked = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            raise RaysweepError(f"cannot carve a validation split from train: class {int(c)} has "
                                f"{len(rows)} training row (a class needs 2 to keep one for training)")
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        picked.append(_permuted(rows, seed, c, _CARVE_STREAM)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64)
