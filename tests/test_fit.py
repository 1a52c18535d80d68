"""analysis.fit: power-law fits on known laws, bootstrap coverage, inversion, held-out check, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.fit import bootstrap_fit, fit_power_law, holdout_check, size_for_error
from raysweep.errors import RaysweepError

SIZES = 50_000 * np.array([1, 0.5, 0.25, 0.125, 0.0625])


def law(n, a=2.0, alpha=0.35, c=0.05):
    return a * np.asarray(n, float) ** -alpha + c


def test_noiseless_points_recover_the_law():
    fit = fit_power_law(SIZES, law(SIZES))
    assert abs(fit.alpha - 0.35) < 0.01
    assert abs(fit.c - 0.05) < 0.005
    assert fit.a == pytest.approx(2.0, rel=0.05)
    assert fit.predict(1e6) == pytest.approx(law(1e6), rel=1e-4)
    assert fit.rmse_log < 1e-6 and fit.r2_log > 0.999999
    assert fit.n_sizes == 5 and not fit.c_at_bound


def test_plain_fit_is_the_log_log_least_squares_line():
    pure = 3.0 * SIZES ** -0.5
    fit = fit_power_law(SIZES, pure, irreducible=False)
    assert fit.alpha == pytest.approx(0.5, abs=1e-12)
    assert fit.a == pytest.approx(3.0, rel=1e-10)
    assert fit.c == 0.0
    # On noisy points, exactly what an independent linear regression of log(err) on log(n) gives.
    rng = np.random.default_rng(1)
    n = np.repeat(SIZES, 3)
    err = law(n) * np.exp(rng.normal(0, 0.05, n.size))
    line = stats.linregress(np.log(n), np.log(err))
    fit = fit_power_law(n, err, irreducible=False)
    assert fit.alpha == pytest.approx(-line.slope, rel=1e-10)
    assert math.log(fit.a) == pytest.approx(line.intercept, rel=1e-10)
    assert fit.r2_log == pytest.approx(line.rvalue**2, rel=1e-9)


def test_irreducible_fit_beats_the_line_on_a_curved_law():
    n = np.geomspace(100, 1e6, 8)
    err = law(n, a=2.0, alpha=0.5, c=0.1)  # flattens visibly: the line cannot follow it
    curved, line = fit_power_law(n, err), fit_power_law(n, err, irreducible=False)
    assert curved.rmse_log < 1e-6 < line.rmse_log
    assert curved.c == pytest.approx(0.1, abs=1e-4)


def test_bootstrap_interval_covers_the_true_alpha_in_most_draws():
    n = np.repeat(50_000 * 2.0 ** -np.arange(6), 4)  # 6 fractions x 4 seeds
    covered, widths = 0, []
    for draw in range(30):
        rng = np.random.default_rng(1000 + draw)
        err = law(n) * np.exp(rng.normal(0, 0.02, n.size))
        boot = bootstrap_fit(n, err, n_boot=40, seed=draw)
        lo, hi = boot.interval("alpha")
        covered += lo <= 0.35 <= hi
        widths.append(hi - lo)
    # A 95% interval from 40 resamples of 4 seeds is somewhat narrow; 24 of 30 (80%) still
    # separates it from an interval that misses often. COVERED_NOTE
    assert covered >= 24, f"95% interval covered the true alpha in only {covered}/30 draws"
    assert np.median(widths) < 0.25  # an interval as wide as the prior would cover trivially


def test_bootstrap_resamples_within_each_size():
    # One trial per size: every resample is the data itself, so the interval collapses.
    err = law(SIZES) * np.array([1.01, 0.99, 1.02, 0.98, 1.0])
    boot = bootstrap_fit(SIZES, err, n_boot=20, seed=0)
    assert boot.n_ok == 20 and boot.n_failed == 0
    # Same points, another order: the optimizer stops where the cost changes by < ftol = 1e-13,
    # which pins parameters only to ~sqrt(ftol) ~ 3e-7 relative (6e-9 apart seen across machines).
    assert boot.interval("alpha") == pytest.approx((boot.fit.alpha, boot.fit.alpha), rel=1e-6)
    lo, hi = boot.predict_interval([1e5])
    assert lo[0] == pytest.approx(hi[0]) == pytest.approx(float(boot.fit.predict(1e5)))


def test_size_for_error_inverts_known_laws():
    fit = fit_power_law(SIZES, law(SIZES, a=2.0, alpha=0.5, c=0.05))
    est = size_for_error(fit, 0.07)  # (2 / 0.02) ** 2
    assert est.reachable and est.n == pytest.approx(10_000, rel=1e-4)
    for target in (fit.c, 0.0499, 0.04):  # at or below the plateau c
        est = size_for_error(fit, target)
        assert not est.reachable and "not reachable" in est.describe()
        assert est.to_dict()["n"] is None
    plain = fit_power_law(SIZES, 2.0 * SIZES ** -0.5, irreducible=False)
    assert size_for_error(plain, 0.002).n == pytest.approx(1e6, rel=1e-8)
    with pytest.raises(RaysweepError, match="target error"):
        size_for_error(fit, 1.5)


def test_size_for_error_interval_from_the_bootstrap():
    rng = np.random.default_rng(3)
    n = np.repeat(SIZES, 3)
    boot = bootstrap_fit(n, law(n) * np.exp(rng.normal(0, 0.02, n.size)), n_boot=200, seed=0)
    est = size_for_error(boot, 0.1)
    lo, hi = est.interval
    assert lo <= est.n <= hi
    # The interval's ends are the sizes implied by the resampled laws' percentiles.
    implied = (boot.a / (0.1 - boot.c)) ** (1 / boot.alpha)
    assert lo >= implied.min() and hi <= implied.max()
    # A target at the resamples' median plateau is out of reach for about half of them,
    # so the upper end of its interval is "not reachable".
    target = float(np.median(boot.c))
    assert target > 0
    near = size_for_error(boot, target)
    assert near.unreachable_share == pytest.approx(np.mean(boot.c >= target))
    assert 0.3 < near.unreachable_share < 0.7
    assert math.isinf(near.interval[1]) and "not reachable" in near.describe()


def test_holdout_check_on_known_laws():
    n = np.repeat(SIZES, 2)
    exact = holdout_check(n, law(n))
    assert exact.n_heldout == SIZES.max()
    assert exact.abs_error == pytest.approx(0.0, abs=1e-9)
    # The largest size does worse than the law: the check reports exactly that gap.
    err = law(n)
    err[n == SIZES.max()] += 0.01
    check = holdout_check(n, err)
    assert check.observed == pytest.approx(law(SIZES.max()) + 0.01)
    assert check.predicted == pytest.approx(law(SIZES.max()), rel=1e-6)
    assert check.abs_error == pytest.approx(-0.01, abs=1e-6)
    assert check.rel_error == pytest.approx(check.abs_error / check.observed)
    with pytest.raises(RaysweepError, match="at least 4 distinct"):
        holdout_check(SIZES[:3], law(SIZES[:3]))


@pytest.mark.parametrize("n, err, message", [
    ([1000, 1000, 1000], [0.3, 0.31, 0.29], r"at least 3 distinct training-set sizes, got 1 \(1000\)"),
    ([1000, 2000, 1000, 2000], [0.3, 0.2, 0.31, 0.21], "at least 3 distinct .* got 2"),
    ([1000, 2000, 4000], [0.95, 0.95, 0.95], r"all 3 errors are equal \(0.95\)"),
    ([1000, 2000, 4000], [0.3, float("nan"), 0.2], r"error at point 1 is nan"),
    ([1000, 2000, 4000], [0.3, -0.1, 0.2], r"error at point 1 \(n=2000\) is -0.1; errors must lie in \(0, 1\]"),
    ([1000, 2000, 4000], [0.3, 0.0, 0.2], r"is 0; errors must lie in \(0, 1\]"),
    ([1000, 2000, 4000], [0.3, 1.5, 0.2], r"is 1.5; errors must lie"),
    ([-1000, 2000, 4000], [0.3, 0.25, 0.2], r"training-set size at point 0 is -1000"),
    ([1000, float("inf"), 4000], [0.3, 0.25, 0.2], r"training-set size at point 1 is inf"),
    ([1000, 2000], [0.3, 0.25, 0.2], "2 sizes but 3 errors"),
])
@pytest.mark.parametrize("irreducible", [True, False])
def test_degenerate_input_is_a_clear_error(n, err, message, irreducible):
    with pytest.raises(RaysweepError, match=message):
        fit_power_law(n, err, irreducible=irreducible)


def test_error_that_does_not_fall_has_no_decreasing_law():
    rising = [0.6, 0.56, 0.55, 0.52, 0.5]  # SIZES run from largest to smallest
    with pytest.raises(RaysweepError, match="does not fall with training-set size"):
        fit_power_law(SIZES, rising)
    # The plain line still reports the (negative) slope it finds.
    assert fit_power_law(SIZES, rising, irreducible=False).alpha < 0
