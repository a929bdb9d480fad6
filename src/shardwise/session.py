"""Make your own single-device training loop data parallel with a handful of changed lines.

    session = shardwise.setup()                     # joins torchrun's group, picks the device
    model = session.prepare(MyLSTM())               # on the device, wrapped in DDP
    loader = session.loader(dataset, batch_size=32, shuffle=True)   # this rank's share, on device

Run the script with `torchrun --nproc-per-node N script.py` (or plain `python script.py` for one
process). Each pass over `loader` is a new, seeded epoch; batches arrive on `session.device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from shardwise.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown_distributed
from shardwise.parallel.data_parallel import gradient_sync, wrap_data_parallel


class Session:
    """This process's place in the job, and the few calls a training loop needs."""

    def __init__(self, env: DistEnv, seed: int) -> None:
        self.env = env
        self.seed = seed

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move `model` to this rank's device and wrap it for synchronous data parallelism."""
        return wrap_data_parallel(model, self.env)

    def loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool = True, **kwargs: Any
    ) -> DeviceLoader:
        """A DataLoader over this rank's share of `dataset`; batches come out on the device."""
        sampler = DistributedSampler(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=True,
        )
        pin = self.device.type == "cuda"
        inner = DataLoader(dataset, batch_size, sampler=sampler, pin_memory=pin, **kwargs)
        return DeviceLoader(inner, sampler, self.device)

    def no_sync(
        self, model: nn.Module, accumulating: bool = True
    ) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce while `accumulating` (inner micro-steps)."""
        return gradient_sync(model, enabled=not accumulating)

    def mean(self, value: torch.Tensor | float) -> float:
        """The mean of `value` over all ranks (for logging)."""
        total = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        return float(all_reduce_sum(total, self.env)) / self.world_size

    def close(self) -> None:
        """Leave the process group."""
        shutdown_distributed()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


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


def setup(device: str = "auto", seed: int = 0, timeout_s: float = 300.0) -> Session:
    """Join the job torchrun started (or run alone), pick the device and seed every rank alike."""
    env = init_distributed(device, timeout_s)
    torch.manual_seed(seed)
    return Session(env, seed)
