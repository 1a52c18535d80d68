"""The figures of a fraction × width grid: joint.png (error against n, a line per width, the
joint law through them, and its held-out checks) and frontier.png (model size against data:
the law's error as a map, the best width on the grid at each n, the compute-optimal frontier).

Matplotlib and seaborn as in `analysis.figures`, whose helpers (labels, ticks, saving) it reuses.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import patheffects
from matplotlib.colors import LogNorm
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from analysis.figures import NICE_TICKS, label, log_ticks, save_fig
from analysis.joint import frontier


def _count(m: float) -> str:
    return f"{m / 1e6:.3g}M" if m >= 1e6 else f"{m / 1e3:.3g}k"


def _pct(y, _=None) -> str:
    return f"{100 * y:.3g}%"


def _n_axis(ax, sizes, pad: float = 1.3) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.set_xlim(min(sizes) / pad, max(sizes) * pad)


def _law_text(joint: dict) -> str:
    fit, boot = joint["_fit"], joint.get("_boot")

    def part(sym, p, fmt):
        text = f"{sym} = {fmt.format(getattr(fit, p))}"
        if boot is not None:
            lo, hi = boot.interval(p)
            text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
        return text

    line = (r"$\varepsilon(n,m) = a\,n^{-\alpha} + b\,m^{-\beta} + c$"
            + (rf" in the envelope to $\varepsilon_0$ = {100 * fit.eps0:.0f}%" if fit.envelope else ""))
    return "\n".join([line, ", ".join([part(r"$\alpha$", "alpha", "{:.3f}"), part(r"$\beta$", "beta", "{:.3f}"),
                                       part("c", "c", "{:.3f}")])])


def plot_joint(joint: dict, used: pd.DataFrame, metric: str, title: str):
    """Left: each width's mean error ± 95% CI over seeds, its seeds faint, the joint law through
    them (solid) and the width's own one-axis law (dotted). Right: the held-out checks."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.5, 5.6), gridspec_kw={"width_ratios": [1.7, 1]})
    cells, fit = joint["_cells"], joint.get("_fit")
    widths = sorted(cells["width"].unique())
    colors = dict(zip(widths, sns.color_palette("viridis", len(widths) + 1)[:len(widths)][::-1]))
    sizes = sorted(cells["n_train"].dropna().astype(int).unique())
    grid = np.geomspace(min(sizes) / 1.2, max(sizes) * 1.2, 200)
    own = {row["width"]: row.get("_fit") for row in joint.get("_per_width", [])}
    ys = []
    for k, w in enumerate(widths):
        c, g = cells[cells["width"] == w], used[used["width"] == w]
        dodge = np.exp(0.03 * (k - (len(widths) - 1) / 2))  # keep the widths' error bars apart at one n
        ax.scatter(g["n_train"] * dodge, g[metric], s=14, color=colors[w], alpha=0.35, linewidths=0, zorder=2)
        yerr = np.nan_to_num(np.vstack([c["mean"] - c["ci_low"], c["ci_high"] - c["mean"]]))
        ax.errorbar(c["n_train"] * dodge, c["mean"], yerr=yerr, color=colors[w], marker="o", ms=6, mec="white",
                    mew=0.8, ls="none", elinewidth=1.3, capsize=2.5, zorder=4,
                    label=f"width {w:g} ({_count(c['num_params'].iloc[0])} parameters)")
        ys += list(g[metric]) + [v for v in c["ci_low"].dropna() if v > 0] + list(c["ci_high"].dropna())
        m = float(c["num_params"].iloc[0])
        if fit is not None:
            ax.plot(grid, fit.predict(grid, m), color=colors[w], lw=2, zorder=3)
        if own.get(w) is not None:
            ax.plot(grid, own[w].predict(grid), color=colors[w], lw=1.1, ls=":", zorder=3)
    if fit is not None:
        ax.plot([], [], color="0.3", lw=2, label="joint law (one fit to every width)")
    if any(v is not None for v in own.values()):
        ax.plot([], [], color="0.3", lw=1.1, ls=":", label="each width's own law (pow3)")
    lo, hi = min(ys) / 1.1, min(1.0, max(ys) * 1.1)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    log_ticks(ax, lo, hi)
    _n_axis(ax, sizes)
    ax.set_xlabel("Training images, n (log scale)")
    ax.set_ylabel(f"{label(metric)} (log scale)")
    ax.set_title(f"{title}: {label(metric).lower()} by training-set size and width", loc="left")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: (not labels[j].startswith("width"), j))  # measured first
    ax.legend([handles[j] for j in order], [labels[j] for j in order], loc="lower left", fontsize=8.5,
              frameon=True, framealpha=0.9)
    if fit is not None:
        ax.text(0.0, -0.16, _law_text(joint), transform=ax.transAxes, va="top", fontsize=9.5)
    _plot_holdouts(bx, joint, colors)
    fig.tight_layout()
    return fig


