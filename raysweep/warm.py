"""The Ray worker-process setup hook of a trial's Train workers (`warm_worker`), apart from every
other module so that a process running it imports nothing else at start-up.

A trial's worker process starts, imports Ray Train, and waits while Train's controller sets it
up; only then does it receive the training function and import torch (and, with the first
optimizer, torch._dynamo): ~3 s in a row on a small machine, between trial start and the first
step. The hook imports them in a thread of the worker's own from the moment the process turns
out to be Train's worker, in those waits. Tasks the worker starts (its Ray Data reads) inherit
the hook with its runtime environment; their processes are left alone.
"""

from __future__ import annotations

import threading
import time

TRAIN_WORKER = b"ray::RayTrainWorker"  # the process title Ray gives Train's worker actor
MODULES = ("torch", "torch._dynamo", "raysweep.train")
# A worker is usually given its task or actor within a second or two of starting: the title is
# read every poll_s for FAST_S, then every SLOW_POLL_S. Reading it costs ~0.8% of a core at
# 50 a second (measured here), and a worker kept idle would pay that for the whole wait.
FAST_S, SLOW_POLL_S = 5.0, 0.5


def _title() -> bytes | None:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except OSError:  # no procfs (macOS): nothing to warm
        return None


def _import(modules) -> None:
    import importlib

    for module in modules:
        importlib.import_module(module)


def import_in_thread(*modules: str) -> threading.Thread:
    """Start importing `modules`, in order, in a daemon thread; join it before using them."""
    thread = threading.Thread(target=_import, args=(modules,), name="raysweep-imports", daemon=True)
    thread.start()
    return thread


def _warm(wait_s: float, poll_s: float) -> None:
    start = time.monotonic()
    deadline = start + wait_s
    while time.monotonic() < deadline:
        title = _title()
        if title is None:
            return
        if title.startswith(TRAIN_WORKER):
            _import(MODULES)
            return
        if title.startswith(b"ray::") and not title.startswith(b"ray::IDLE"):
            return  # a task's process (a Ray Data read): not the trainer
        time.sleep(poll_s if time.monotonic() - start < FAST_S else SLOW_POLL_S)


def warm_worker(wait_s: float = 120.0, poll_s: float = 0.02) -> threading.Thread:
    """Ray's `worker_process_setup_hook` ("raysweep.warm.warm_worker"): start the thread."""
    thread = threading.Thread(target=_warm, args=(wait_s, poll_s), name="raysweep-warm", daemon=True)
    thread.start()
    return thread
