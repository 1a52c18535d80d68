"""Commands the tools print run as pasted: they name the interpreter that printed them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from raysweep.console import python_command

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