def _plot_holdouts(ax, joint: dict, colors: dict) -> None:
    """Predicted against measured at the held-out cells of both checks; the diagonal is a perfect
    prediction, the band ±2 points (the evidence threshold)."""
    from analysis.evidence import HOLDOUT_POINTS

    by_m = {float(p): w for w, p in zip(joint["_cells"]["width"], joint["_cells"]["num_params"])}
    marks = {"n": ("o", "without the largest n"), "m": ("^", "without the widest model")}
    values = []
    for axis, (marker, what) in marks.items():
        h = joint.get(f"_holdout_{axis}")
        if h is None:
            continue
        for (n, m), obs, pred in zip(h.cells, h.observed_each, h.predicted_each):
            ax.scatter(obs, pred, marker=marker, s=55, color=colors.get(by_m.get(m), "0.4"), edgecolor="black",
                       lw=0.6, zorder=4)
            values += [obs, pred]
        ax.scatter([], [], marker=marker, s=55, facecolor="white", edgecolor="black", lw=0.6,
                   label=f"{what}: mean miss {100 * h.mean_abs_error:.2f} points")
    if not values:
        reason = joint.get("holdout_n_reason") or joint.get("no_fit_reason") or "not done"
        ax.text(0.5, 0.5, "no held-out check:\n" + reason[:80], ha="center", va="center", transform=ax.transAxes,
                fontsize=9, wrap=True)
        ax.set_axis_off()
        return
    lo, hi = min(values) - 0.03, max(values) + 0.03
    line = np.array([lo, hi])
    ax.fill_between(line, line - HOLDOUT_POINTS, line + HOLDOUT_POINTS, color="0.85", lw=0, zorder=1,
                    label=f"±{100 * HOLDOUT_POINTS:g} points")
    ax.plot(line, line, color="0.3", lw=1, zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    for axis_ in (ax.xaxis, ax.yaxis):
        axis_.set_major_formatter(FuncFormatter(_pct))
    ax.set_xlabel("Measured (mean over seeds)")
    ax.set_ylabel("Predicted by the law fitted without it")
    ax.set_title("Held-out checks", loc="left")
    # Below the axes: the held-out cells sit along the diagonal, wherever a legend inside would go.
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), fontsize=8.5, frameon=False, borderaxespad=0)


