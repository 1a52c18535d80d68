"""The Ray side of a sweep: the Tune grid and CLI, each trial's TorchTrainer, trial logs, console, summary, manifest, tracking, and the one module that touches Ray's internals (ray_compat)."""
