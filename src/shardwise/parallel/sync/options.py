"""The settings a synchronisation strategy takes, apart from the config that carries them.

    options = SyncOptions(grad_compression="bf16", sync_every=8)
    strategy = sync_strategy("local-sgd", options)

`TrainConfig.sync_options()` fills one from the run's flags of the same names; a user's own
loop may build one directly. It lives here, not in the config package, so that `parallel/` never
imports the config (which imports `data/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Compression = Literal["none", "bf16", "fp16", "powersgd"]


@dataclass(frozen=True)
class SyncOptions:
    """Every strategy's knobs; each strategy reads only its own."""

    # allreduce: how DDP's buckets travel.
    grad_compression: Compression = "none"
    powersgd_rank: int = 4
    powersgd_warmup_steps: int = 10  # uncompressed steps first (PowerSGD's start_powerSGD_iter)
    bucket_mb: float = 25.0  # DDP's bucket_cap_mb
    # local-sgd and diloco: how often replicas meet, after how many every-step all-reduces.
    sync_every: int = 8
    sync_warmup_steps: int = 0
    # "node": every-step gradient averaging inside a machine, the exchanges between machines.
    sync_groups: Literal["all", "node"] = "all"
    # diloco: the outer optimizer over the averaged pseudo-gradient.
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_bf16: bool = False
    # Groups a strategy creates itself time out like the run's own.
    timeout_s: float = 300.0
