"""Mixed precision: autocast for the forward, loss scaling for fp16, clipping in true units.

precision = Precision("bf16", torch.device("cpu"))
with precision.autocast(): loss = model(x).sum()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from shardwise.errors import ShardwiseError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One object for autocast, backward, unscale + clip and the optimizer step."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode == "fp16" and device.type != "cuda":
            raise ShardwiseError("--precision fp16 needs a CUDA GPU; use --precision bf16 on CPU")
        self.mode = mode
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mode not in _DTYPES:
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.mode]):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """Unscale (fp16), then clip the optimizer's gradients to `max_norm` (0: no clipping).

        Returns the global norm before clipping. Under DDP every rank holds the all-reduced
        gradients, so this local norm already is the global one.
        """
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
