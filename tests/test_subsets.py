"""stratified_subset: stratified, nested across fractions, deterministic, seed-dependent."""

from __future__ import annotations

import numpy as np
import pytest

from raysweep.data import stratified_subset
from raysweep.errors import RaysweepError

FRACTIONS = [1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # Unequal classes (33..97 rows), shuffled, as a real split might be.
    rng = np.random.default_rng(123)
    return rng.permutation(np.repeat(np.arange(10), rng.integers(33, 98, size=10)))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_per_class_counts_are_rounded_fractions(labels, fraction):
    idx = stratified_subset(labels, fraction, seed=0)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0), "sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(labels)
    for c in range(10):
        n_class = int((labels == c).sum())
        assert int((labels[idx] == c).sum()) == max(1, round(fraction * n_class))


def test_every_class_keeps_at_least_one_row():
    labels = np.array([0] * 40 + [1] * 3 + [2])
    idx = stratified_subset(labels, 0.0625, seed=5)
    assert sorted(set(labels[idx])) == [0, 1, 2]
    assert (labels[idx] == 0).sum() == round(0.0625 * 40) and (labels[idx] == 2).sum() == 1


def test_fraction_one_is_everything(labels):
    assert np.array_equal(stratified_subset(labels, 1.0, seed=3), np.arange(len(labels)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsets_are_nested_across_all_fractions(labels, seed):
    subsets = [set(stratified_subset(labels, f, seed).tolist()) for f in FRACTIONS]
    for bigger, smaller in zip(subsets, subsets[1:]):
        assert smaller < bigger, "each smaller fraction is a strict subset of the larger one"


def test_deterministic_for_the_same_inputs(labels):
    a = stratified_subset(labels, 0.25, seed=7)
    b = stratified_subset(labels.copy(), 0.25, seed=7)
    assert np.array_equal(a, b)


def test_independent_of_row_order_on_disk(labels):
    """Rows stored in another order select the same rows (mapped back to original indices)."""
    perm = np.random.default_rng(9).permutation(len(labels))
    shuffled = labels[perm]
    for f in FRACTIONS:
        want = stratified_subset(labels, f, seed=1)
        got = stratified_subset(shuffled, f, seed=1)
        # Same class sizes, and per class the same *ranks* among that class's rows: the
        # choice depends only on (seed, class, position within the class).
        for c in range(10):
            rank_want = np.searchsorted(np.flatnonzero(labels == c), want[labels[want] == c])
            rank_got = np.searchsorted(np.flatnonzero(shuffled == c), got[shuffled[got] == c])
            assert np.array_equal(rank_want, rank_got)


def test_adding_another_class_does_not_change_a_class_choice(labels):
    extra = np.concatenate([labels, np.full(50, 10)])
    a, b = stratified_subset(labels, 0.5, seed=4), stratified_subset(extra, 0.5, seed=4)
    assert np.array_equal(a, b[b < len(labels)])


def test_different_seeds_give_different_subsets(labels):
    for f in FRACTIONS[1:]:
        picks = {tuple(stratified_subset(labels, f, seed=s)) for s in range(3)}
        assert len(picks) == 3, f"fraction {f}: seeds 0, 1, 2 must give three different subsets"
    assert np.array_equal(stratified_subset(labels, 1.0, 0), stratified_subset(labels, 1.0, 1))


@pytest.mark.parametrize("fraction", [0, -0.5, 1.0001, 2, float("nan"), "half"])
def test_fraction_outside_unit_interval_is_an_error(labels, fraction):
    with pytest.raises(RaysweepError, match="fraction"):
        stratified_subset(labels, fraction, seed=0)


def test_empty_or_non_integer_labels_are_errors():
    with pytest.raises(RaysweepError, match="no labels"):
        stratified_subset(np.array([], np.int64), 0.5, 0)
    with pytest.raises(RaysweepError, match="integers"):
        stratified_subset(np.array([0.5, 1.0]), 0.5, 0)


# --- carve_validation: the validation split of a source that has none ------------------------

def test_carved_validation_is_stratified_with_at_least_one_row_per_class(labels):
    from raysweep.data import carve_validation

    val = carve_validation(labels, 0.1, seed=0)
    assert val.dtype == np.int64 and np.all(np.diff(val) > 0)
    for c in range(10):
        n_class = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == max(1, round(0.1 * n_class))
    tiny = np.array([0, 0, 1, 1, 1, 2, 2] + [3] * 40)
    got = tiny[carve_validation(tiny, 0.05, seed=0)]
    assert np.bincount(got).tolist() == [1, 1, 1, 2], "at least one per class; the rest rounded"
    assert np.bincount(tiny[carve_validation(tiny, 0.9, seed=0)]).tolist() == [1, 2, 1, 36], "a class keeps a training row"


def test_carved_validation_is_fixed_by_val_seed_alone(labels):
    from raysweep.data import carve_validation

    a = carve_validation(labels, 0.1, seed=0)
    assert np.array_equal(a, carve_validation(labels.copy(), 0.1, seed=0))
    assert not np.array_equal(a, carve_validation(labels, 0.1, seed=1)), "data.val_seed changes the rows"
    # Its stream is not the training subsets': val_seed 0 does not mirror sweep seed 0.
    assert not np.array_equal(a, stratified_subset(labels, 0.1, seed=0))


@pytest.mark.parametrize("val_seed", [0, 3])
def test_carved_rows_are_in_no_training_subset_of_any_seed_or_fraction(labels, val_seed):
    """What prepare does: train = the rows not carved; subsets are drawn from that train."""
    from raysweep.data import carve_validation

    val = carve_validation(labels, 0.1, seed=val_seed)
    train_rows = np.setdiff1d(np.arange(len(labels)), val)  # source row of each cache train row
    for seed in range(5):
        for f in FRACTIONS:
            subset_rows = train_rows[stratified_subset(labels[train_rows], f, seed)]
            assert not np.intersect1d(subset_rows, val).size
    assert len(train_rows) + len(val) == len(labels)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "a tenth"])
def test_carving_fraction_outside_the_open_unit_interval_is_an_error(labels, fraction):
    from raysweep.data import carve_validation

    with pytest.raises(RaysweepError, match="data.val_fraction"):
        carve_validation(labels, fraction, seed=0)


def test_carving_a_class_with_one_training_row_is_an_error():
    from raysweep.data import carve_validation

    with pytest.raises(RaysweepError, match="class 2 has 1 training row"):
        carve_validation(np.array([0, 0, 1, 1, 2]), 0.5, seed=0)
