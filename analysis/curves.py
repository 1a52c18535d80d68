"""The learning-curve families err(n): pow2, pow3 (the scaling law), pow4, exp3, vap3 and mmf4,
each with its parameters, bounds, starting points and inverse; and the checks every fit's
points pass. Fitting them is `analysis.curvefit`; judging them by extrapolation,
`analysis.extrapolation`. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raysweep.errors import RaysweepError



def check_points(n, err) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n, err) for a curve fit; return them as float arrays or raise RaysweepError."""
    n = np.asarray(n, dtype=float).ravel()
    err = np.asarray(err, dtype=float).ravel()
    if n.shape != err.shape:
        raise RaysweepError(f"power-law fit: {n.size} sizes but {err.size} errors")
    for name, values in (("training-set size", n), ("error", err)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise RaysweepError(
                f"power-law fit: {name} at point {bad[0]} is {values[bad[0]]} "
                f"({bad.size} non-finite value(s)); drop or fix those trials first"
            )
    if (n <= 0).any():
        i = int(np.flatnonzero(n <= 0)[0])
        raise RaysweepError(f"power-law fit: training-set size at point {i} is {n[i]:g}; sizes must be positive")
    if ((err <= 0) | (err > 1)).any():
        i = int(np.flatnonzero((err <= 0) | (err > 1))[0])
        raise RaysweepError(
            f"power-law fit: error at point {i} (n={n[i]:g}) is {err[i]:g}; errors must lie in (0, 1] "
            "(a fraction; 0 has no logarithm)"
        )
    sizes = np.unique(n)
    if sizes.size < 3:
        listed = ", ".join(f"{s:g}" for s in sizes)
        raise RaysweepError(
            f"power-law fit needs at least 3 distinct training-set sizes, got {sizes.size} ({listed}): "
            "with fewer, a, alpha and c are not determined"
        )
    if np.ptp(err) == 0:
        raise RaysweepError(
            f"power-law fit: all {err.size} errors are equal ({err[0]:g}), so the error does not change "
            "with training-set size and there is no power law to fit (a model stuck at chance does this)"
        )
    return n, err


def loglog_line(n: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """Least-squares line log(err) = log(a) - alpha * log(n); returns (log a, alpha)."""
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    return float(intercept), float(-slope)


def _log(x):
    with np.errstate(divide="ignore"):  # log(0) = -inf is what logaddexp wants for c = 0
        return np.log(x)


def _signed(x: float, digits: int) -> str:
    return f"{'-' if x < 0 else '+'} {abs(x):.{digits}g}"


def _c_hi(err: np.ndarray) -> float:
    """The plateau's upper bound: just below the smallest error, so every log stays finite."""
    return float(err.min()) * (1 - 1e-9)


@dataclass(frozen=True)
class CurveModel:
    """One family err(n; params). The optimizer works on `theta` (logs of scale parameters), the
    reader sees `params`; `log_pred(theta, n, logn)` is the one definition of the curve, and
    broadcasts when each theta entry is an array of resamples."""

    name: str
    params: tuple[str, ...]
    describe: str
    log_pred: Callable
    to_params: Callable  # theta -> params (same order as `params`)
    to_theta: Callable  # params -> theta
    bounds: Callable  # (n, err) -> (lower, upper) over theta
    starts: Callable  # (n, err) -> list of theta: several, the best fit wins
    show: Callable  # params dict, digits -> "err(n) = ..."
    jac: Callable | None = None
    solve: Callable | None = None  # closed form, for models linear in log space
    invert: Callable | None = None  # (params dict of arrays, target) -> n (inf: never reached)
    decreasing: bool = True  # fit only errors that fall with n
    plateau: str | None = "c"  # the irreducible-error parameter, bounded above by min(err)
    fixed: dict = field(default_factory=dict)  # parameters this family leaves out, e.g. pow2: c = 0
    theta_names: tuple[str, ...] = ()  # the parameter behind each theta entry, where the order differs

    def __post_init__(self):
        if not self.theta_names:
            object.__setattr__(self, "theta_names", self.params)

    @property
    def k(self) -> int:
        return len(self.params)

    def predict(self, params, n) -> np.ndarray:
        """err at sizes `n`; `params` is a sequence in `self.params` order (entries may be arrays)."""
        n = np.asarray(n, dtype=float)
        return np.exp(self.log_pred(self.to_theta(params), n, np.log(n)))


def _pow3_jac(t, n, logn):
    pw = np.exp(t[0] - t[1] * logn)
    model = pw + t[2]
    return np.column_stack([pw / model, -logn * pw / model, 1.0 / model])


def _pow4_jac(t, n, logn):
    lognb = np.log(n + t[2])
    pw = np.exp(t[0] - t[1] * lognb)
    model = np.maximum(pw + t[3], 1e-300)
    return np.column_stack([pw / model, -lognb * pw / model, -t[1] / (n + t[2]) * pw / model, 1.0 / model])


def _exp3_jac(t, n, logn):
    x = n / np.exp(t[1])
    pw = np.exp(t[0] - x)
    model = np.maximum(pw + t[2], 1e-300)
    return np.column_stack([pw / model, x * pw / model, 1.0 / model])


def _mmf4_jac(t, n, logn):
    s = 1 / (1 + np.exp(-t[3] * (logn - t[1])))
    y = t[0] + (t[2] - t[0]) * s
    ds = (t[2] - t[0]) * s * (1 - s) / y
    return np.column_stack([(1 - s) / y, -t[3] * ds, s / y, (logn - t[1]) * ds])


def _pow3_starts(n, err):
    # The log-log line is the c = 0 start; a second start near the plateau keeps the optimizer
    # from stopping at c = 0 when the curve bends (on 300 random laws these two starts found
    # the best of three starts every time).
    out = []
    for share in (0.0, 0.9):
        c0 = share * _c_hi(err)
        la, alpha = loglog_line(n, err - c0)
        out.append(np.array([la, max(alpha, 1e-6), c0]))
    return out


def _pow4_starts(n, err):
    out = []
    for b0 in (0.0, float(n.min())):
        for share in (0.0, 0.9):
            c0 = share * _c_hi(err)
            la, alpha = loglog_line(n + b0, err - c0)
            out.append(np.array([la, max(alpha, 1e-6), b0, c0]))
    return out


def _exp3_starts(n, err):
    out = []
    for tau in np.geomspace(n.min(), n.max(), 3):
        for share in (0.0, 0.9):
            c0 = share * _c_hi(err)
            la = float(np.mean(np.log(err - c0) + n / tau))
            out.append(np.array([la, math.log(tau), c0]))
    return out


def _mmf4_starts(n, err):
    mid = float(np.median(np.log(n)))
    a0 = min(1.0, float(err.max()) * 1.05)
    return [np.array([a0, mid, share * _c_hi(err), d]) for share in (0.0, 0.8) for d in (0.5, 1.5)]


def _vap3_solve(n, err):
    cols = np.column_stack([np.ones_like(n), 1.0 / n, np.log(n)])
    scale = np.linalg.norm(cols, axis=0)  # 1/n is tiny beside log n: scale for a well-posed solve
    sol, *_ = np.linalg.lstsq(cols / scale, np.log(err), rcond=None)
    return sol / scale


def _pow_invert(p, target):
    a, alpha, c = p["a"], p["alpha"], p.get("c", 0.0)
    b = p.get("b", 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = (a / (target - c)) ** (1.0 / alpha) - b
    return np.where((target > c) & (alpha > 0), np.maximum(n, 0.0), np.inf)


def _exp3_invert(p, target):
    with np.errstate(divide="ignore", invalid="ignore"):
        n = -p["tau"] * np.log((target - p["c"]) / p["a"])
    return np.where(target > p["c"], np.maximum(n, 0.0), np.inf)


def _mmf4_invert(p, target):
    a, c, d, nh = p["a"], p["c"], p["d"], p["n_half"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = nh * ((a - target) / (target - c)) ** (1.0 / d)
    return np.where(target > c, np.where(target >= a, 0.0, n), np.inf)


_INF = np.inf
MODELS: dict[str, CurveModel] = {m.name: m for m in [
    CurveModel(
        name="pow2", params=("a", "alpha"), describe="a·n^(-alpha): a plain power law, no plateau",
        log_pred=lambda t, n, logn: t[0] - t[1] * logn,
        to_params=lambda t: (np.exp(t[0]), t[1]), to_theta=lambda p: (np.log(p[0]), p[1]),
        bounds=lambda n, err: ([-_INF, -_INF], [_INF, _INF]), starts=lambda n, err: [],
        show=lambda p, d: f"err(n) = {p['a']:.{d}g}·n^(-{p['alpha']:.{d}f})",
        solve=lambda n, err: np.array(loglog_line(n, err)), invert=_pow_invert,
        decreasing=False, plateau=None, fixed={"c": 0.0}),
    CurveModel(
        name="pow3", params=("a", "alpha", "c"), describe="a·n^(-alpha) + c: a power law with a plateau c",
        log_pred=lambda t, n, logn: np.logaddexp(t[0] - t[1] * logn, _log(t[2])),
        to_params=lambda t: (np.exp(t[0]), t[1], t[2]), to_theta=lambda p: (np.log(p[0]), p[1], p[2]),
        bounds=lambda n, err: ([-_INF, 0.0, 0.0], [_INF, _INF, _c_hi(err)]), starts=_pow3_starts,
        show=lambda p, d: f"err(n) = {p['a']:.{d}g}·n^(-{p['alpha']:.{d}f}) + {p['c']:.{d}f}",
        jac=_pow3_jac, invert=_pow_invert),
    CurveModel(
        name="pow4", params=("a", "b", "alpha", "c"),
        describe="a·(n + b)^(-alpha) + c: a power law that starts flat below n ≈ b",
        log_pred=lambda t, n, logn: np.logaddexp(t[0] - t[1] * np.log(n + t[2]), _log(t[3])),
        to_params=lambda t: (np.exp(t[0]), t[2], t[1], t[3]), to_theta=lambda p: (np.log(p[0]), p[2], p[1], p[3]),
        # alpha and b bounded: as both grow, (n + b)^-alpha tends to exp(-n·alpha/b), which
        # exp3 describes; unbounded, the optimizer chases that limit for a thousand steps.
        bounds=lambda n, err: ([-_INF, 0.0, 0.0, 0.0], [_INF, 10.0, 10 * float(n.max()), _c_hi(err)]),
        starts=_pow4_starts, jac=_pow4_jac, invert=_pow_invert, theta_names=("a", "alpha", "b", "c"),
        show=lambda p, d: f"err(n) = {p['a']:.{d}g}·(n + {p['b']:,.0f})^(-{p['alpha']:.{d}f}) + {p['c']:.{d}f}"),
    CurveModel(
        name="exp3", params=("a", "tau", "c"), describe="a·exp(-n/tau) + c: exponential decay to a plateau",
        log_pred=lambda t, n, logn: np.logaddexp(t[0] - n / np.exp(t[1]), _log(t[2])),
        to_params=lambda t: (np.exp(t[0]), np.exp(t[1]), t[2]),
        to_theta=lambda p: (np.log(p[0]), np.log(p[1]), p[2]),
        bounds=lambda n, err: ([-_INF, math.log(n.min()) - 3, 0.0], [_INF, math.log(n.max()) + 3, _c_hi(err)]),
        starts=_exp3_starts, jac=_exp3_jac, invert=_exp3_invert,
        show=lambda p, d: f"err(n) = {p['a']:.{d}g}·exp(-n/{p['tau']:,.0f}) + {p['c']:.{d}f}"),
    CurveModel(
        name="vap3", params=("a", "b", "c"), describe="exp(a + b/n + c·log n): vapor-pressure curve",
        log_pred=lambda t, n, logn: t[0] + t[1] / n + t[2] * logn,
        to_params=lambda t: (t[0], t[1], t[2]), to_theta=lambda p: (p[0], p[1], p[2]),
        bounds=lambda n, err: ([-_INF] * 3, [_INF] * 3), starts=lambda n, err: [],
        show=lambda p, d: f"err(n) = exp({p['a']:.{d}g} {_signed(p['b'], d)}/n {_signed(p['c'], d)}·log n)",
        solve=_vap3_solve, decreasing=False, plateau=None),
    CurveModel(
        name="mmf4", params=("a", "n_half", "c", "d"),
        describe="c + (a - c)/(1 + (n/n_half)^d): Morgan-Mercer-Flodin, (a·b + c·n^d)/(b + n^d) with b = n_half^d",
        log_pred=lambda t, n, logn: np.log(t[0] + (t[2] - t[0]) / (1 + np.exp(-t[3] * (logn - t[1])))),
        to_params=lambda t: (t[0], np.exp(t[1]), t[2], t[3]), to_theta=lambda p: (p[0], np.log(p[1]), p[2], p[3]),
        bounds=lambda n, err: ([1e-6, math.log(n.min()) - 5, 0.0, 0.01],
                               [1.0, math.log(n.max()) + 5, _c_hi(err), 20.0]),
        starts=_mmf4_starts, jac=_mmf4_jac, invert=_mmf4_invert,
        show=lambda p, d: (f"err(n) = {p['c']:.{d}f} + {p['a'] - p['c']:.{d}g}/(1 + (n/{p['n_half']:,.0f})"
                           f"^{p['d']:.{d}f})")),
]}
MODEL_NAMES = list(MODELS)


def get_model(name: str) -> CurveModel:
    if name not in MODELS:
        raise RaysweepError(f"unknown curve model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return MODELS[name]
