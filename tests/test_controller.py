"""Train's controller runs in the actor that calls fit() (Tune's trial actor in a sweep:
raysweep.trainer.SweepTrainer), and that actor starts none of Train's helper actors for a
one-worker run: no synchronisation actor (SoleWorkerSync answers in the worker) and no
placement-group cleaner (the run records its group for the sweep's driver instead). From a
driver the controller is an actor of its own, as in Ray: the trials of tests/test_train.py call
fit() that way."""

from __future__ import annotations

import json

import pytest


def _fit(storage: str, out: str) -> None:
    """fit() a SweepTrainer whose worker writes to `out` the actor id of the controller it
    answers to and the type of its synchronisation actor, then reports three epochs, the last
    with a checkpoint (Train agrees on its directory through the synchronisation actor).
    Pickled by value (see the tests)."""
    import ray.train

    from raysweep.trainer import SweepTrainer

    def loop(config):
        import json
        import os
        import tempfile

        from ray.train.v2._internal.execution.context import get_train_context

        ctx = get_train_context()
        with open(config["out"], "w") as f:
            json.dump({"controller": ctx.controller_actor._actor_id.hex(),
                       "sync": type(ctx.get_synchronization_actor()).__name__}, f)
        for epoch in range(3):
            if epoch < 2:
                ray.train.report({"epoch": epoch})
                continue
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "weights"), "w") as f:
                    f.write("w")
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(d))

    result = SweepTrainer(loop, train_loop_config={"out": out}, scaling_config=ray.train.ScalingConfig(num_workers=1),
                          run_config=ray.train.RunConfig(storage_path=storage, name="run")).fit()
    assert result.checkpoint is not None and result.metrics["epoch"] == 2


def test_the_controller_runs_in_the_actor_that_calls_fit_and_starts_no_helper_actors(ray_session, tmp_path):
    import sys

    import ray
    import ray.cloudpickle
    from ray.util.placement_group import PlacementGroup, placement_group_table

    from raysweep.placement import PLACEMENT_GROUP_FILE

    # The actor's code travels by value: Ray's workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0)
    class Caller:
        def fit(self, storage, out):
            from ray.train.v2._internal.execution.worker_group import state, worker_group

            trains_own = (worker_group.SynchronizationActor, state._shutdown_sync_actor)
            _fit(storage, out)
            # Train's own synchronisation actor is back in place once fit() returns.
            restored = trains_own == (worker_group.SynchronizationActor, state._shutdown_sync_actor)
            return ray.get_runtime_context().get_actor_id(), restored

    caller = Caller.remote()
    out = tmp_path / "controller.json"
    try:
        caller_id, restored = ray.get(caller.fit.remote(str(tmp_path), str(out)), timeout=300)
    finally:
        ray.kill(caller)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    seen = json.loads(out.read_text())
    assert seen["controller"] == caller_id
    assert seen["sync"] == "SoleWorkerSync"
    assert restored
    # The run recorded its worker group's placement group, which it freed at its end.
    pg_id = (tmp_path / "run" / PLACEMENT_GROUP_FILE).read_text()
    assert placement_group_table(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))["state"] == "REMOVED"


def test_sole_worker_sync_puts_trains_actor_back_after_an_error():
    from ray.train.v2._internal.execution.worker_group import state, worker_group

    from raysweep.trainer import SoleWorkerSync, sole_worker_sync

    before = (worker_group.SynchronizationActor, state._shutdown_sync_actor)
    with pytest.raises(RuntimeError):
        with sole_worker_sync():
            made = worker_group.SynchronizationActor.options(label_selector={}).remote(timeout_s=1)
            assert isinstance(made, SoleWorkerSync)
            state._shutdown_sync_actor(made)  # not an actor: nothing to kill, and no error
            raise RuntimeError("the run failed")
    assert (worker_group.SynchronizationActor, state._shutdown_sync_actor) == before
