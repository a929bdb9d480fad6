"""A user's own dataset as this rank's share, one seeded shuffle per epoch, batches on the device.

loader = device_loader(dataset, 32, replicas=2, rank=0, seed=0, device=torch.device("cpu"))
for x, y in loader: ...   # a new permutation each pass, the same one on every rank
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class DeviceLoader:
    """Wraps a DataLoader: a new seeded epoch per pass, tensors moved to the device."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, device: torch.device):
        self.loader = loader
        self.sampler = sampler
        self.device = device
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.loader:
            yield _to_device(batch, self.device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(item, device) for key, item in batch.items()}
    return batch


def device_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    replicas: int,
    rank: int,
    seed: int,
    device: torch.device,
    shuffle: bool = True,
    **kwargs: Any,
) -> DeviceLoader:
    """A DataLoader over replica `rank`'s share of `dataset`, batches moved to `device`."""
    sampler = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    pin = device.type == "cuda"
    inner = DataLoader(dataset, batch_size, sampler=sampler, pin_memory=pin, **kwargs)
    return DeviceLoader(inner, sampler, device)
