"""A model prepared for its layout: this rank's part of it, and one call per micro-step.

    model = parallelize(MyLM(), parallelism, env)   # parallel/parallelism.py
    owned = model.forward_backward(tokens, targets, step_tokens, sync=last_micro_step)
    norm = model.clip_grad_norm(1.0)

`forward_backward` runs a pipeline schedule when the model has stages and a plain forward and
backward otherwise. Its loss is the summed token cross-entropy times `dp / step_tokens`, where
`step_tokens` counts the real targets of the whole optimizer step over every replica and
micro-step: replicas then *average* gradients (whatever the sync strategy), and the step's
gradient is exactly that of the global token-mean loss, for any split. It returns the summed
loss that *this rank owns* (the last stage's first tensor-parallel rank under model
parallelism, every replica otherwise), so summing the returns over all ranks counts each
micro-batch once, with no collective per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.loss import token_loss_sum
from shardwise.models.contract import PLAIN, ModelContract
from shardwise.parallel.data_parallel import unwrap
from shardwise.parallel.gradients import clip_grad_norm
from shardwise.parallel.mesh import Layout
from shardwise.parallel.microbatch import bucket_length, pad_batch, rows_for
from shardwise.parallel.pipeline import StagePipeline
from shardwise.parallel.sharding import is_sharded
from shardwise.parallel.stages import Autocast
from shardwise.parallel.sync import SyncStrategy

Backward = Callable[[torch.Tensor], None]


class ParallelModel(nn.Module):
    """This rank's part of a model under `layout`, named as the original model names it."""

    def __init__(
        self,
        module: nn.Module,
        layout: Layout,
        strategy: SyncStrategy,
        pipeline: StagePipeline | None = None,
        *,
        autocast: Autocast = contextlib.nullcontext,
        backward: Backward = torch.Tensor.backward,
        length_bucket: int = 32,
        max_len: int | None = None,
        contract: ModelContract = PLAIN,
    ) -> None:
        super().__init__()
        self.module = module  # what forward and backward run through (DDP, a stage, a shard)
        self.contract = contract  # how the whole model takes tokens and gives logits
        self.layout = layout
        self.strategy = strategy
        self.pipeline = pipeline
        self.length_bucket = length_bucket
        self.max_len = max_len
        self._autocast = autocast
        self._backward = backward
        self._loss_scale = 1.0

    # ---- what the model is, for optimizers, checkpoints and users ------------------------------

    @property
    def part(self) -> nn.Module:
        """This rank's part of the model (all of it without stages), with the model's own names."""
        return unwrap(self.module)

    @property
    def holds_whole_model(self) -> bool:
        """Whether this rank holds every parameter whole (no stages, splits or shards)."""
        return self.layout.replica_size == 1 and not is_sharded(self.part)

    @property
    def owns_loss(self) -> bool:
        """Whether this rank's returns count (not a copy of another rank's)."""
        last = self.pipeline is None or self.pipeline.is_last  # holds the stage with the loss
        return last and self.layout.tp_rank == 0

    def named_parameters(self, *args: object, **kwargs: object) -> Iterator:  # type: ignore[override]
        return self.part.named_parameters(*args, **kwargs)  # no "module." prefix

    def state_dict(self, *args: object, **kwargs: object) -> dict:  # type: ignore[override]
        return self.part.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        return self.part.load_state_dict(*args, **kwargs)

    @property
    def forwards_meet(self) -> bool:
        """Whether every forward is a collective of the data ranks (a sharded model gathers
        each block in it), so that they must run the same number of forwards."""
        return is_sharded(self.part)

    # ---- the loop's calls --------------------------------------------------------------------

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """The model's own forward, under the run's autocast (not with pipeline stages)."""
        if self.pipeline is not None:
            raise ShardwiseError(
                "a model cut into pipeline stages has no forward of its own on one rank: call "
                "session.forward_backward(model, inputs, targets) or session.evaluate(...)"
            )
        with self._autocast():
            return self.module(*args, **kwargs)

    def forward_backward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        step_tokens: int,
        *,
        sync: bool = True,
        **model_kwargs: torch.Tensor,
    ) -> torch.Tensor:
        """Forward and backward over one micro-batch; the summed token loss this rank owns.

        owned = model.forward_backward(tokens, targets, step_tokens, sync=is_last_micro_step)
        """
        self._loss_scale = self.layout.data_ranks / step_tokens
        quiet = contextlib.nullcontext() if sync else self.strategy.skipping(self.module)
        with quiet:
            if self.pipeline is None:
                loss_sum = self._plain_loss_sum(tokens, targets, model_kwargs, self.module)
                self._backward(loss_sum * self._loss_scale)
                owned = loss_sum.detach().float()
            else:
                tokens, targets = self._shaped(tokens, targets, model_kwargs)
                owned = self.pipeline.train(tokens, targets, self._loss_scale)
        if sync:
            self.strategy.after_backward(self.module, self.layout)
        return owned if self.owns_loss else torch.zeros_like(owned)

    @torch.no_grad()
    def evaluate(
        self, tokens: torch.Tensor, targets: torch.Tensor, **model_kwargs: torch.Tensor
    ) -> torch.Tensor:
        """The summed token loss of one batch that this rank owns (0 where another rank does)."""
        if self.pipeline is None:
            # Not through DDP: its forward may broadcast buffers, and replicas may evaluate
            # different numbers of batches.
            owned = self._plain_loss_sum(tokens, targets, model_kwargs, self.part).float()
        else:
            tokens, targets = self._shaped(tokens, targets, model_kwargs)
            logits = self.pipeline.forward(tokens)
            owned = torch.zeros(()) if logits is None else token_loss_sum(logits, targets)
        return owned if self.owns_loss else torch.zeros_like(owned)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the whole model's gradient norm (0: only measure it); returns the norm."""
        if self.holds_whole_model:  # replicas hold the averaged gradient: the local norm is it
            limit = max_norm if max_norm > 0 else float("inf")
            return torch.nn.utils.clip_grad_norm_(self.parameters(), limit, foreach=True)
        return clip_grad_norm(self.parameters(), max_norm, self.layout)

    # ---- helpers -----------------------------------------------------------------------------

    def _plain_loss_sum(
        self, tokens: torch.Tensor, targets: torch.Tensor, model_kwargs: dict, module: nn.Module
    ) -> torch.Tensor:
        if self.layout.replica_size > 1:  # a sharded whole model takes what the model takes
            self._refuse_packed(model_kwargs)
            model_kwargs = {}  # a stage takes tokens only; trailing padding changes nothing
        with self._autocast():
            return token_loss_sum(self.contract(module, tokens, **model_kwargs), targets)

    def _shaped(
        self, tokens: torch.Tensor, targets: torch.Tensor, model_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded to a multiple of the micro-batch count, length to a bucket."""
        self._refuse_packed(model_kwargs)
        assert self.pipeline is not None
        rows, length = tokens.shape
        length = bucket_length(length, self.length_bucket, self.max_len)
        return pad_batch(tokens, targets, rows_for(rows, self.pipeline.microbatches), length)

    @staticmethod
    def _refuse_packed(model_kwargs: dict) -> None:
        if model_kwargs.get("segment_ids") is not None:
            # Packed rows need their segment mask in every block, not one activation per stage.
            raise ShardwiseError(
                "packed batches cannot run through pipeline or tensor-parallel stages yet; "
                "train with padded batches (no packing) when --pp or --tp is above 1"
            )
