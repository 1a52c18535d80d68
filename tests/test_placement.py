"""A trial's placement group outlives its actor; the sweep's driver frees it
(raysweep.placement)."""

from __future__ import annotations

from types import SimpleNamespace


def test_the_driver_frees_the_placement_group_a_dead_trial_left(ray_session, tmp_path):
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    from raysweep.placement import PLACEMENT_GROUP_FILE, FreePlacementGroups

    run_dir = tmp_path / "trial_t1"
    run_dir.mkdir()

    @ray.remote(num_cpus=0)
    class Trial:
        """Makes a placement group, as Train's controller does in a trial's actor."""

        def start(self, path):
            from ray.util.placement_group import placement_group

            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready(), timeout=60)
            with open(path, "w") as f:
                f.write(pg.id.hex())
            return pg.id.hex()

    trial = Trial.remote()
    pg = PlacementGroup(ray.PlacementGroupID.from_hex(
        ray.get(trial.start.remote(str(run_dir / PLACEMENT_GROUP_FILE)), timeout=120)))
    ray.kill(trial)
    ray.get(ray.remote(num_cpus=0)(lambda: None).remote())  # a round trip after the kill
    # What the callback is for: Ray keeps a placement group whose maker died, until the job ends.
    assert placement_group_table(pg)["state"] == "CREATED"

    free = FreePlacementGroups(tmp_path)
    free.on_trial_error(0, [], SimpleNamespace(trial_id="t1"))
    assert placement_group_table(pg)["state"] == "REMOVED"
    # Again, or for a trial that recorded nothing: nothing to do, and no error.
    free.on_trial_recover(0, [], SimpleNamespace(trial_id="t1"))
    free.on_trial_error(0, [], SimpleNamespace(trial_id="never-started"))
