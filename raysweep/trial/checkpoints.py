"""A trial's checkpoint directories and its ledger: what a restarted worker resumes from.

A checkpoint directory holds `state.pt` (model, optimizer, scheduler, RNGs, steps, epoch,
best-so-far, stop-rule state; the final one holds no optimizer), `best_model.pt` (the best
weights when they are not this epoch's; always in the final one) and `history.json` (every
epoch reported so far, replayed after a restart). The ledger beside them holds the last
report's wall time, so a trial's wall time sums over its attempts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
HISTORY_FILE = "history.json"
LEDGER_FILE = "ledger.json"  # in the Train run directory: wall time of the last report, and whose it was


def load_best_weights(checkpoint_dir: str | Path, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The best-validation weights recorded in a checkpoint directory: their own file, or else
    the checkpoint's model (`state`: its state file, if already read)."""
    d = Path(checkpoint_dir)
    if (d / BEST_FILE).exists():
        return torch.load(d / BEST_FILE, map_location="cpu", weights_only=True)
    if state is None:
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    return state["model"]


def read_checkpoint(checkpoint) -> tuple[dict | None, list[dict], dict | None]:
    """(state, history, best weights) of a `ray.train.Checkpoint`, or (None, [], None)."""
    if not checkpoint:
        return None, [], None
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
        best = None if state.get("final") else load_best_weights(d, state)
    return state, history, best


def save_checkpoint(target: Path, state: dict, meta: dict, best_weights: dict) -> None:
    """Write a checkpoint directory's state: the full `state` (or, once training is over, only
    `meta`: nothing will resume from it), and the best weights when they are not this epoch's."""
    target.mkdir(parents=True, exist_ok=True)
    final = meta["final"]
    torch.save(meta if final else {**state, **meta}, target / STATE_FILE)
    if final or meta["best_epoch"] != meta["epoch"]:
        torch.save(best_weights, target / BEST_FILE)


def write_history(target: str | Path, history: list[dict]) -> None:
    """Every epoch reported so far, this checkpoint's included: replayed after a restart."""
    (Path(target) / HISTORY_FILE).write_text(json.dumps(history))


def write_ledger(run_dir: Path, row: dict) -> None:
    """Atomically replace the small ledger file (no fsync: it only needs to survive a process)."""
    tmp = run_dir / f".{LEDGER_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(row))
    os.replace(tmp, run_dir / LEDGER_FILE)


def read_ledger(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LEDGER_FILE).read_text())
    except (OSError, ValueError):
        return None
