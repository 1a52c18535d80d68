"""What `--resume` may change: nothing its stored config fixes. A resumed sweep is the sweep that
was started (Tuner.restore keeps the stored grid and trials: it cannot add seeds or fractions, nor
give a trial another recipe), so options that contradict `raysweep_config.json` are refused,
before Ray starts, in one line that names them and says how to start a new experiment.

Safe on resume, because the config does not hold them: --address, --dashboard-host, --num-gpus,
--mlflow, --verbose, --quiet (and --name, --storage-path, which pick the experiment). --config,
--set and the config's own flags (--epochs, --seeds, ...) pass when they agree with it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from raysweep.config import Config, apply_override, read_config_file
from raysweep.errors import RaysweepError

# Keys the first start settles from the machine when the config leaves them to it (0 = auto,
# e.g. torch threads per CPU trial): a config that still says "auto" agrees with what was stored.
AUTO = {("train", "num_threads"): 0}


def _leaves(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


def check_resume(exp_dir: Path, stored: dict, config_path: str | None, asked: list[tuple[str, str]]) -> None:
    """Raise RaysweepError unless the options agree with the stored config `stored`.

    `asked` holds (`key=value` assignment, how the user wrote it), e.g. ("train.epochs=5",
    "--epochs 5"), in the order they apply; `config_path` is --config (None: not given).
    """
    if not config_path and not asked:
        return
    raw = read_config_file(config_path) if config_path else copy.deepcopy(stored)
    for assignment, _ in asked:
        apply_override(raw, assignment)
    new_start = "start a new experiment: drop --resume and pass --name NEW"
    try:
        wanted = Config.from_dict(raw).to_dict()
    except RaysweepError as err:
        raise RaysweepError(f"--resume: the options asked for do not make a valid config ({err}); a resumed "
                            f"sweep runs its stored config ({exp_dir.name}/raysweep_config.json); to change it, "
                            f"{new_start}") from None
    old, new = _leaves(stored), _leaves(wanted)
    parts = []
    for key in new:
        if key not in old or old[key] == new[key] or AUTO.get(key, object()) == new[key]:
            continue
        dotted = ".".join(key)
        how = [shown for assignment, shown in asked if assignment.partition("=")[0].strip() == dotted]
        source = how[-1] if how else f"--config {config_path}"
        parts.append(f"{dotted} {new[key]!r} ({source}; stored: {old[key]!r})")
    if parts:
        them = "it" if len(parts) == 1 else "them"
        raise RaysweepError(
            f"--resume: {', '.join(parts)} contradict{'s' if len(parts) == 1 else ''} the stored config of "
            f"{exp_dir.name} (raysweep_config.json); a resumed sweep runs the config it was started with "
            f"(Tune cannot add or change the trials of a stored sweep). To run with {them}, {new_start}")
