"""A trial's images on its training device: each split held there as uint8 NHWC tensors (read
once from the prepared cache through Ray Data), or streamed when it does not fit.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from raysweep.data.cache import node_ids
from raysweep.errors import RaysweepError


class DeviceSplit:
    """A split held on the device: uint8 NHWC images and int64 labels, in cache order.
    `read_nodes`: the ids of the nodes that read it, where its rows said (`read_node`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, read_nodes: set[str] | None = None):
        self.images, self.labels = images, labels
        self.read_nodes = read_nodes or set()

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: torch.Generator | None = None) -> Iterator[tuple]:
        n = len(self)
        # One small host-to-device copy per epoch; the order generator stays on the CPU.
        perm = torch.randperm(n, generator=order).to(self.images.device) if order is not None else None
        for start in range(0, n, batch_size):  # no drop_last: the short batch counts by its size
            if perm is None:
                yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                sel = perm[start:start + batch_size]
                yield self.images[sel], self.labels[sel]


class StreamSplit:
    """A split that does not fit on the device: streamed from Ray Data with deep prefetch."""

    def __init__(self, source, n: int, device: torch.device, prefetch: int = 16):
        self.source, self.n, self.device, self.prefetch = source, n, device, prefetch

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, order: torch.Generator | None = None) -> Iterator[tuple]:
        shuffle = {}
        if order is not None:  # the seed comes from the trial's order generator: reproducible
            shuffle = {"local_shuffle_buffer_size": 16 * batch_size,
                       "local_shuffle_seed": int(torch.randint(2**31 - 1, (1,), generator=order))}
        for b in self.source.iter_torch_batches(
                batch_size=batch_size, device=self.device, prefetch_batches=self.prefetch,
                dtypes={"image": torch.uint8, "label": torch.int64},
                pin_memory=self.device.type == "cuda", **shuffle):
            yield b["image"], b["label"]


class _Filler:
    """Device tensors for one split, allocated once at full size (loading never needs twice the
    memory), filled in order."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device, self.filled, self.read_nodes = n, device, 0, set()
        self.images = self.labels = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.images is None:
            self.images = torch.empty((self.n, *x.shape[1:]), dtype=torch.uint8, device=self.device)
            self.labels = torch.empty(self.n, dtype=torch.int64, device=self.device)
        if self.filled + len(x) > self.n:
            raise RuntimeError(f"split has more than the {self.n} rows announced")
        self.images[self.filled:self.filled + len(x)].copy_(x, non_blocking=True)
        self.labels[self.filled:self.filled + len(x)].copy_(y, non_blocking=True)
        self.filled += len(x)

    def split(self, name: str = "") -> DeviceSplit:
        if not self.filled:
            what = f"data split '{name}'" if name else "a data split"
            raise RaysweepError(f"{what} is empty: nothing to train or evaluate on")
        return DeviceSplit(self.images[:self.filled], self.labels[:self.filled], self.read_nodes)


def _numpy_batches(source, chunk: int):
    for batch in source.iter_batches(batch_size=chunk, batch_format="numpy", prefetch_batches=4):
        with warnings.catch_warnings():  # Ray's arrays are read-only; they are only copied from
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.uint8))
            y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        yield batch, x, y


def load_split(source, n: int, device: torch.device, chunk: int = 1024) -> DeviceSplit:
    """Copy a Ray Data split (Dataset or DataIterator, <= n rows) into device tensors, in order,
    noting the nodes that read it where the rows carry `read_node` (PreparedData.dataset)."""
    return load_splits(source, {"": n}, device, chunk)[""]


def load_splits(source, rows: dict[str, int], device: torch.device, chunk: int = 1024) -> dict[str, DeviceSplit]:
    """Copy splits read in one Ray Data execution (PreparedData.datasets: with several, each
    row's `split` is the position of its split in `rows`) into device tensors of their own, in
    order, noting the nodes that read them where the rows carry `read_node`."""
    names = list(rows)
    fills = {name: _Filler(n, device) for name, n in rows.items()}
    for batch, x, y in _numpy_batches(source, chunk):
        nodes = batch.get("read_node")
        if "split" not in batch:  # one split
            parts = [(0, slice(None))]
        else:
            code = torch.from_numpy(np.asarray(batch["split"], dtype=np.int64))
            found = torch.unique(code).tolist()
            # Most batches hold one split: no gather then.
            parts = [(found[0], slice(None))] if len(found) == 1 else [(c, code == c) for c in found]
        for c, sel in parts:
            fill = fills[names[c]]
            if nodes is not None:
                fill.read_nodes |= node_ids(np.asarray(nodes)[sel if isinstance(sel, slice) else sel.numpy()])
            fill.add(x[sel], y[sel])
    return {name: fill.split(name) for name, fill in fills.items()}