def plot_frontier(joint: dict, metric: str, title: str):
    """Model size against training images: the law's error as a shaded map, every measured cell
    coloured by its mean error, the best width at each n (stars), and the law's compute-optimal
    m*(n) (solid over the grid, dashed beyond it, with its bootstrap band)."""
    fig, ax = plt.subplots(figsize=(8.6, 6.0))
    cells, best, fit, boot = joint["_cells"], joint["_best"], joint["_fit"], joint.get("_boot")
    sizes = sorted(cells["n_train"].astype(int).unique())
    params = sorted(cells["num_params"].unique())
    n_hi = 10 * max(sizes)
    n_grid = np.geomspace(min(sizes) / 1.5, n_hi * 1.2, 160)
    front = joint["frontier"]
    m_lo, m_hi = min(params) / 4, max([max(params) * 4] + [r["num_params"] * 1.5 for r in front])
    m_hi = min(m_hi, max(params) * 1e3)  # a near-flat width term sends m* off the page; say so, not draw it
    m_grid = np.geomspace(m_lo, m_hi, 160)
    N, M = np.meshgrid(n_grid, m_grid)
    E = fit.predict(N, M)
    norm = LogNorm(vmin=max(min(E.min(), cells["mean"].min()), 1e-3), vmax=max(E.max(), cells["mean"].max()))
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    # Opaque, so a dot's colour can be read against the map around it: where they match, the law fits.
    ax.contourf(N, M, E, levels=np.geomspace(norm.vmin, norm.vmax, 24), cmap=cmap, norm=norm, zorder=0)
    levels = _nice_levels(norm.vmin, norm.vmax)
    # Each contour in black on the light part of the map, in white on the dark part.
    ink = ["black" if np.dot(cmap(norm(v))[:3], [0.299, 0.587, 0.114]) > 0.5 else "white" for v in levels]
    lines = ax.contour(N, M, E, levels=levels, colors=ink, linewidths=0.7, alpha=0.8, zorder=1)
    ax.clabel(lines, fmt=_pct, fontsize=8.5)
    ax.grid(False)  # the contours are the grid here
    sc = ax.scatter(cells["n_train"], cells["num_params"], c=cells["mean"], cmap=cmap, norm=norm, s=75,
                    edgecolor="white", lw=1.0, zorder=4,
                    label="grid cell, coloured by its measured mean error\n"
                          "(it vanishes into the map where the law fits)")
    ax.scatter(best["n_train"], best["num_params"], marker="*", s=300, facecolor="none", edgecolor="black",
               lw=1.3, zorder=5, label="best width on the grid at that n (least measured error, at any cost)")
    if joint.get("frontier_reason"):
        ax.text(0.98, 0.97, textwrap.fill(f"No compute frontier: {joint['frontier_reason']}.", 48),
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, lw=0))
    else:
        _draw_frontier(ax, fit, boot, n_grid, max(sizes))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_grid[0], n_grid[-1])
    ax.set_ylim(m_lo, m_hi)
    # The grid's own sizes, then the frontier table's farthest n (10x the largest).
    ax.xaxis.set_major_locator(FixedLocator([*sizes, n_hi]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _count(y)))
    ax.set_xlabel("Training images, n (log scale)")
    ax.set_ylabel("Model parameters, m (log scale)")
    ax.set_title(f"{title}: which model size pays off at each data size", loc="left")
    cbar = fig.colorbar(sc, ax=ax, pad=0.02)
    cbar.set_ticks(_nice_levels(norm.vmin, norm.vmax))
    cbar.ax.yaxis.set_major_formatter(FuncFormatter(_pct))
    cbar.ax.yaxis.set_minor_locator(NullLocator())
    cbar.set_label(f"{label(metric)} (the law's map; dots: measured)")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.13), fontsize=8.5, frameon=False, borderaxespad=0)
    fig.tight_layout()
    return fig


def _draw_frontier(ax, fit, boot, n_grid, n_max) -> None:
    """m*(n): solid over the grid's sizes, dashed beyond them, its bootstrap band as dotted edges."""
    inside = n_grid <= n_max * 1.0001
    m_star = np.atleast_1d(frontier(fit.values, n_grid))
    fe = fit.alpha / fit.beta
    stroke = [patheffects.withStroke(linewidth=4.5, foreground="white")]  # readable on dark and light map
    ax.plot(n_grid[inside], m_star[inside], color="tab:blue", lw=2.4, zorder=3, path_effects=stroke,
            label=rf"the law's compute-optimal $m^*(n) \propto n^{{{fe:.2f}}}$ (least error at fixed compute "
                  r"$C \propto m\,n$)")
    ax.plot(n_grid[~inside], m_star[~inside], color="tab:blue", lw=2.4, ls="--", zorder=3, path_effects=stroke,
            label="the same beyond the grid's largest n (extrapolated)")
    if boot is not None:
        lo, hi = boot.frontier_interval(n_grid)
        # Its edges only: a filled band as wide as a weak grid gives would grey out the map beneath.
        ax.plot(n_grid, lo, color="tab:blue", lw=1.0, ls=(0, (1, 1.5)), zorder=3,
                label=f"its 95% bootstrap band ({boot.n_ok} resamples of seeds)")
        ax.plot(n_grid, hi, color="tab:blue", lw=1.0, ls=(0, (1, 1.5)), zorder=3)


def _nice_levels(lo: float, hi: float) -> list[float]:
    return [t for t in NICE_TICKS if lo < t < hi]


def draw_joint(joint: dict, used: pd.DataFrame, metric: str, title: str, out: Path) -> None:
    """joint.png and frontier.png into `out`, in the house theme (kept inside this call)."""
    with plt.rc_context():
        sns.set_theme(context="paper", style="whitegrid", font_scale=1.25)
        fig = plot_joint(joint, used, metric, title)
        save_fig(fig, out / "joint.png")
        plt.close(fig)
        if joint.get("_fit") is not None:
            fig = plot_frontier(joint, metric, title)
            save_fig(fig, out / "frontier.png")
            plt.close(fig)
