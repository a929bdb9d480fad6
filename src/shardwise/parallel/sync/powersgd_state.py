"""PowerSGD's hook state as tensors per parameter, so that a checkpoint restores it exactly.

    memory = PowerSGDMemory(ddp, options)      # on the default group, as the hook averages
    ddp.register_comm_hook(memory.state, hook)   # the hook calls memory.fit(bucket) first
    tensors = memory.state_dict()                # per rank: error feedback differs per replica

PyTorch's `PowerSGDState` keeps its error feedback and warm-start factors per DDP bucket
*index*, as flat tensors in the bucket's layout. A resumed DDP starts with its initial buckets
and cuts them anew after its first step (PyTorch's warm-up normally hides that), so a bucket
index does not name the same parameters before and after. Here the state is saved per
parameter name, and `fit` rebuilds a bucket's flat tensors from that whenever a bucket arrives
cut differently from the one the state was built for. P is recomputed before every use, so
only its allocation is restored (its presence is what tells the hook to reuse Q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from shardwise.parallel.sync.options import SyncOptions

_RNG = "MT19937"  # numpy's RandomState bit generator, the only one PowerSGDState makes


@dataclass(frozen=True)
class _Slot:
    """One parameter's place in a bucket: its gradient's and (if compressed) its Q's."""

    name: str
    offset: int
    numel: int
    q_offset: int  # -1: sent uncompressed
    q_numel: int

    def error_part(self, flat: torch.Tensor) -> torch.Tensor:
        """This parameter's part of a bucket's flat error (a view)."""
        return flat[self.offset : self.offset + self.numel]

    def q_part(self, flat: torch.Tensor) -> torch.Tensor:
        """This parameter's part of a bucket's flat Q (a view); compressed parameters only."""
        return flat[self.q_offset : self.q_offset + self.q_numel]


@dataclass(frozen=True)
class _Layout:
    slots: tuple[_Slot, ...]
    numel: int
    p_numel: int
    q_numel: int


