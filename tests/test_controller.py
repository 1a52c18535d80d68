"""Train's controller runs in the actor that calls fit() (Tune's trial actor in a sweep:
raysweep.trainer.SweepTrainer). From a driver it is an actor of its own, as in Ray: the trials
of tests/test_train.py call fit() that way."""

from __future__ import annotations

import json


def _fit(storage: str, out: str) -> None:
    """fit() a SweepTrainer whose worker writes to `out` the actor id of the controller it
    answers to, then reports three epochs. Pickled by value (see the tests)."""
    import ray.train

    from raysweep.trainer import SweepTrainer

    def loop(config):
        import json

        from ray.train.v2._internal.execution.context import get_train_context

        with open(config["out"], "w") as f:
            json.dump({"controller": get_train_context().controller_actor._actor_id.hex()}, f)
        for epoch in range(3):
            ray.train.report({"epoch": epoch})

    SweepTrainer(loop, train_loop_config={"out": out}, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=storage, name="run")).fit()


def test_the_controller_runs_in_the_actor_that_calls_fit(ray_session, tmp_path):
    import sys

    import ray
    import ray.cloudpickle

    # The actor's code travels by value: Ray's workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0)
    class Caller:
        def fit(self, storage, out):
            _fit(storage, out)
            return ray.get_runtime_context().get_actor_id()

    caller = Caller.remote()
    out = tmp_path / "controller.json"
    try:
        caller_id = ray.get(caller.fit.remote(str(tmp_path), str(out)), timeout=300)
    finally:
        ray.kill(caller)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert json.loads(out.read_text())["controller"] == caller_id
