"""Sharded data parallel: the data ranks of one copy of the model each keep 1/shard of its
parameters, gradients and optimizer state (PyTorch's FSDP2 `fully_shard`).

    part = shard_model(part, Sharding("full", ranks=2), layout)   # each block, then the root
    optimizer = torch.optim.AdamW(part.parameters())             # after: it steps on shards

Each block is its own unit: its parameters are all-gathered just before its forward (and, in
`full` mode, again for its backward) and its gradients reduce-scattered after its backward, so
a rank holds one block whole at a time. Reduce-scatter averages over the shard's ranks as DDP
averages over replicas, so the loop's loss scale (data ranks over the step's tokens) is exact
as it stands. The strategies' wrap leaves such a module alone (`is_sharded`), gradient
accumulation skips the reduce-scatter (`accumulating`), and an evaluation gathers block by block
as training does, every data rank running the same number of forwards (train/evaluation.py):
gathering the whole model for it would undo the saving.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout

MODES = {
    "full": "ZeRO-3",  # parameters, gradients and optimizer state sharded
    "grads": "ZeRO-2-like",  # parameters kept whole from forward to backward
    "hybrid": "HSDP",  # sharded inside a machine, replicated across machines
}


@dataclass(frozen=True)
class Sharding:
    """How the data ranks share the state: `mode` over `ranks` data ranks, `replicas` copies.

    >>> Sharding("full", ranks=2).describe()
    'sharding: full over 2 data ranks (ZeRO-3)'
    >>> Sharding("hybrid", ranks=4, replicas=2).describe()
    'sharding: hybrid over 4 data ranks, 2 copies (HSDP)'
    >>> Sharding("full", ranks=1).describe()
    'sharding: full over 1 data rank: nothing to share, the model stays whole'
    """

    mode: str
    ranks: int = 1
    replicas: int = 1
    offload: bool = False  # sharded state in host memory (GPU only)
    precision: str = "fp32"  # bf16: parameters gathered and computed in bf16 on GPU

    @property
    def reshards_after_forward(self) -> bool:
        return self.mode != "grads"

    def describe(self) -> str:
        if self.ranks == 1:
            return (
                f"sharding: {self.mode} over 1 data rank: nothing to share, the model stays whole"
            )
        copies = f", {self.replicas} copies" if self.replicas > 1 else ""
        offload = ", state in host memory" if self.offload else ""
        over = f"{self.mode} over {self.ranks} data ranks{copies}{offload}"
        return f"sharding: {over} ({MODES[self.mode]})"

    def record(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "ranks": self.ranks,
            "replicas": self.replicas,
            "offload": self.offload,
        }


def shard_model(part: nn.Module, sharding: Sharding, layout: Layout) -> nn.Module:
    """`part` with each block, then the rest, sharded over the layout's shard mesh; in place.

        part = shard_model(part, Sharding("grads", ranks=2), layout)

    One data rank (or a single process) has nothing to share: `part` is returned as it is.
    """
    device = next(part.parameters(), torch.empty(0)).device
    if sharding.offload and device.type != "cuda":
        raise ShardwiseError(
            f"--offload keeps sharded state in host memory for GPU training; this run trains "
            f"on {device.type}: drop --offload"
        )
    if layout.shard == 1 or layout.device_mesh is None:
        return part
    options: dict[str, Any] = {
        "mesh": layout.shard_mesh(),
        "reshard_after_forward": sharding.reshards_after_forward,
    }
    if sharding.precision == "bf16" and device.type == "cuda":
        # Gathered and computed in bf16, gradients reduced in fp32; on CPU autocast does it.
        options["mp_policy"] = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    if sharding.offload:
        options["offload_policy"] = CPUOffloadPolicy()
    _quiet_view_warning(part)
    for unit in shard_units(part):
        fully_shard(unit, **options)
    fully_shard(part, **options)
    return part


def warm_up(sharding: Sharding, layout: Layout) -> None:
    """One training step of a toy sharded as the run is (two linear blocks, AdamW), then
    dropped. FSDP2's first step builds what stays with the process (DTensor dispatch tables
    and caches, about 30 MiB on CPU with torch 2.13); after this it is part of the baseline a
    rank's peak is measured from. A collective over the shard mesh; the RNG is left as it was.
    """
    if layout.shard == 1 or layout.device_mesh is None:
        return
    device = layout.device
    with torch.random.fork_rng(devices=[]):
        toy = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).to(device)
    toy = shard_model(toy, sharding, layout)
    optimizer = torch.optim.AdamW(toy.parameters())
    toy(torch.ones(2, 16, device=device)).sum().backward()
    optimizer.step()


def shard_units(part: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: the model's layers (as a pipeline names them), less any
    that share a parameter with another (a tied embedding stays with the root).

    >>> from shardwise.models import TransformerLM
    >>> [type(unit).__name__ for unit in shard_units(TransformerLM(dim=8, num_layers=2))]
    ['Embedding', 'Embedding', 'Block', 'Block', 'Sequential']
    """
    names = getattr(part, "layer_names", None)
    names = names() if callable(names) else names
    if names is None and isinstance(part, nn.Sequential):
        names = [name for name, _ in part.named_children()]
    units = [part.get_submodule(name) for name in names or ()]
    units = [unit for unit in units if any(True for _ in unit.parameters())]
    owners: dict[int, int] = {}
    for unit in units:
        for param in unit.parameters():
            owners[id(param)] = owners.get(id(param), 0) + 1
    return [u for u in units if all(owners[id(p)] == 1 for p in u.parameters()) and u is not part]


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is managed by `fully_shard` (its gradients travel by reduce-scatter)."""
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def accumulating(module: nn.Module) -> Iterator[None]:
    """Backward without the reduce-scatter, the parameters kept gathered after it: inner
    gradient-accumulation micro-steps, whose unsharded gradients add up until the last."""
    assert isinstance(module, FSDPModule)
    module.set_requires_gradient_sync(False)
    module.set_reshard_after_backward(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
        module.set_reshard_after_backward(True)


def gradient_payload(module: nn.Module, layout: Layout) -> tuple[int, int]:
    """(bytes, exchanges) this rank hands to one round of gradient reduction: every unit's
    reduce-scatter takes its whole gradient, and with several copies each shard is all-reduced
    across them too."""
    units = [u for u in module.modules() if isinstance(u, FSDPModule)]
    shards = [p for p in module.parameters() if p.requires_grad]
    local = sum(_local(p).numel() * p.element_size() for p in shards)
    copies = layout.replicas > 1
    return local * layout.shard + local * copies, len(units) * (1 + copies)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _quiet_view_warning(part: nn.Module) -> None:
    # FSDP warns once per unit type that a unit returned a view (a Linear on [B, T, H] does):
    # an in-place op on it would skip the pre-backward all-gather. Where every module's forward
    # is torch's or ours, none writes into a unit's output; a user's own module keeps it.
    if all(type(m).__module__.split(".")[0] in ("torch", "shardwise") for m in part.modules()):
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view"
        )