class PowerSGDMemory:
    """PowerSGD's hook state for `ddp`, saved and restored under keys of this replica's own."""

    def __init__(self, ddp: DistributedDataParallel, options: SyncOptions) -> None:
        self.state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=options.powersgd_rank,
            start_powerSGD_iter=options.powersgd_warmup_steps,
        )
        trained = [(n, p) for n, p in ddp.module.named_parameters() if p.requires_grad]
        self.params = dict(trained)
        self.names = {p.data_ptr(): n for n, p in trained}
        # The degree is in the key: another one finds no state of its own and is refused.
        self.prefix = f"powersgd.dp{dist.get_rank()}of{dist.get_world_size()}."
        self.layouts: dict[int, _Layout] = {}  # what each bucket's state was built for
        self.laid_out_at = -1  # the iteration whose buckets `layouts` describes
        self.pending: dict[str, torch.Tensor] = {}  # per-parameter state not yet in a bucket

    def fit(self, bucket: dist.GradBucket) -> None:
        """Make the state's tensors for `bucket` fit the way its parameters are laid out now."""
        index, layout = bucket.index(), self._layout(bucket)
        if self.layouts.get(index) == layout:
            return
        if self.laid_out_at < self.state.iter:  # a new step finds its buckets cut anew
            self.pending |= self._per_parameter()
            self._forget_buckets()
        self.laid_out_at = self.state.iter
        self.layouts[index] = layout
        if self.pending:
            self._restore_bucket(index, layout, bucket.buffer())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The iteration, the seed generator and every parameter's error and Q, as tensors."""
        kind, keys, pos, has_gauss, gauss = self.state.rng.get_state()
        assert kind == _RNG, kind
        memory = self.pending | self._per_parameter()
        tensors = {
            "iter": torch.tensor(self.state.iter, dtype=torch.int64),
            "rng.keys": torch.from_numpy(keys.astype(np.int64)),
            "rng.pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
            "rng.gauss": torch.tensor(gauss, dtype=torch.float64),
            "memory": torch.tensor(int(bool(memory)), dtype=torch.int64),
        }
        # Always every key, zeros before compression starts: a loader's template needs them.
        for name, param in self.params.items():
            for key, size in (("error", param.numel()), ("q", self._q_numel(param.shape))):
                if size:
                    found = memory.get(f"{key}.{name}")
                    zeros = param.new_zeros(size)
                    tensors[f"{key}.{name}"] = zeros if found is None else found
        return {self.prefix + key: value for key, value in tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from `tensors` (`state_dict`'s keys): past the warm-up if it was."""
        mine = {k.removeprefix(self.prefix): v for k, v in tensors.items()}
        self.state.iter = int(mine["iter"])
        pos, has_gauss = (int(value) for value in mine["rng.pos"])
        keys = mine["rng.keys"].numpy().astype(np.uint32)
        self.state.rng.set_state((_RNG, keys, pos, has_gauss, float(mine["rng.gauss"])))
        self._forget_buckets()
        self.pending = {}
        if int(mine["memory"]):
            self.pending = {k: v for k, v in mine.items() if k.startswith(("error.", "q."))}

    def _forget_buckets(self) -> None:
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()
        self.layouts = {}

    def _per_parameter(self) -> dict[str, torch.Tensor]:
        """The buckets' flat error and Q, cut into each parameter's part."""
        parts = {}
        for index, layout in self.layouts.items():
            error = self.state.error_dict.get(index)
            q = self.state.q_memory_dict.get(index)
            for slot in layout.slots:
                if error is not None:
                    parts[f"error.{slot.name}"] = slot.error_part(error).clone()
                if q is not None and slot.q_offset >= 0:
                    parts[f"q.{slot.name}"] = slot.q_part(q).clone()
        return parts

    def _restore_bucket(self, index: int, layout: _Layout, buffer: torch.Tensor) -> None:
        error = buffer.new_zeros(layout.numel)
        q = buffer.new_empty(layout.q_numel)
        for slot in (slot for slot in layout.slots if slot.numel):
            slot.error_part(error).copy_(self.pending.pop(f"error.{slot.name}"))
            if slot.q_offset >= 0:
                slot.q_part(q).copy_(self.pending.pop(f"q.{slot.name}"))
        self.state.error_dict[index] = error
        self.state.q_memory_dict[index] = q
        self.state.p_memory_dict[index] = buffer.new_empty(layout.p_numel)

    def _layout(self, bucket: dist.GradBucket) -> _Layout:
        """Where each parameter's gradient and Q lie, as `powerSGD_hook` lays them out."""
        buffer = bucket.buffer()
        start, width = buffer.data_ptr(), buffer.element_size()
        # The hook packs Q (and P) by matrix shape, in order of first appearance (unbatched).
        shapes: dict[tuple[int, int], list[int]] = {}
        grads = bucket.gradients()
        for i, grad in enumerate(grads):
            shapes.setdefault(_matrix_shape(grad.shape), []).append(i)
        q_offsets, q_at, p_numel = {}, 0, 0
        for (n, m), members in shapes.items():
            rank = min(n, m, self.state.matrix_approximation_rank)
            if self._q_numel((n, m)):
                for i in members:
                    q_offsets[i], q_at, p_numel = q_at, q_at + m * rank, p_numel + n * rank
        slots = tuple(
            _Slot(
                name=self.names[param.data_ptr()],
                offset=(grad.data_ptr() - start) // width,
                numel=grad.numel(),
                q_offset=q_offsets.get(i, -1),
                q_numel=self._q_numel(grad.shape),
            )
            for i, (param, grad) in enumerate(zip(bucket.parameters(), grads, strict=True))
        )
        return _Layout(slots, buffer.numel(), p_numel, q_at)

    def _q_numel(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Q's elements for a gradient of `shape`, or 0 when the hook sends it uncompressed."""
        n, m = _matrix_shape(shape)
        rank = min(n, m, self.state.matrix_approximation_rank)
        worth = powerSGD_hook._should_compress(n, m, rank, self.state.min_compression_rate)[0]
        return m * rank if worth else 0


def _matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    # As the hook views each gradient: tensor.view(tensor.shape[0], -1).
    rows = shape[0]
    return rows, int(np.prod(shape)) // rows if rows else 0
