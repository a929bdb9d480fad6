"""How one micro-step runs under each layout: the trainer's loop is the same for all of them.

    engine = make_engine(config, env, model, precision)
    loss_sum = engine.micro_step(batch, last=True)   # summed token loss of this rank's share

`DataParallelEngine` replicates the whole model on every rank (DDP). `ModelParallelEngine` cuts
it into pipeline stages and/or splits its large layers over a `dp x pp x tp` mesh, through
`PipelineRunner`. Both return the summed token cross-entropy that *this rank owns*, so summing
the returns over all ranks gives the global figure once, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from shardwise.checkpoint import load_model_weights
from shardwise.config import TrainConfig
from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv
from shardwise.parallel.data_parallel import gradient_sync, unwrap, wrap_data_parallel
from shardwise.parallel.mesh import Layout
from shardwise.parallel.pipeline import PipelineRunner, token_loss_sum
from shardwise.plan import plan_stages, shared_plan
from shardwise.train.precision import Precision


class Engine(Protocol):
    """What the training loop needs from a parallel layout."""

    module: nn.Module  # what checkpoints save: keyed by the original parameter names
    layout: Layout  # the degrees, this rank's place and the mesh: summary.json records them
    data_world_size: int  # ranks that draw different data
    data_rank: int
    owns_counts: bool  # whether this rank's token counts are its own (not a copy of a peer's)

    def parameters(self) -> Iterator[nn.Parameter]: ...
    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor: ...
    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor: ...
    def eval_loss_sum(self, batch: Batch) -> float: ...
    def whole_model(self, checkpoint: Path) -> nn.Module: ...


def make_engine(
    config: TrainConfig, env: DistEnv, model: nn.Module, precision: Precision, vocab_size: int
) -> Engine:
    """DDP when every rank holds the whole model, else the pipeline / tensor-parallel runner."""
    # Every run gets its mesh, data-parallel only included: one description of the layout.
    layout = config.layout(env.world_size).build(env, config.timeout_s)
    if layout.replica_size == 1:
        return DataParallelEngine(model, env, precision, layout)
    return ModelParallelEngine(config, env, model, precision, vocab_size, layout)


class DataParallelEngine:
    """Every rank holds the whole model; DDP averages gradients in buckets during backward."""

    def __init__(
        self, model: nn.Module, env: DistEnv, precision: Precision, layout: Layout
    ) -> None:
        # With pp = tp = 1 the "dp" group is the whole world, so DDP's default group is it.
        self.layout = layout
        self.module = wrap_data_parallel(model, env)
        self.precision = precision
        self.device = env.device
        self.data_world_size = layout.dp
        self.data_rank = layout.dp_rank
        self.owns_counts = True

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        # DDP averages over ranks, so the world size cancels its division: the gradient is that
        # of (summed loss over every rank and micro-step) / step_tokens.
        with gradient_sync(self.module, enabled=last), self.precision.autocast():
            loss_sum = _loss_sum(self.module, batch, self.device)
        self.precision.backward(loss_sum * (self.data_world_size / batch.step_tokens))
        return loss_sum.detach().float()

    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        # After DDP's all-reduce every rank holds the global gradient: its norm is global.
        return self.precision.clip(optimizer, max_norm)

    @torch.no_grad()
    def eval_loss_sum(self, batch: Batch) -> float:
        with self.precision.autocast():
            return float(_loss_sum(unwrap(self.module), batch, self.device))

    def whole_model(self, checkpoint: Path) -> nn.Module:
        return unwrap(self.module)


class ModelParallelEngine:
    """This rank's pipeline stage (or tensor-parallel shard) of the model, via PipelineRunner."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        model: nn.Module,
        precision: Precision,
        vocab_size: int,
        layout: Layout,
    ) -> None:
        # fp16 with pp or tp above 1 never gets here: TrainConfig refuses it before launch.
        self.layout = layout
        cuts = config.split_points or self._planned_cuts(config, env, model)
        self.config = config
        self.vocab_size = vocab_size
        self.runner = PipelineRunner(
            model,
            self.layout,
            cuts,
            config.schedule,
            config.microbatches,
            device=env.device,
            autocast=precision.autocast,
        )
        self.module = self.runner.module
        self.data_world_size = self.layout.dp
        self.data_rank = self.layout.dp_rank
        self.owns_counts = self.runner.is_last and self.layout.tp_rank == 0

    @staticmethod
    def _planned_cuts(config: TrainConfig, env: DistEnv, model: nn.Module) -> list[str]:
        if config.pp == 1:
            return []
        sample = torch.zeros(config.batch_size, config.max_len - 1, dtype=torch.long)
        plan = shared_plan(
            env,
            lambda: plan_stages(
                model,
                config.pp,
                sample,
                microbatches=config.microbatches,
                schedule=config.schedule,
            ),
        )
        return plan.cuts

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.runner.parameters()

    def micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        share = self.runner.train_step(batch, sync_grads=last, reduce_loss=False)
        return share * batch.step_tokens

    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        return self.runner.clip_grad_norm(max_norm)

    def eval_loss_sum(self, batch: Batch) -> float:
        # Every rank of a replica gets the replica's total; count it on the owning rank only.
        total = float(self.runner.eval_loss(batch))
        return total if self.owns_counts else 0.0

    def whole_model(self, checkpoint: Path) -> nn.Module:
        """The trained model in one piece, rebuilt from the final checkpoint (call on one rank)."""
        from shardwise.models import build_model

        return load_model_weights(checkpoint, build_model(self.config.model, self.vocab_size))


def _loss_sum(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    logits = model(batch.tokens, **batch.model_kwargs(device))
    return token_loss_sum(logits, batch.targets)
