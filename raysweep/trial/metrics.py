"""Classification metrics for one trial: top-k error and sample-weighted epoch aggregates.

Pure torch, no Ray: the loop, the benchmark and the tests share these definitions. torch is
imported where it is used, so the class-count rule below is free for processes that never train.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def top_k_wrong(logits: "torch.Tensor", targets: "torch.Tensor", k: int) -> "torch.Tensor":
    """Number of rows whose target is not among the k largest logits, as a 0-d tensor.

    Stays on the logits' device so a training loop can accumulate it without a sync.
    Ties are broken as `torch.topk` breaks them; k >= the number of classes gives 0.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and targets (N,), "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= logits.shape[1]:
        return logits.new_zeros((), dtype=targets.dtype)
    top = logits.topk(k, dim=1).indices
    hit = (top == targets.unsqueeze(1)).any(dim=1)
    return (~hit).sum()


def top_k_error(logits: "torch.Tensor", targets: "torch.Tensor", k: int) -> float:
    """Fraction in [0, 1] of rows whose target is not among the k largest logits."""
    n = logits.shape[0]
    if n == 0:
        raise ValueError("top_k_error of an empty batch is undefined")
    return top_k_wrong(logits, targets, k).item() / n


class Meter:
    """Sample-weighted means over an epoch: a batch of n rows weighs n, however small.

    `update(n, loss=batch_mean)` takes means, `add_counts(n, top1=wrong_rows)` takes counts;
    each quantity keeps its own sample count. Values may be floats or 0-d tensors; tensors
    are summed on their device (float64) and only read back in `compute()`, so a GPU loop
    never waits on them.
    """

    def __init__(self) -> None:
        self.sums: dict[str, "torch.Tensor | float"] = {}
        self.weights: dict[str, int] = {}

    def _add(self, name: str, n: int, total: "torch.Tensor | float") -> None:
        if n <= 0:
            raise ValueError(f"a batch must hold at least one sample, got n={n}")
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.weights[name] = self.weights.get(name, 0) + n

    def update(self, n: int, **batch_means: "torch.Tensor | float") -> None:
        for name, mean in batch_means.items():
            self._add(name, n, mean.detach().double() * n if hasattr(mean, "detach") else float(mean) * n)

    def add_counts(self, n: int, **counts: "torch.Tensor | int") -> None:
        """Like `update`, for per-batch counts (e.g. `top_k_wrong`) instead of means: exact."""
        for name, c in counts.items():
            self._add(name, n, c.detach().double() if hasattr(c, "detach") else float(c))

    @property
    def samples(self) -> int:
        """Samples seen (by the quantity seen most)."""
        return max(self.weights.values(), default=0)

    def compute(self) -> dict[str, float]:
        if not self.weights:
            raise ValueError("Meter.compute() before any update")
        return {name: float(s) / self.weights[name] for name, s in self.sums.items()}

    def all_reduce(self) -> None:
        """Sum sums and sample counts across data-parallel workers (no-op without a process group)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        names = sorted(self.sums)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = torch.tensor([float(self.sums[k]) for k in names] + [float(self.weights[k]) for k in names],
                           dtype=torch.float64, device=dev)
        dist.all_reduce(buf)
        vals = buf.tolist()
        self.sums = dict(zip(names, vals[:len(names)]))
        self.weights = {k: int(round(v)) for k, v in zip(names, vals[len(names):])}


def chance_top_k_error(num_classes: int, k: int) -> float:
    """Expected top-k error of a classifier that ignores its input (balanced classes)."""
    return max(0.0, 1.0 - k / num_classes)


def clearly_below_chance(error: float, num_classes: int, n_eval: int, k: int = 5,
                         min_margin: float = 0.02, n_sigma: float = 3.0) -> bool:
    """Whether an error is clearly below chance: by `n_sigma` binomial standard errors of a
    chance-level classifier on `n_eval` samples, and by at least `min_margin`.

    The best of many epochs is a minimum over noisy estimates, hence a wide margin.
    """
    chance = chance_top_k_error(num_classes, k)
    sigma = math.sqrt(chance * (1.0 - chance) / max(n_eval, 1))
    return error < chance - max(min_margin, n_sigma * sigma)


# With fewer classes than this, top-5 error says little (10 classes: chance is 50% and a
# trained model sits near 0), so the error that counts is top-1.
TOP5_MIN_CLASSES = 50


def primary_k(num_classes: int) -> int:
    """The k of the top-k error that measures a model on `num_classes` classes: 5 when
    guessing would still miss at least 90% of the time with five guesses (>= 50 classes),
    else 1. The trial's checkpoint choice, early stopping and the analysis's fit all use it."""
    return 5 if num_classes >= TOP5_MIN_CLASSES else 1


def select_metric(setting: str, num_classes: int) -> str:
    """`train.select_metric` resolved: "auto" -> val_top{primary_k}_error."""
    return f"val_top{primary_k(num_classes)}_error" if setting == "auto" else setting
