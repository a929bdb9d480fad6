"""One rank's pipeline stage run by a `torch.distributed.pipelining` schedule, one per shape.

    pipeline = StagePipeline(stage, boundaries, layout, "1f1b", microbatches=4, loss_fn=loss)
    owned = pipeline.train(tokens, targets)   # the last stage's summed loss; 0 elsewhere
    logits = pipeline.forward(tokens)         # on the last stage; None elsewhere

Plain tensors in, plain tensors out: every rank of a pipeline passes the same `tokens` and
`targets` ([rows, length], rows a multiple of `microbatches`); the first stage reads the tokens,
the last the targets. `loss_fn(logits, targets)` runs per micro-batch and no schedule rescales
it, so a caller that divides by the step's token count gets exact gradients.

What stock pipelining does not do, and this does:
- Stage outputs are made contiguous before they are sent. An LSTM with `batch_first=True`
  returns a transposed view, and gloo refuses to send it ('input tensor has to be contiguous').
- Batches of varying shape: each distinct (rows, length) gets its own stage and schedule, kept
  in a small cache, built from the boundary shapes `keep_stage` probed once, so a new shape
  costs no probing pass.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout, check_microbatches
from shardwise.parallel.stages import Autocast, Boundary

if TYPE_CHECKING:  # imported when a pipeline is built: it brings torch._dynamo (~0.5 s a process)
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}  # names in torch's pipelining
# Distinct (rows, length) shapes whose stage buffers stay allocated; older ones are rebuilt.
_CACHED_SHAPES = 8

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StagePipeline:
    """This rank's stage of a `layout.pp`-stage pipeline, and its schedules by input shape."""

    def __init__(
        self,
        stage: nn.Module,
        boundaries: Sequence[Boundary],
        layout: Layout,
        schedule: str,
        microbatches: int,
        loss_fn: LossFn,
        *,
        device: torch.device | None = None,
        autocast: Autocast = contextlib.nullcontext,
    ) -> None:
        check_schedule(schedule, microbatches, layout.pp)
        self.layout = layout
        self.schedule = schedule
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self.device = device or torch.device("cpu")
        self._boundaries = list(boundaries)
        self._runnable = _ContiguousStage(stage, autocast)
        self._schedules: OrderedDict[tuple, PipelineScheduleSingle] = OrderedDict()

    @property
    def is_first(self) -> bool:
        return self.layout.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.layout.pp_rank == self.layout.pp - 1

    def train(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward over all micro-batches; the summed loss on the last stage."""
        schedule = self._schedule_for(tokens.shape, train=True)
        losses: list[torch.Tensor] = []
        if self.is_first:
            schedule.step(tokens, return_outputs=False)
        elif self.is_last:
            schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        return sum((loss.detach().float().cpu() for loss in losses), torch.zeros(()))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The logits for `tokens` on the last stage (None on the others)."""
        schedule = self._schedule_for(tokens.shape, train=False)
        if self.is_first:
            schedule.step(tokens)
            return None
        logits = schedule.step()
        return logits if self.is_last else None

    def _schedule_for(self, shape: torch.Size, train: bool) -> PipelineScheduleSingle:
        rows, length = shape[0] // self.microbatches, shape[1]
        key = (train, rows, length)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        from torch.distributed import pipelining

        k = self.layout.pp_rank
        stage = pipelining.PipelineStage(
            self._runnable,
            k,
            self.layout.pp,
            self.device,
            input_args=self._meta(k - 1, rows, length, train),
            output_args=self._meta(k, rows, length, train),
            group=self.layout.group("pp"),
        )
        kind = getattr(pipelining, SCHEDULES[self.schedule] if train else "ScheduleGPipe")
        loss_fn = self.loss_fn if train else None
        schedule = kind(stage, self.microbatches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = schedule
        if len(self._schedules) > _CACHED_SHAPES:
            self._schedules.popitem(last=False)
        return schedule

    def _meta(self, stage: int, rows: int, length: int, train: bool) -> torch.Tensor:
        """A meta tensor shaped like stage `stage`'s output (-1: the token input)."""
        if stage < 0:
            return torch.empty(rows, length, dtype=torch.long, device="meta")
        trailing, dtype = self._boundaries[stage]
        out = torch.empty(rows, length, *trailing, dtype=dtype, device="meta")
        return out.requires_grad_(train and dtype.is_floating_point)


class _ContiguousStage(nn.Module):
    """Runs a stage under autocast and hands on a contiguous output that gloo can send."""

    def __init__(self, stage: nn.Module, autocast: Autocast) -> None:
        super().__init__()
        self.stage = stage
        self._autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.stage(x).contiguous()


def check_schedule(schedule: str, microbatches: int, stages: int) -> None:
    """A known schedule, and enough micro-batches for it (a TrainConfig checks this too)."""
    if schedule not in SCHEDULES:
        raise ShardwiseError(f"--schedule {schedule}: choose one of {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise ShardwiseError(f"--microbatches {microbatches}: use at least 1")
    check_microbatches(schedule, microbatches, stages)
