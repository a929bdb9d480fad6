"""The run's optimizer, and its code run once on a toy before a memory baseline is read.

    optimizer = build_optimizer(model.parameters(), config)   # AdamW, as the trainer builds it
    warm_optimizer(config, device)    # a process's first AdamW imports torch's compiler stack

The trainer, the parameter server and the launcher's memory baseline share them, so the toy
warms exactly the class the run steps with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shardwise.config import TrainConfig


def build_optimizer(parameters: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """The run's optimizer: AdamW at the config's learning rate and weight decay."""
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def warm_optimizer(config: TrainConfig, device: torch.device) -> None:
    """The optimizer's and clipping's code, run once on a toy before the memory baseline.

    Building the first AdamW in a process imports several hundred modules (torch's compiler
    stack among them: 25-70 MiB resident, whatever the model), and the first clip and step load
    their kernels. That is what the process costs once, as the techniques' warm-ups
    (parallelize.warm_techniques), not the run's state, so the baseline takes it.
    """
    toy = nn.Parameter(torch.ones(4, device=device))
    optimizer = build_optimizer([toy], config)
    (toy * toy).sum().backward()
    torch.nn.utils.clip_grad_norm_([toy], 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
