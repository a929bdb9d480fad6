"""Your own training loop on any layout the CLI trains: the public core the trainer uses too.

    session = shardwise.setup(pp=2)                  # joins torchrun's group, builds the layout
    model = session.prepare(MyLM())                  # this rank's stage, wrapped for its replicas
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for x, y in session.loader(dataset, batch_size=32):
        optimizer.zero_grad()
        loss = session.forward_backward(model, x, y)  # a pipeline schedule, or forward+backward
        session.clip_gradients(model, optimizer, 1.0)
        session.step(optimizer)

Run the script with `torchrun --nproc-per-node N script.py`, `shardwise.launch(fn, nproc=N)`, or
plain `python script.py` for one process. With data parallelism alone `model(x)` and
`loss.backward()` work as in plain PyTorch (see README). The layout comes from keywords, a
`TrainConfig`, or a TOML file (`setup(config="run.toml")`): the same keys as `shardwise train`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from shardwise.checkpoint import (
    CheckpointWriter,
    Retention,
    SyncState,
    TrainerState,
    agree_on_checkpoint,
    checkpoint_name,
    load_checkpoint,
    take_snapshot,
)
from shardwise.config import TrainConfig, load_config
from shardwise.config.parallelism import parallelism_from
from shardwise.data.batch import Batch
from shardwise.data.cost import cost_model_for
from shardwise.data.device_loader import DeviceLoader, device_loader
from shardwise.data.token_loader import TokenLoader
from shardwise.distributed import (
    DistEnv,
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
)
from shardwise.errors import ShardwiseError, print_error
from shardwise.loss import count_targets, token_loss_sum
from shardwise.memory.kernels import bound_kernel_caches
from shardwise.models.contract import ModelContract, contract_for
from shardwise.parallel.data_parallel import gradient_sync, unwrap
from shardwise.parallel.model import ParallelModel
from shardwise.parallel.parallelism import Parallelism
from shardwise.parallel.parallelize import parallelize
from shardwise.partition import profiled_cuts
from shardwise.precision import Precision
from shardwise.techniques import piece_costs
from shardwise.techniques import settings as technique_settings

# The settings a session takes from a TrainConfig (or TOML file); the rest are the CLI's:
# the config's own settings a Session reads; every technique's own-loop settings join them.
_OWN_KEYS = (
    "dp", "pp", "tp", "device", "seed", "timeout_s", "keep_checkpoints", "resume", "vocab_size",
    "input_layout", "model_output", "model", "nnodes",
)  # fmt: skip
SESSION_KEYS = _OWN_KEYS + tuple(
    name for name, setting in technique_settings().items() if setting.own_loop
)


@dataclass(frozen=True)
class SessionSettings:
    """What a Session reads besides the `Parallelism`: seeds, timeouts, checkpoints, the model.

    >>> SessionSettings(seed=1, keep_checkpoints=3).keep_checkpoints
    3
    """

    seed: int = 0
    timeout_s: float = 300.0
    keep_checkpoints: int = 0  # the K newest checkpoints `save` keeps (0: all)
    resume: Path | None = None  # the checkpoint retention never deletes
    model: str = ""  # a model spec ("package.module:factory") names it in messages; "" its type
    contract: dict[str, Any] = field(default_factory=dict)  # contract_for's settings

    @classmethod
    def of(cls, config: TrainConfig) -> SessionSettings:
        """The settings of `config` a Session reads."""
        return cls(
            config.seed,
            config.timeout_s,
            config.keep_checkpoints,
            config.resume,
            config.model,
            config.contract_settings(),
        )


class Session:
    """This process's place in the layout, and the calls a training loop needs.

    session = Session(env, parallelism, SessionSettings(seed=0))   # the core
    session = Session.from_config(env, TrainConfig(pp=2))          # what setup() does
    """

    def __init__(
        self, env: DistEnv, parallelism: Parallelism, settings: SessionSettings | None = None
    ) -> None:
        self.env = env
        self.settings = settings or SessionSettings()
        layout = parallelism.layout
        if env.distributed and not layout.groups:  # degrees only: this rank's groups first
            layout = layout.build(env, self.settings.timeout_s)
        self.layout = layout
        self.precision = Precision(parallelism.precision, env.device)
        # The parallelism prepare() applies, with this session's precision (its loss scaler).
        self.parallelism = replace(
            parallelism,
            layout=layout,
            autocast=self.precision.autocast,
            backward=self.precision.backward,
        )
        self.checkpoints = CheckpointWriter(self.settings.timeout_s)  # one save at a time

    @classmethod
    def from_config(cls, env: DistEnv, config: TrainConfig) -> Session:
        """A session for `config`'s layout and techniques (its Parallelism), over `env`."""
        layout = config.layout(env.world_size).build(env, config.timeout_s)
        return cls(env, parallelism_from(config, layout), SessionSettings.of(config))

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def prepare(
        self,
        model: nn.Module,
        cuts: list[str] | None = None,
        example: torch.Tensor | None = None,
        contract: ModelContract | None = None,
    ) -> ParallelModel:
        """This rank's part of `model` for the layout, on the device, wrapped for its replicas.

        model = session.prepare(MyLM())                       # build the optimizer after this
        model = session.prepare(MyLM(), cuts=["blocks.2"])    # where stage 2 starts

        Every rank must build `model` alike (the same seed). Without `cuts` a pipeline is cut
        where rank 0's profile on `example` tokens (default: zeros) balances time and memory.
        `contract`: how to call the model (models/contract.py); by default a probe finds out.
        """
        spec = self.settings.model
        name = spec if ":" in spec else type(model).__name__
        contract = contract or contract_for(model, name, **self.settings.contract)
        parallelism = self.parallelism
        stages = parallelism.pipeline
        if stages is not None and (cuts or not stages.cuts):
            if not cuts:  # rank 0's profile balances time and memory, every rank takes its cut
                # Techniques that change what pieces hold and take (recompute's blocks).
                adjust, _ = piece_costs(parallelism.entries.values())
                cuts = profiled_cuts(
                    self.env,
                    model,
                    self.layout.pp,
                    example,
                    microbatches=stages.microbatches,
                    schedule=stages.schedule.name,
                    adjust=adjust,
                )
            parallelism = parallelism.with_cuts(cuts)
        self.parallelism = parallelism
        return parallelize(model, parallelism, self.env, contract)

    def forward_backward(
        self,
        model: ParallelModel,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        step_tokens: int | None = None,
        sync: bool = True,
        reduce: bool = True,
        **model_kwargs: torch.Tensor,
    ) -> torch.Tensor:
        """Forward and backward of one batch (all its pipeline micro-batches); returns its loss.

        loss = session.forward_backward(model, x, y)            # global token-mean, every rank
        session.forward_backward(model, x1, y1, sync=False)     # accumulate; sync on the last

        The loss is token cross-entropy over the targets that are not -100. `step_tokens` is the
        token count of the whole optimizer step over every replica and micro-step (default: this
        batch's, summed over replicas). `reduce=False` skips the collective that puts the loss
        on every rank and returns the summed loss this rank owns instead (the trainer's choice).
        """
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if step_tokens is None:
            step_tokens = int(self._over_data_ranks(count_targets(targets)))
        owned = model.forward_backward(inputs, targets, step_tokens, sync=sync, **model_kwargs)
        if not reduce:
            return owned
        return self._over_world(owned) / max(step_tokens, 1)

    @torch.no_grad()
    def evaluate(self, model: ParallelModel, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The token-mean loss of one batch per replica, over all replicas (every rank calls it)."""
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        tokens = self._over_data_ranks(count_targets(targets))
        return float(self._over_world(model.evaluate(inputs, targets))) / max(tokens, 1.0)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, scaled under fp16 (data parallel: for your own loss)."""
        self.precision.backward(loss)

    def clip_gradients(
        self, model: ParallelModel, optimizer: torch.optim.Optimizer, max_norm: float
    ) -> torch.Tensor:
        """Clip to `max_norm` by the whole model's norm across stages and shards; returns it.

        norm = session.clip_gradients(model, optimizer, 1.0)   # 0: measure only
        """
        if self.precision.scaler is not None:
            self.precision.scaler.unscale_(optimizer)
        return model.clip_grad_norm(model.strategy.clip_norm(max_norm))

    def step(self, optimizer: torch.optim.Optimizer, model: ParallelModel | None = None) -> None:
        """The optimizer step (fp16: through the loss scaler), then the sync strategy's turn.

        The strategy takes the step (`strategy.step`): under --sync async the parameter servers'
        optimizer does, the strategy pushing the gradients and pulling the parameters instead,
        and `optimizer` is left alone.
        """
        if model is None:
            self.precision.step(optimizer)
            return
        model.strategy.step(lambda: self.precision.step(optimizer), model.module, self.layout)

    def steps_done(self, model: ParallelModel, local_steps: int, max_steps: int) -> int:
        """The run's steps done after this rank's `local_steps`: the same, but under --sync
        async the parameter servers' count, all workers together (a fast worker does more)."""
        return model.strategy.steps_done(local_steps, max_steps)

    def meets_between_steps(self, model: ParallelModel) -> bool:
        """Whether ranks may meet in a collective mid-run (metrics windows, checkpoints): not
        asynchronous workers, which are at different steps (they meet once, at the end)."""
        return model.strategy.meets_between_steps

    def finish(self, model: ParallelModel) -> None:
        """After the last optimizer step: bring replicas that train apart to one model.

        session.finish(model)   # local SGD / DiLoCo: a last exchange if the period is open
        """
        model.strategy.finish(model.module, self.layout)

    def loader(
        self,
        dataset: Dataset | Sequence[Any],
        batch_size: int | None = None,
        shuffle: bool = True,
        *,
        tokens_per_batch: int | None = None,
        **kwargs: Any,
    ) -> DeviceLoader | TokenLoader:
        """This replica's share of `dataset` (the same on every stage of a pipeline), on device.

            loader = session.loader(dataset, batch_size=16)          # your batches, as given
            loader = session.loader(sequences, tokens_per_batch=4096)  # shardwise's own

        With `batch_size`, a seeded shuffle of `dataset` per pass, `batch_size` items a rank.
        With `tokens_per_batch`, `dataset` is a list of token sequences (1-D, any lengths) and
        each pass yields the `Batch`es `shardwise train` uses: about that many token slots a
        rank, little padding, the same cost on every rank, every sequence once an epoch; take
        their loss with `session.loss(logits, batch)`.
        """
        if (batch_size is None) == (tokens_per_batch is None):
            raise ShardwiseError("session.loader: give batch_size or tokens_per_batch (one)")
        if tokens_per_batch is not None:
            return TokenLoader(
                dataset,  # type: ignore[arg-type]  # a sequence of token sequences
                tokens_per_batch,
                replicas=self.layout.data_ranks,
                rank=self.layout.data_rank,
                seed=self.settings.seed,
                device=self.device,
                cost_model=kwargs.pop("cost_model", cost_model_for(self.settings.model)),
                **kwargs,
            )
        return device_loader(
            dataset,
            batch_size,  # type: ignore[arg-type]  # given: checked above
            replicas=self.layout.data_ranks,
            rank=self.layout.data_rank,
            seed=self.settings.seed,
            device=self.device,
            shuffle=shuffle,
            **kwargs,
        )

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """This rank's share of the step's exact token-mean loss, for `backward()`.

            loss = session.loss(model(batch.tokens), batch)    # a batch of loader(tokens_...)

        The summed cross-entropy of this rank's real targets over every rank's targets in the
        step (`batch.step_tokens`), times the replicas, since DDP averages their gradients:
        the gradient is that of the global token mean, however the tokens fell on the ranks.
        `session.mean(loss)` is that mean.
        """
        return token_loss_sum(logits, batch.targets) * self.layout.data_ranks / batch.step_tokens

    def save(
        self,
        directory: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        step: int = 0,
        state: TrainerState | None = None,
        background: bool = False,
    ) -> Path:
        """A verified, reshardable checkpoint `directory/step_XXXXXXXX`, written once by all ranks.

        path = session.save("checkpoints", model, optimizer, step=100)
        path = session.save("checkpoints", model, optimizer, step=200, background=True)

        Keys are the names your model gives its parameters (no "module." prefix); any other
        world size or layout loads it (with local-sgd, diloco or PowerSGD: the same data-parallel
        degree, since each replica's own weights and optimizer state, or error feedback, are
        kept). Every rank must call it.
        `background=True` returns once the tensors are copied to CPU memory; the files are
        written and sealed while you train on (`path` exists from then on), and the next save,
        `wait_for_checkpoint()` or `close()` waits for it and raises its error, if any.
        The session's `keep_checkpoints` deletes older ones once a save is sealed.
        """
        state = state or TrainerState(step=step)
        if isinstance(model, ParallelModel) and not model.strategy.saves_here(self.env):
            return Path(directory) / checkpoint_name(state.step)  # another rank writes it
        state.world_size, state.scaler = self.world_size, self.precision.state_dict()
        sync = self._sync_state(model)
        keep = Retention(self.settings.keep_checkpoints, protect=self.settings.resume)
        snapshot = take_snapshot(Path(directory), _part(model), optimizer, state, sync, keep)
        return self.checkpoints.save(snapshot, self.env, background)

    def wait_for_checkpoint(self) -> Path | None:
        """Block until a background save is sealed; its path (None: none was in flight)."""
        return self.checkpoints.wait()

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        verified: bool = False,
    ) -> TrainerState:
        """Restore `model` and `optimizer` from a checkpoint, or the newest good one in a folder.

        step = session.load("checkpoints", model, optimizer).step

        Files are checked against the checkpoint's digests first (`verified=True`: the caller
        has just done so for this exact path); nothing loaded can run code.
        """
        path = Path(path)
        self.checkpoints.wait()  # a save in flight may be the one asked for
        if not verified:
            path, _ = agree_on_checkpoint(path, self.env)
        sync = self._sync_state(model)
        state = load_checkpoint(path, _part(model), optimizer, self.env, verify=False, sync=sync)
        if isinstance(model, ParallelModel):
            model.strategy.load_state_dict(sync.tensors)
        self.precision.load_state_dict(state.scaler)
        return state

    def _sync_state(self, model: nn.Module) -> SyncState:
        """The strategy's tensors, and whether this replica's own copy of the rest is kept."""
        if not isinstance(model, ParallelModel):
            return SyncState()
        replica = self.layout.replica_rank if model.strategy.replicas_differ else None
        return SyncState(model.strategy.state_dict(), replica)

    def no_sync(self, model: nn.Module, accumulating: bool = True) -> Any:
        """Skip the gradient all-reduce while `accumulating` (inner micro-steps)."""
        if isinstance(model, ParallelModel):
            return model.strategy.skipping(model.module) if accumulating else nullcontext()
        return gradient_sync(model, enabled=not accumulating)

    def mean(self, value: torch.Tensor | float) -> float:
        """The mean of `value` over all ranks (for logging)."""
        total = torch.tensor([float(value)], dtype=torch.float64)
        return float(all_reduce_sum(total, self.env)) / self.world_size

    def close(self) -> None:
        """Finish any background save, then leave the process group."""
        self.checkpoints.wait()
        shutdown_distributed()

    def _over_data_ranks(self, value: float) -> float:
        total = torch.tensor([float(value)], dtype=torch.float64)
        return float(all_reduce_sum(total, self.env, group=self.layout.group("dp")))

    def _over_world(self, owned: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(owned.detach().double().cpu().reshape(1), self.env)[0].float()


def setup(config: TrainConfig | str | Path | None = None, **settings: Any) -> Session:
    """Join the job torchrun started (or run alone), build the layout, seed every rank alike.

    session = shardwise.setup()                              # data parallel over every rank
    session = shardwise.setup(pp=2, microbatches=4)          # or tp=2, dp=2, precision="bf16"
    session = shardwise.setup("run.toml")                    # the keys `shardwise train` reads

    Keywords are the TrainConfig fields a Session reads (SESSION_KEYS: the layout, the sync
    strategy and its settings, precision, device, seed, timeout_s, keep_checkpoints, the model
    call's settings); they override the file's values. From here on, a ShardwiseError the
    script does not catch ends it in one `shardwise: error:` line, as `shardwise train`'s do.
    """
    _user_errors_in_one_line()
    bound_kernel_caches()  # in time where this process has run no oneDNN kernel yet
    config = _session_config(config, settings)
    env = init_distributed(config.device, config.timeout_s)
    torch.manual_seed(config.seed)
    return Session.from_config(env, config)


def _user_errors_in_one_line() -> None:
    """Make an uncaught ShardwiseError one line (exit status 1); every other error as before."""
    previous = sys.excepthook
    if getattr(previous, "shardwise", False):
        return

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if isinstance(error, ShardwiseError):
            print_error(error)
        else:
            previous(kind, error, trace)

    hook.shardwise = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _session_config(config: TrainConfig | str | Path | None, settings: dict) -> TrainConfig:
    unknown = sorted(set(settings) - set(SESSION_KEYS))
    if unknown:
        raise TypeError(f"setup() got unknown settings {unknown}; it takes {list(SESSION_KEYS)}")
    machines = _machines_started()
    if "nnodes" not in settings and machines > 1:  # torchrun's: what hybrid sharding splits by
        settings = {**settings, "nnodes": machines}
    master = ":".join(os.environ.get(key, "") for key in ("MASTER_ADDR", "MASTER_PORT"))
    if settings.get("nnodes", 1) != 1 and "rdzv_endpoint" not in settings and master != ":":
        settings = {**settings, "rdzv_endpoint": master}  # the launcher's, already met
    if isinstance(config, TrainConfig):
        return TrainConfig.model_validate({**config.model_dump(), **settings})
    path = Path(config) if config is not None else None
    return load_config(path, settings)


def _machines_started() -> int:
    """How many machines the launcher started this job on: torchrun's WORLD_SIZE over its
    LOCAL_WORLD_SIZE (1 when neither says)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(world // max(local, 1), 1)


def _part(model: nn.Module) -> nn.Module:
    return model.part if isinstance(model, ParallelModel) else unwrap(model)
