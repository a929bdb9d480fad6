"""One rank's pipeline stage run by a `torch.distributed.pipelining` schedule, one per shape.

    pipeline = StagePipeline(stage, boundaries, layout, "1f1b", microbatches=4, loss_fn=loss)
    owned = pipeline.train(tokens, targets, scale)   # the last stage's summed loss; 0 elsewhere
    logits = pipeline.forward(tokens)                # on the last stage; None elsewhere

Plain tensors in, plain tensors out: every rank of a pipeline passes the same `tokens` and
`targets` ([rows, length], rows a multiple of `microbatches`); the first stage reads the tokens,
the last the targets. `loss_fn(logits, targets)` runs per micro-batch; what is backpropagated
is that times `scale` (no schedule rescales it), so a caller whose scale divides by the step's
token count gets exact gradients, and `train` returns the unscaled sum.

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

from shardwise.parallel.mesh import Layout
from shardwise.parallel.schedules import SCHEDULES, Schedule, pipeline_schedule
from shardwise.parallel.stages import Autocast, Boundary

if TYPE_CHECKING:  # imported when a pipeline is built: it brings torch._dynamo (~0.5 s a process)
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

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
        schedule: Schedule | str,
        microbatches: int,
        loss_fn: LossFn,
        *,
        device: torch.device | None = None,
        autocast: Autocast = contextlib.nullcontext,
    ) -> None:
        self.schedule = pipeline_schedule(schedule) if isinstance(schedule, str) else schedule
        self.schedule.check(microbatches, layout.pp)
        self.layout = layout
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self.device = device or torch.device("cpu")
        self._scale = 1.0  # of the call in progress: what the backpropagated loss is multiplied by
        self._sums: list[torch.Tensor] = []  # that call's per-micro-batch loss_fn values
        self._boundaries = list(boundaries)
        self._runnable = _ContiguousStage(stage, autocast)
        self._schedules: OrderedDict[tuple, PipelineScheduleSingle] = OrderedDict()

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages this rank holds (its schedule says how many a rank)."""
        return self.schedule.stages_of(self.layout.pp_rank, self.layout.pp)

    @property
    def is_first(self) -> bool:
        return 0 in self.stages

    @property
    def is_last(self) -> bool:
        return self.schedule.stage_count(self.layout.pp) - 1 in self.stages

    def train(
        self, tokens: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        """Forward and backward over all micro-batches, backpropagating `scale` x the loss;
        the unscaled summed loss on the last stage (0 elsewhere)."""
        schedule = self._schedule_for(tokens.shape, train=True)
        self._scale, self._sums = scale, []
        if self.is_first:
            schedule.step(tokens, return_outputs=False)
        elif self.is_last:
            schedule.step(target=targets, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        return sum(self._sums, torch.zeros(()))

    def _scaled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What a schedule backpropagates for one micro-batch; its unscaled value is kept."""
        loss = self.loss_fn(logits, targets)
        self._sums.append(loss.detach().float().cpu())
        return loss * self._scale

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

        (k,) = self.stages  # one stage a rank: the single-stage schedules' PipelineStage
        stage = pipelining.PipelineStage(
            self._runnable,
            k,
            self.schedule.stage_count(self.layout.pp),
            self.device,
            input_args=self._meta(k - 1, rows, length, train),
            output_args=self._meta(k, rows, length, train),
            group=self.layout.group("pp"),
        )
        # Evaluation has no backward to interleave: a plain fill and drain.
        kind = getattr(pipelining, (self.schedule if train else SCHEDULES["gpipe"]).torch_class)
        loss_fn = self._scaled_loss if train else None
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


def warm_up() -> None:
    """Load torch's pipelining before a rank's memory baseline: on CPU its modules (and what
    they import: fx, export, dynamo's pieces) are 35-75 MiB resident, which the first
    schedule would otherwise add to the run's peak, as if they were state."""
    from torch.distributed import pipelining  # noqa: F401


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
    pipeline_schedule(schedule).check(microbatches, stages)
