"""A sweep's results as one row per trial: summary.csv/.json and the table the sweep ends with.

Read from Tune's ResultGrid; grid points Tune never started (a stopped sweep) get a row too.
"""

from __future__ import annotations

import json
from pathlib import Path

from raysweep.io import atomic_write_json, atomic_write_text

SUMMARY_COLUMNS = [
    "fraction", "width", "seed", "n_train", "num_params", "status", "epochs_done", "max_epochs", "stopped_early", "best_epoch",
    "learned", "select_metric", "best_val_error", "best_val_top5_error", "val_loss", "val_top1_error",
    "val_top5_error", "test_loss", "test_top1_error", "test_top5_error", "steps", "wall_time_s",
    "time_to_first_step_s", "trial_id", "error",
]


def point(params: dict, default_width: float) -> tuple[float, float, int]:
    """A trial's grid point (fraction, width, seed) from its Tune params (a sweep of one width
    made before the width axis has no "width": it is the config's model.width)."""
    width = params.get("width")
    return float(params["fraction"]), float(default_width if width is None else width), int(params["seed"])


def summarize(result_grid, default_width: float = 1.0) -> list[dict]:
    """One row per trial, from a Tune ResultGrid: the final report plus wall time and status."""
    rows = []
    for result in result_grid:
        m = dict(result.metrics or {})
        cfg = result.config or {}
        finished = result.error is None and "test_top5_error" in m
        row = {
            "fraction": cfg.get("fraction"),
            "width": float(cfg.get("width", default_width)),
            "seed": cfg.get("seed"),
            "n_train": m.get("n_train"),
            "status": "TERMINATED" if finished else ("ERROR" if result.error else "UNFINISHED"),
            "epochs_done": m.get("epoch"),
            "wall_time_s": m.get("wall_time_s", m.get("time_total_s")),
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:300] if result.error else "",
        }
        for key in SUMMARY_COLUMNS:
            row.setdefault(key, m.get(key))
        rows.append(row)
    rows.sort(key=grid_order)
    return rows


def complete_grid(rows: list[dict], fractions: list[float], seeds: list[int],
                  widths: list[float] | None = None) -> list[dict]:
    """Add a NOT_STARTED row for each grid point Tune never started (a sweep stopped by Ctrl-C)."""
    widths = widths or [rows[0]["width"] if rows else 1.0]
    seen = {(r["fraction"], r["width"], r["seed"]) for r in rows}
    missing = [dict.fromkeys(SUMMARY_COLUMNS) | {"fraction": f, "width": w, "seed": s, "status": "NOT_STARTED"}
               for f in fractions for w in widths for s in seeds if (f, w, s) not in seen]
    return sorted(rows + missing, key=grid_order)


def grid_order(row: dict) -> tuple:
    """Largest fraction first, then by width, then by seed."""
    return (-(row["fraction"] or 0), row.get("width") or 0, row["seed"] if row["seed"] is not None else -1)


def write_summary(exp_dir: Path, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    atomic_write_text(exp_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_json(exp_dir / "summary.json", rows)


def format_table(rows: list[dict], metric: str = "val_top5_error") -> str:
    """The final table, with the sweep's select metric (e.g. val_top1_error) and its test twin."""
    import pandas as pd

    test = metric.replace("val_", "test_") if metric.startswith("val_") else "test_top5_error"
    several = len({r.get("width") for r in rows}) > 1
    cols = ["fraction", *(["width", "num_params"] if several else []), "seed", "n_train", "status", "epochs_done", "best_epoch", "learned",
            "best_val_error", test, "wall_time_s"]
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)[cols].rename(columns={
        "best_val_error": f"best_{metric}", "epochs_done": "epochs"})
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def finished_points(exp_dir: Path, default_width: float = 1.0) -> set[tuple[float, float, int]]:
    """Grid points whose trial finished in an earlier run of this experiment (from summary.json)."""
    try:
        rows = json.loads((exp_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return set()
    return {point(r, default_width) for r in rows if r.get("status") == "TERMINATED"}
