"""The Train worker's setup hook (raysweep.warm): it warms Train's worker, and only it."""

import sys
import types

import pytest

from raysweep import warm


@pytest.fixture
def fake_module(monkeypatch):
    """A module whose import is recorded, in place of torch & co."""
    imported = []

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name != "rs_warm_probe":
                return None
            from importlib.machinery import ModuleSpec

            class Loader:
                def create_module(self, spec):
                    imported.append(name)
                    return types.ModuleType(name)

                def exec_module(self, module):
                    pass

            return ModuleSpec(name, Loader())

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "rs_warm_probe", raising=False)
    monkeypatch.setattr(warm, "MODULES", ("rs_warm_probe",))
    return imported


def _titles(monkeypatch, *titles):
    seq = list(titles)
    monkeypatch.setattr(warm, "_title", lambda: seq.pop(0) if len(seq) > 1 else seq[0])


def test_the_train_worker_is_warmed_once_its_title_says_so(monkeypatch, fake_module):
    _titles(monkeypatch, b"ray::IDLE", b"ray::IDLE", b"ray::RayTrainWorker.init_train_context")
    warm._warm(wait_s=5, poll_s=0.001)
    assert fake_module == ["rs_warm_probe"]


def test_a_read_task_process_is_left_alone(monkeypatch, fake_module):
    _titles(monkeypatch, b"ray::IDLE", b"ray::MapBatches(_read_rows)")
    warm._warm(wait_s=5, poll_s=0.001)
    assert fake_module == []


def test_no_procfs_or_no_assignment_ends_the_thread(monkeypatch, fake_module):
    _titles(monkeypatch, None)
    warm._warm(wait_s=5, poll_s=0.001)
    _titles(monkeypatch, b"ray::IDLE")
    warm._warm(wait_s=0.05, poll_s=0.001)  # never assigned: gives up at the deadline
    assert fake_module == []


def test_this_process_title_is_read():
    title = warm._title()
    assert title is None or b"python" in title or b"pytest" in title
