"""Pipeline-parallel training of one rank's stage, on `torch.distributed.pipelining`.

    runner = PipelineRunner(model, layout, cuts=["blocks.2"], schedule="1f1b", microbatches=4)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=3e-3)
    loss = runner.train_step(batch)          # the step's global token-mean loss, on every rank
    runner.clip_grad_norm(1.0); optimizer.step(); optimizer.zero_grad()

Every rank of a pipeline passes the same `Batch` (draw it with the data-parallel rank, not the
global one): the first stage reads its tokens, the last its targets. The loss of micro-batch m
is its summed token cross-entropy over `batch.step_tokens`, the token count of the whole
optimizer step, and no schedule rescales it; gradients are then summed over data-parallel
replicas, so a step's gradient is exactly that of the global token-mean loss, as in the
data-parallel trainer.

What stock pipelining does not do, and this runner does:
- Stage outputs are made contiguous before they are sent. An LSTM with `batch_first=True`
  returns a transposed view, and gloo refuses to send it ('input tensor has to be contiguous').
- Batches of varying length: rows are padded to a multiple of the micro-batch count and lengths
  to a bucket, and each distinct shape gets its own stage and schedule, kept in a small cache.
  They are built from static shape metadata: one tiny forward at construction finds each stage
  boundary's feature shape, so a new shape costs no probing forward and backward pass.
- The loss reaches every rank, and gradients are summed over replicas and clipped by the norm
  of the whole model across stages and tensor-parallel shards.
With one stage (`--pp 1`) the runner runs the micro-batches itself, one after another, so
tensor- and data-parallel layouts use the same interface.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from shardwise.data.batch import IGNORE_INDEX, Batch
from shardwise.errors import ShardwiseError
from shardwise.parallel.gradients import clip_grad_norm, sum_over_group
from shardwise.parallel.mesh import MODEL, ParallelMesh, check_microbatches
from shardwise.parallel.microbatch import bucket_length, pad_batch, rows_for
from shardwise.parallel.stages import Piece, StageModule, model_pieces, stage_starts
from shardwise.parallel.tensor_parallel import PARTS, parallelize_lm

SCHEDULES: dict[str, type[PipelineScheduleSingle]] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
# Distinct (rows, length) shapes whose stage buffers stay allocated; older ones are rebuilt.
_CACHED_SHAPES = 8

Autocast = Callable[[], AbstractContextManager[None]]
Boundary = tuple[tuple[int, ...], torch.dtype]  # a stage output's shape after [B, T], dtype


class PipelineRunner:
    """This rank's stage of `model`, and one call per optimizer step to train it."""

    def __init__(
        self,
        model: nn.Module,
        layout: ParallelMesh,
        cuts: Sequence[str] = (),
        schedule: str = "1f1b",
        microbatches: int = 4,
        *,
        device: torch.device | None = None,
        length_bucket: int = 32,
        autocast: Autocast | None = None,
        tp_parts: Sequence[str] = PARTS,
    ) -> None:
        """Cut `model` at `cuts` and keep only this rank's stage (others move to "meta").

        runner = PipelineRunner(model, build_mesh(env, pp=2), ["blocks.1"], "gpipe", 4)

        `model` must be the same, fully built model on every rank (same seed); the pieces of
        other stages are moved to the meta device, which frees their memory here. With
        `layout.tp > 1` the stage's `tp_parts` are split over the tensor-parallel ranks.
        `autocast` (e.g. `Precision.autocast`) wraps every stage forward.
        """
        _check_schedule(schedule, microbatches, layout.pp)
        self.layout = layout
        self.schedule = schedule
        self.microbatches = microbatches
        self.device = device or torch.device("cpu")
        self.length_bucket = length_bucket
        self._autocast = autocast or contextlib.nullcontext
        pieces = model_pieces(model)
        starts = stage_starts(model, pieces, cuts, layout.pp)
        self.cuts = list(cuts)
        self._boundaries = _probe_boundaries(model, pieces, starts[1:], self._autocast)
        mine = pieces[starts[layout.pp_rank] : starts[layout.pp_rank + 1]]
        _release(model, [p for p in pieces if p.name not in {m.name for m in mine}])
        self.module = StageModule(model, mine).to(self.device)
        if layout.tp > 1:
            parallelize_lm(self.module, layout.submesh("tp"), tp_parts)
        self._max_len = getattr(model, "max_len", None)
        self._runnable = _ContiguousStage(self.module, self._autocast)
        self._schedules: OrderedDict[tuple, PipelineScheduleSingle] = OrderedDict()

    # ---- what the training loop calls -----------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """This stage's parameters (this rank's shards of them under tensor parallelism)."""
        return self.module.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's state, keyed by the original model's parameter names (DCP-ready)."""
        return self.module.state_dict()

    @property
    def is_first(self) -> bool:
        return self.layout.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.layout.pp_rank == self.layout.pp - 1

    def train_step(
        self, batch: Batch, sync_grads: bool = True, reduce_loss: bool = True
    ) -> torch.Tensor:
        """Forward and backward over `batch` in micro-batches; returns the step's loss.

        loss = runner.train_step(batch)                     # gradients summed over replicas
        runner.train_step(first_half, sync_grads=False)      # accumulate, sync on the last

        The loss is the summed token loss over `batch.step_tokens`, summed over data-parallel
        replicas: the global token-mean loss, the same on every rank. `reduce_loss=False`
        skips that one all-reduce and returns this rank's share instead (non-zero only on the
        last stage's first tensor-parallel rank): a loop that sums shares over all ranks when
        it logs, as the data-parallel trainer does, then needs no collective per step.
        """
        self.module.train()
        tokens, targets = self._shaped(batch)
        if self.layout.pp == 1:
            local = self._accumulate(tokens, targets, batch.step_tokens)
        else:
            local = self._pipeline_train(tokens, targets, batch.step_tokens)
        if sync_grads:
            sum_over_group(self.parameters(), self.layout.group("dp"))
        return self._reduce(local, group=None) if reduce_loss else self._share(local)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """Summed token cross-entropy over `batch`'s real targets, on every rank of this replica.

        total = runner.eval_loss(batch)   # divide by batch.n_tokens (after summing over dp)
        """
        training = self.module.training
        self.module.eval()
        try:
            tokens, targets = self._shaped(batch)
            if self.layout.pp == 1:
                chunks = self._chunks(tokens, targets)
                local = sum(token_loss_sum(self._runnable(t), y) for t, y in chunks)
            else:
                local = self._pipeline_eval(tokens, targets)
            return self._reduce(local, group=self.layout.group(MODEL))
        finally:
            self.module.train(training)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` by the whole model's gradient norm (0: only measure); returns it."""
        return clip_grad_norm(self.parameters(), max_norm, self.layout)

    # ---- one step -----------------------------------------------------------------------------

    def _shaped(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(batch, "segment_ids", None) is not None:
            # Packed rows need their segment mask in every block, not one activation per stage.
            raise ShardwiseError(
                "packed batches cannot run through pipeline or tensor-parallel stages yet; "
                "train with padded batches (no packing) when --pp or --tp is above 1"
            )
        rows, length = batch.tokens.shape
        length = bucket_length(length, self.length_bucket, self._max_len)
        tokens, targets = pad_batch(
            batch.tokens, batch.targets, rows_for(rows, self.microbatches), length
        )
        return tokens.to(self.device), targets.to(self.device)

    def _chunks(self, tokens: torch.Tensor, targets: torch.Tensor) -> Iterator[tuple]:
        return zip(tokens.chunk(self.microbatches), targets.chunk(self.microbatches), strict=True)

    def _accumulate(
        self, tokens: torch.Tensor, targets: torch.Tensor, step_tokens: int
    ) -> torch.Tensor:
        total = torch.zeros(())
        for chunk, chunk_targets in self._chunks(tokens, targets):
            loss = token_loss_sum(self._runnable(chunk), chunk_targets) / step_tokens
            loss.backward()
            total += loss.detach().float().cpu()
        return total

    def _pipeline_train(
        self, tokens: torch.Tensor, targets: torch.Tensor, step_tokens: int
    ) -> torch.Tensor:
        schedule = self._schedule_for(tokens.shape, train=True)
        losses: list[torch.Tensor] = []
        options = {"loss_kwargs": {"step_tokens": step_tokens}, "return_outputs": False}
        if self.is_first:
            schedule.step(tokens, **options)
        elif self.is_last:
            schedule.step(target=targets, losses=losses, **options)
        else:
            schedule.step(**options)
        return sum((loss.detach().float().cpu() for loss in losses), torch.zeros(()))

    def _pipeline_eval(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        schedule = self._schedule_for(tokens.shape, train=False)
        if self.is_first:
            schedule.step(tokens)
            return torch.zeros(())
        logits = schedule.step()
        return token_loss_sum(logits, targets).cpu() if self.is_last else torch.zeros(())

    def _share(self, local: torch.Tensor) -> torch.Tensor:
        """`local` where this rank owns the value (last stage, tensor-parallel rank 0), else 0."""
        owns = self.is_last and self.layout.tp_rank == 0
        return local.detach().float().cpu() if owns else torch.zeros(())

    def _reduce(self, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Sum the owners' values over `group` (None: every rank)."""
        value = self._share(local)
        if self.layout.world_size > 1:
            dist.all_reduce(value, group=group)
        return value

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, step_tokens: int) -> torch.Tensor:
        return token_loss_sum(logits, targets) / step_tokens

    # ---- stages and schedules, one per shape --------------------------------------------------

    def _schedule_for(self, shape: torch.Size, train: bool) -> PipelineScheduleSingle:
        rows, length = shape[0] // self.microbatches, shape[1]
        key = (train, rows, length)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        k = self.layout.pp_rank
        stage = PipelineStage(
            self._runnable,
            k,
            self.layout.pp,
            self.device,
            input_args=self._meta(k - 1, rows, length, train),
            output_args=self._meta(k, rows, length, train),
            group=self.layout.group("pp"),
        )
        kind = SCHEDULES[self.schedule] if train else ScheduleGPipe
        schedule = kind(
            stage, self.microbatches, loss_fn=self._loss if train else None, scale_grads=False
        )
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

    def __init__(self, stage: StageModule, autocast: Autocast) -> None:
        super().__init__()
        self.stage = stage
        self._autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.stage(x).contiguous()


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX (in float32).

    loss = token_loss_sum(model(tokens), targets) / step_tokens
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _check_schedule(schedule: str, microbatches: int, stages: int) -> None:
    # A TrainConfig refuses all of these before any worker starts; they stay here for callers
    # of the Python API, who hand PipelineRunner their own schedule and micro-batch count.
    if schedule not in SCHEDULES:
        raise ShardwiseError(f"--schedule {schedule}: choose one of {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise ShardwiseError(f"--microbatches {microbatches}: use at least 1")
    check_microbatches(schedule, microbatches, stages)


@torch.no_grad()
def _probe_boundaries(
    model: nn.Module, pieces: Sequence[Piece], ends: Sequence[int], autocast: Autocast
) -> list[Boundary]:
    """Each stage output's trailing shape and dtype, from a 1 x 2 token forward of the model."""
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.zeros(1, 2, dtype=torch.long, device=device)
    boundaries = []
    with autocast():
        for index, piece in enumerate(pieces, start=1):
            x = piece.run(x)
            if index in ends:
                if tuple(x.shape[:2]) != (1, 2):
                    raise ShardwiseError(
                        f"piece {piece.name!r} returns shape {tuple(x.shape)} for a 1 x 2 "
                        "token batch; pipeline stages must pass [batch, time, ...] tensors"
                    )
                boundaries.append((tuple(x.shape[2:]), x.dtype))
    return boundaries


def _release(model: nn.Module, others: Sequence[Piece]) -> None:
    # Other ranks train these pieces; "meta" keeps the model's structure without its memory.
    for piece in others:
        for name in piece.names:
            model.get_submodule(name).to("meta")
