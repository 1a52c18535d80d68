"""Reports from a trial's worker to Train (raysweep.trial.reporting) and from Train's controller to
Tune (trainer._forward_to_tune), without Ray running."""

import json
import threading
import time

import pytest

from raysweep.sweep import trainer
from raysweep.trial.reporting import EARLIER, Reporter, pack, unpack


class FitEndsAsItIsAsked:
    """fit() that writes its last report and ends exactly when asked whether it is still alive:
    the moment a reader that checks liveness after an empty read would lose that report."""

    def __init__(self, path, rows):
        self.path, self.rows, self.asked = path, rows, 0

    def is_alive(self) -> bool:
        self.asked += 1
        if self.asked == 1:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows))
        return False


def test_a_report_written_as_fit_ends_still_reaches_tune(tmp_path, monkeypatch):
    import ray.tune

    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    path = tmp_path / "reports.jsonl"
    path.write_text(json.dumps({"epoch": 1}) + "\n")
    trainer._forward_to_tune(path, FitEndsAsItIsAsked(path, [{"epoch": 2, "test_top1_error": 0.5}]))
    assert reported == [{"epoch": 1}, {"epoch": 2, "test_top1_error": 0.5}]


def test_a_partly_written_line_waits_for_its_end(tmp_path, monkeypatch):
    import ray.tune

    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    path = tmp_path / "reports.jsonl"
    path.write_text('{"epoch": 1}\n{"epo')

    class Finishes:
        def __init__(self):
            self.asked = 0

        def is_alive(self):
            self.asked += 1
            if self.asked == 2:  # the rest of the line lands after the first read
                with open(path, "a") as f:
                    f.write('ch": 2}\n')
            return self.asked < 3

    trainer._forward_to_tune(path, Finishes())
    assert reported == [{"epoch": 1}, {"epoch": 2}]


# --- the worker's reporter ------------------------------------------------------------------

class OneSlotCollector:
    """Stands in for ray.train.report: each call blocks until a collector thread, polling every
    `interval` s as Train's controller does, takes it; records what each report carried."""

    def __init__(self, interval: float):
        self.interval, self.reports, self._slot = interval, [], threading.Semaphore(0)
        self._taken = threading.Semaphore(0)
        self._stop = threading.Event()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        while not self._stop.wait(self.interval):
            if self._slot.acquire(blocking=False):
                self._taken.release()

    def __call__(self, metrics, **kwargs):
        self._slot.release()
        self._taken.acquire()
        self.reports.append((metrics, kwargs))

    def close(self):
        self._stop.set()


def test_pack_and_unpack_keep_every_row_in_order():
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.2}]
    packed = pack(rows)
    assert packed["epoch"] == 3 and packed["loss"] == 1.2  # a report reads as its latest epoch
    assert [r["epoch"] for r in packed[EARLIER]] == [1, 2]
    assert unpack(packed) == rows
    assert unpack({"epoch": 7}) == [{"epoch": 7}]  # a report from before batching
    with pytest.raises(ValueError):
        pack([])


def test_epochs_faster_than_the_collector_travel_together_and_none_waits():
    """A loop whose epochs (10 ms) are far shorter than the collector's poll (100 ms) hands over
    rows only when the reporter is idle: every epoch arrives once, in order, in fewer reports,
    and the loop never blocks on a report."""
    collector = OneSlotCollector(0.1)
    delivered = []
    reporter = Reporter(collector, after=lambda rows: delivered.append([r["epoch"] for r in rows]))
    pending, waited = [], 0.0
    for epoch in range(1, 41):
        time.sleep(0.01)  # the epoch's work
        pending.append({"epoch": epoch})
        if reporter.idle():
            t = time.perf_counter()
            reporter.send(pending)
            waited += time.perf_counter() - t
            pending = []
    if pending:
        reporter.send(pending)
    assert reporter.close(timeout=5)
    collector.close()
    epochs = [row["epoch"] for metrics, _ in collector.reports for row in unpack(metrics)]
    assert epochs == list(range(1, 41))
    assert 2 <= len(collector.reports) <= 20  # ~0.45 s of epochs over a 0.1 s poll: batched
    assert [e for batch in delivered for e in batch] == epochs  # the ledger hook saw each report
    assert waited < 0.2  # handing over never waits for the collector (here: 0.15-0.25 ms in all)


def test_send_waits_for_the_report_out_and_passes_its_arguments():
    collector = OneSlotCollector(0.05)
    reporter = Reporter(collector)
    reporter.send([{"epoch": 1}], checkpoint="c1", checkpoint_dir_name="checkpoint_epoch_0001")
    assert not reporter.idle()  # not collected yet
    reporter.send([{"epoch": 2}])  # waits for the first to be collected
    assert reporter.close(timeout=5)
    collector.close()
    assert [kw for _, kw in collector.reports] == [
        {"checkpoint": "c1", "checkpoint_dir_name": "checkpoint_epoch_0001"}, {}]


def test_a_failed_report_is_raised_in_the_loop():
    def report(metrics, **kwargs):
        raise RuntimeError("controller gone")

    reporter = Reporter(report)
    reporter.send([{"epoch": 1}])
    with pytest.raises(RuntimeError, match="controller gone"):
        reporter.wait(timeout=5)
    reporter.close(timeout=5)


def test_the_controller_forwards_every_epoch_of_a_batched_report(tmp_path):
    path = tmp_path / "reports.jsonl"
    forward = trainer.ForwardReports(str(path))
    forward.after_report(None, [pack([{"epoch": 1}, {"epoch": 2}])], None)
    forward.after_report(None, [pack([{"epoch": 3}])], None)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]


def test_a_worker_failure_train_retries_rides_on_the_next_epoch_to_tune(tmp_path, monkeypatch):
    import ray.tune

    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    path = tmp_path / "reports.jsonl"
    forward = trainer.ForwardReports(str(path), max_failures=1)
    forward.after_report(None, [pack([{"epoch": 1}, {"epoch": 2}])], None)
    lost = RuntimeError("The actor died because its node has died.\nNode Id: abc")
    forward.after_exception(None, {0: lost})  # Train retries: the next row says why
    forward.after_report(None, [pack([{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])], None)  # replay, then 3
    forward.after_exception(None, {0: lost})  # past max_failures: Train gives up, Tune reports it
    trainer._forward_to_tune(path, FitEndsAsItIsAsked(path, []))
    note = "failure 1 of 1 allowed: worker 0 RuntimeError: The actor died because its node has died."
    assert reported == [{"epoch": 1}, {"epoch": 2}, {"epoch": 1, trainer.WORKER_FAILURE: note},
                        {"epoch": 2}, {"epoch": 3}]
