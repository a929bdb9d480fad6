"""What a synchronisation strategy sent, and how long it held this rank up: measured, per rank.

    traffic = model.strategy.traffic          # every strategy keeps one
    traffic.bytes, traffic.exchanges          # since the strategy was built, on this rank
    window = traffic.take()                   # the same figures since the previous take

Bytes are counted where the data travels, from the tensor handed to the collective: DDP's
buckets in a wrapper around the registered comm hook (the bucket's fp32 bytes, half of them
under fp16/bf16 compression, PowerSGD's P and Q factors plus its uncompressed tensors, see
compression.py), the flat buckets of `average_over_group`, the parameters of a local-SGD meeting
and DiLoCo's pseudo-gradient (bf16 when `outer_bf16`). They are this rank's payload: what it
handed to all-reduces, not what the network carried for them (a ring moves about twice that).

`seconds` is the time blocked in exchanges the loop's StepClock cannot see: those after the
optimizer step (local-SGD and DiLoCo meetings with DiLoCo's outer step, `finish`), timed by
`with traffic.blocked():`. The exchanges that end the backward are the StepClock's *wait*
already (from this rank's last gradient to the end of backward and `after_backward`): DDP's
buckets, whose all-reduce overlaps the backward so that only that tail blocks, and
`average_over_group` after a pipeline schedule.
A run's sync time per rank is therefore the StepClock wait plus `seconds`, and its compute time
the rest of the step.

`staleness` is a histogram an asynchronous strategy fills (how many updates old the state a
step used was); summary.json's `sync_staleness_histogram` sums it over ranks (null if empty).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class SyncTraffic:
    """One rank's synchronisation payload bytes, exchanges, blocked seconds and staleness."""

    bytes: int = 0  # payload handed to collectives
    exchanges: int = 0  # collectives started (a DDP bucket under PowerSGD starts three)
    seconds: float = 0.0  # blocked in exchanges after the optimizer step (see the module doc)
    staleness: Counter[int] = field(default_factory=Counter)
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)
    _taken: tuple[int, int, float] = field(default=(0, 0, 0.0), repr=False, compare=False)

    def count(self, nbytes: int, exchanges: int = 1) -> None:
        """Add `nbytes` of payload carried by `exchanges` collectives.

        traffic.count(bucket.buffer().numel() * 2)   # one fp16 all-reduce of a bucket
        """
        self.bytes += int(nbytes)
        self.exchanges += exchanges

    def sent(self, tensor: torch.Tensor) -> None:
        """Add one collective that carries `tensor`.

        traffic.sent(flat); dist.all_reduce(flat, group=group)
        """
        self.count(tensor.numel() * tensor.element_size())

    @contextmanager
    def blocked(self) -> Iterator[None]:
        """Add the seconds spent inside the block to `seconds` (exchanges after the step).

        with traffic.blocked():
            average_parameters(params, group)
        """
        started = self.clock()
        try:
            yield
        finally:
            self.seconds += self.clock() - started

    def take(self) -> SyncTraffic:
        """Bytes, exchanges and seconds since the previous `take` (the first: since the start).

        window = traffic.take()   # once per metrics window
        """
        bytes_, exchanges, seconds = self._taken
        self._taken = (self.bytes, self.exchanges, self.seconds)
        return SyncTraffic(self.bytes - bytes_, self.exchanges - exchanges, self.seconds - seconds)


def payload_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes of `tensors` flattened into one buffer (`torch.cat` promotes mixed dtypes).

    payload_bytes([torch.zeros(3), torch.zeros(2, 2)])   # 7 * 4 = 28
    """
    if not tensors:
        return 0
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return sum(tensor.numel() for tensor in tensors) * dtype.itemsize
