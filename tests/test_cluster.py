"""Trial sizing: what each trial gets, how many run at once, and which requests are refused."""

import pytest

from raysweep.cluster import DATA_CPUS, plan_resources
from raysweep.errors import RaysweepError


def test_cpu_only_machine_gets_one_cpu_worker_and_leaves_a_cpu_for_data():
    plan = plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1, host_cpus=2)
    assert not plan.use_gpu and plan.num_workers == 1 and plan.cpus_per_worker == 1
    assert plan.max_concurrent_trials == 2 - DATA_CPUS == 1
    # The one trial may use both cores once its input is loaded.
    assert plan.torch_threads == 2


def test_cpu_concurrency_follows_cpus():
    plan = plan_resources(cluster_cpus=16, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=4, host_cpus=16)
    assert plan.max_concurrent_trials == (16 - DATA_CPUS) // 4 == 3
    assert plan.torch_threads == 16 // 3


@pytest.mark.parametrize("gpus,per_trial,workers,per_worker,concurrent", [
    (4, 1, 1, 1.0, 4),
    (4, 2, 2, 1.0, 2),
    (1, 0.5, 1, 0.5, 2),
    (8, 0.25, 1, 0.25, 32),
])
def test_gpu_trials(gpus, per_trial, workers, per_worker, concurrent):
    plan = plan_resources(cluster_cpus=64, cluster_gpus=gpus, gpus_per_trial=per_trial, cpus_per_trial=1)
    assert plan.use_gpu
    assert (plan.num_workers, plan.gpus_per_worker, plan.max_concurrent_trials) == (workers, per_worker, concurrent)


def test_gpu_concurrency_is_capped_by_cpus_left_for_data():
    plan = plan_resources(cluster_cpus=3, cluster_gpus=4, gpus_per_trial=1, cpus_per_trial=1)
    assert plan.max_concurrent_trials == 2


def test_more_gpus_per_trial_than_present_is_refused():
    with pytest.raises(RaysweepError, match="--gpus-per-trial 8 is more than the 4 GPU"):
        plan_resources(cluster_cpus=64, cluster_gpus=4, gpus_per_trial=8, cpus_per_trial=1)


def test_explicit_gpus_without_gpus_is_refused_but_the_default_falls_back_to_cpu():
    with pytest.raises(RaysweepError, match="no GPU is available"):
        plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1,
                       gpus_per_trial_explicit=True)
    assert not plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1).use_gpu


def test_a_cluster_too_small_for_one_trial_plus_data_is_refused():
    with pytest.raises(RaysweepError, match="sweep.cpus_per_trial"):
        plan_resources(cluster_cpus=1, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=1)
