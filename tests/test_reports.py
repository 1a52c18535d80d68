"""Reports from Train's controller to Tune (trainer._forward_to_tune), without Ray running."""

import json

from raysweep import trainer


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
