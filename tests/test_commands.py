"""Commands the tools print run as pasted: they name the interpreter that printed them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysweep.console import python_command

REPO = Path(__file__).resolve().parent.parent

# A fresh shell: no venv activated, only the system's directories on PATH.
FRESH = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def _paste(line: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", line], cwd=cwd, env=FRESH, capture_output=True, text=True, timeout=120)


def test_in_the_projects_venv_the_command_names_dot_venv(tmp_path, monkeypatch):
    (tmp_path / ".venv").symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    line = python_command("-c", "import pandas, yaml; print('it ran')")
    assert line.startswith(f".venv/bin/{Path(sys.executable).name} -c ")
    run = _paste(line, tmp_path)
    assert run.returncode == 0 and run.stdout == "it ran\n", run.stderr


def test_elsewhere_the_command_names_the_interpreter_by_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = python_command("-c", "import pandas; print('it ran')", "a b")
    assert line.startswith(f"{sys.executable} -c ") and line.endswith(" 'a b'")
    run = _paste(line, tmp_path)
    assert run.returncode == 0 and run.stdout == "it ran\n", run.stderr


@pytest.mark.slow
def test_the_sweeps_next_line_runs_as_pasted(smoke_experiment, tmp_path):
    """The smoke sweep's last line, pasted into a shell with no venv active (plus --out, to keep
    the shared experiment as it is): the analysis runs. ~15 s on 2 cores, after the smoke sweep."""
    last = (smoke_experiment.parent / "cli_stdout.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("Next: ") and not last.startswith("Next: python ")
    run = _paste(f"{last.removeprefix('Next: ')} --out {tmp_path / 'analysis'} --bootstrap 20", REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "analysis" / "report.md").is_file()
