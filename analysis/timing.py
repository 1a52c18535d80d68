"""Where the time went, per fraction: training, evaluation, checkpoints, reporting and start-up,
from the trials' per-epoch timings (issue 11, section 1). Pure pandas.

Reporting is what an epoch's wall time (`time_epoch_s`, end of the previous report to the end
of this one) holds beyond its training, evaluation (validation, and the final test when
`time_test_s` is reported) and checkpoint; start-up is each attempt's `time_to_first_step_s`,
counted once per attempt (a resumed trial has several). It ends with the first optimizer step,
which the first epoch's training time also holds: one step counted twice.
"""

from __future__ import annotations

import pandas as pd

PARTS = ["training", "evaluation", "checkpoints", "reporting", "start-up"]
NEEDED = ["time_train_s", "time_eval_s", "time_checkpoint_s", "time_epoch_s", "time_to_first_step_s"]


def _attempt_startup(rows: pd.DataFrame) -> tuple[float, float, float]:
    """(start-up to first step, of which process start-up, of which data load), summed over
    attempts: the values are the same on every row of one attempt, so a change starts the next."""
    cols = [c for c in ("time_to_first_step_s", "time_startup_s", "time_data_load_s") if c in rows]
    vals = rows[cols].fillna(0.0)
    new = (vals != vals.shift()).any(axis=1)
    starts = vals[new]
    return tuple(float(starts[c].sum()) if c in starts else 0.0
                 for c in ("time_to_first_step_s", "time_startup_s", "time_data_load_s"))


def time_table(epochs: pd.DataFrame, trial_ids=None) -> tuple[pd.DataFrame | None, str | None]:
    """Seconds and shares per fraction, summed over its trials (those in `trial_ids`, default all).

    Returns (table, None), or (None, why) for experiments whose trials did not report timings.
    """
    missing = [c for c in NEEDED if c not in epochs]
    if missing:
        return None, (f"the trials do not report {', '.join(missing)} (an experiment made before "
                      "per-epoch timings were recorded)")
    rows = epochs if trial_ids is None else epochs[epochs["trial_id"].isin(set(trial_ids))]
    rows = rows.dropna(subset=NEEDED)
    if rows.empty:
        return None, "no epoch reported its timings"
    out = []
    for fraction, group in rows.groupby("fraction", sort=True):
        work = group[["time_train_s", "time_eval_s", "time_checkpoint_s"]].astype(float)
        if "time_test_s" in group:  # the last epoch tests the best weights inside its wall time
            work["time_eval_s"] += group["time_test_s"].astype(float).fillna(0.0)
        # Clipped at 0: clocks read at slightly different points can leave -1 ms.
        reporting = (group["time_epoch_s"].astype(float) - work.sum(axis=1)).clip(lower=0.0)
        startup = [_attempt_startup(t.sort_values("epoch")) for _, t in group.groupby("trial_id")]
        seconds = {"training": work["time_train_s"].sum(), "evaluation": work["time_eval_s"].sum(),
                   "checkpoints": work["time_checkpoint_s"].sum(), "reporting": reporting.sum(),
                   "start-up": sum(s[0] for s in startup)}
        total = sum(seconds.values())
        row = {"fraction": fraction, "n_train": int(group["n_train"].max()), "trials": group["trial_id"].nunique(),
               "epochs": len(group)}
        for part in PARTS:
            row[f"{part}_s"] = float(seconds[part])
            row[f"{part}_share"] = float(seconds[part] / total) if total > 0 else float("nan")
        row["total_s"] = float(total)
        row["process_start_s"] = float(sum(s[1] for s in startup))
        row["data_load_s"] = float(sum(s[2] for s in startup))
        out.append(row)
    return pd.DataFrame(out), None


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: seconds and share per part, one row per fraction."""
    out = pd.DataFrame({"fraction": table["fraction"].map(lambda f: f"{f:g}"),
                        "n_train": table["n_train"].map(lambda n: f"{int(n):,}"),
                        "trials": table["trials"], "epochs": table["epochs"]})
    for part in PARTS:
        out[part] = [f"{s:,.1f} s ({100 * sh:.0f}%)" for s, sh in zip(table[f"{part}_s"], table[f"{part}_share"])]
    out["total"] = table["total_s"].map(lambda s: f"{s:,.1f} s")
    return out
