"""Training health: non-finite losses and gradients, loss spikes, and weights fit to save.

    health = TrainingHealth(config, env, vocab_size=256)
    if health.check_step(step, losses, grad_norm):   # every rank agrees; "stop" raises instead
        session.step(optimizer, model)
    else:
        skip_step(session, optimizer, model)         # --on-nonfinite skip
    row |= health.close_window(row["loss"], step)    # loss_spike, nonfinite_steps_skipped

A step is judged after backward and clipping, before the optimizer touches the weights, so a
non-finite step never reaches the weights and so never a checkpoint. Every rank gathers every
rank's loss and gradient norm (one small all-gather per step) and reaches the same verdict; the
loss has to travel because it is per rank, and the gradient norm does not agree across
replicas that step apart (local SGD, DiLoCo).

Under fp16 a non-finite gradient with finite losses is the loss scaler's business: its scale
was too high, so the scaler skips that step and lowers the scale, as it always has. A
non-finite *loss* is never the scaler's: the scale multiplies the loss only after it is
computed, so a NaN or inf loss is an overflow in the forward itself, and lowering the scale
cannot cure it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv, all_gather_floats, all_reduce_sum
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    from shardwise.parallel.model import ParallelModel
    from shardwise.session import Session

# A metrics row is a spike when its loss is above SPIKE_RATIO times the running level and at
# least SPIKE_MARGIN nats above it. Training noise moves a window's token-mean loss by a few
# percent, and a model recovering from a bad batch by tens of percent; tripling it is
# divergence. The margin keeps a memorised corpus (loss near 0) from flagging noise: one nat
# more is a perplexity e times higher.
SPIKE_RATIO = 3.0
SPIKE_MARGIN = 1.0
# Weight of a new row in the running level: it follows the falling loss within a few rows.
LEVEL_WEIGHT = 0.3
# A run has diverged when this many rows in a row are spikes and the last is worse than a
# uniform guess: a model recovering from a bad batch is back within a row or two.
DIVERGED_ROWS = 5


class DivergedError(ShardwiseError):
    """The loss exploded and stayed up (--on-divergence stop)."""


class NonFiniteStepError(ShardwiseError):
    """A step's loss or gradient norm was NaN or inf (--on-nonfinite stop)."""


@dataclass(frozen=True)
class StepVerdict:
    """Which ranks saw a non-finite loss or gradient norm in one step, and what to do."""

    loss_ranks: tuple[int, ...]
    grad_ranks: tuple[int, ...]
    scalers_business: bool  # fp16 and only the gradients: the loss scaler skips the step

    @property
    def finite(self) -> bool:
        return not self.loss_ranks and not self.grad_ranks

    @property
    def ours(self) -> bool:
        """Whether --on-nonfinite decides (not a finite step, not the fp16 scaler's overflow)."""
        return not self.finite and not self.scalers_business

    def describe(self, step: int) -> str:
        """'step 7: non-finite loss on rank 1 and gradient norm on ranks 0, 1'."""
        parts = [
            f"{what} on {_ranks(ranks)}"
            for what, ranks in (("loss", self.loss_ranks), ("gradient norm", self.grad_ranks))
            if ranks
        ]
        return f"step {step}: non-finite " + " and ".join(parts)


def judge_step(rows: Mapping[int, Sequence[float]], fp16: bool) -> StepVerdict:
    """The verdict on one step from each rank's [loss, gradient norm], by rank.

    judge_step({0: [2.1, 0.5], 1: [nan, nan]}, fp16=False).loss_ranks   # (1,)
    """
    loss_ranks = tuple(rank for rank, row in rows.items() if not math.isfinite(row[0]))
    grad_ranks = tuple(rank for rank, row in rows.items() if not math.isfinite(row[1]))
    return StepVerdict(loss_ranks, grad_ranks, scalers_business=fp16 and not loss_ranks)


def stop_message(verdict: StepVerdict, step: int, clip_norm: float, precision: str) -> str:
    """The one line a run stopped by a non-finite step ends with: what, where, what to try."""
    tries = ["lower --lr"]
    if clip_norm == 0:
        tries.append("set --clip-norm 1.0")
    if precision == "fp16":
        tries.append("use --precision bf16 (fp16's range overflowed in the forward)")
    tries.append("or pass --on-nonfinite skip to skip such steps")
    return (
        f"{verdict.describe(step)}; stopped before the optimizer step, so the weights and "
        f"every checkpoint stay finite: {', '.join(tries)}"
    )


def spike_level(level: float | None, vocab_size: int | None) -> float | None:
    """The level a new row is compared with: the running level, at most a uniform guess's loss.

    spike_level(None, 256)    # log(256) = 5.55: no row yet, a first row is held to a guess
    spike_level(1.8, 256)     # 1.8

    The cap makes a run that diverges from its very first row (--lr 1e6) a spike too: a
    token cross-entropy above a uniform guess over the vocabulary is a model worse than none.
    """
    ceiling = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
    if level is None or ceiling is None:
        return ceiling if level is None else level
    return min(level, ceiling)


def is_spike(loss: float, level: float | None) -> bool:
    """Whether `loss` is far above `level` (see SPIKE_RATIO, SPIKE_MARGIN); None: no level yet.

    is_spike(9e13, 5.5)   # True
    is_spike(2.4, 2.0)    # False
    """
    if level is None:
        return False
    return loss > SPIKE_RATIO * level and loss - level > SPIKE_MARGIN


class TrainingHealth:
    """One run's health checks on one rank: step verdicts, skip counts, the loss's level."""

    def __init__(
        self, config: TrainConfig, env: DistEnv, vocab_size: int | None = None, agree: bool = True
    ) -> None:
        self.policy = config.on_nonfinite
        self.env = env
        self.agree = agree  # False: asynchronous workers, at different steps, judge their own
        self.fp16 = config.precision == "fp16"
        self.vocab_size = vocab_size
        self.clip_norm = config.clip_norm
        self.precision = config.precision
        self.skipped = 0  # steps skipped over the run (since this start)
        self.level: float | None = None  # running level of the rows' losses
        self.in_spike = False
        self.spike_rows = 0  # rows in a row that were spikes
        self.on_divergence = config.on_divergence
        self._window_steps = 0
        self._window_skipped = 0

    def check_step(self, step: int, losses: Sequence[torch.Tensor], grad_norm: Any) -> bool:
        """True: apply step `step`. False: skip it (--on-nonfinite skip). Raises under stop.

        Every rank must call it (unless `agree` is off): it gathers each rank's loss and
        gradient norm.
        """
        # One read-back per step, as fp16's scaler does too: the verdict is needed on the host
        # before the optimizer step.
        loss = float(sum(loss.detach().float().sum() for loss in losses)) if losses else 0.0
        mine = [loss, float(grad_norm)]
        rows = dict(enumerate(all_gather_floats(mine, self.env))) if self.agree else {}
        verdict = judge_step(rows or {self.env.rank: mine}, self.fp16)
        self._window_steps += 1
        if not verdict.ours:
            return True  # finite, or fp16 overflow that the scaler's own step skips
        if self.policy == "stop":
            raise NonFiniteStepError(stop_message(verdict, step, self.clip_norm, self.precision))
        self.skipped += 1
        self._window_skipped += 1
        if self.env.is_main:
            print(f"shardwise: warning: {verdict.describe(step)}; step skipped", file=sys.stderr)
        return False

    def close_window(self, loss: float, step: int) -> dict[str, Any]:
        """The health fields of the metrics row ending at `step` whose token-mean loss is `loss`.

        row |= health.close_window(row["loss"], step)
        """
        skipped = self._window_skipped
        trained = not skipped or skipped < self._window_steps
        fields: dict[str, Any] = {
            "loss": loss if trained else None,  # every step skipped: no loss was trained on
            "loss_spike": False,
            "nonfinite_steps_skipped": skipped,
        }
        self._window_steps = self._window_skipped = 0
        if trained:
            fields["loss_spike"] = self._note_loss(loss, step)
        return fields

    def _note_loss(self, loss: float, step: int) -> bool:
        level = spike_level(self.level, self.vocab_size)
        spike = is_spike(loss, level)
        if spike and not self.in_spike and self.env.is_main:
            assert level is not None  # a spike needs a level
            clip = " or set --clip-norm 1.0" if self.clip_norm == 0 else ""
            print(
                f"shardwise: warning: step {step}: loss {loss:.4g} is {loss / level:.3g}x its "
                f"running level {level:.4g}; the run may be diverging: lower --lr{clip}",
                file=sys.stderr,
                flush=True,
            )
        self.in_spike = spike
        self.spike_rows = self.spike_rows + 1 if spike else 0
        ceiling = spike_level(None, self.vocab_size)
        worse_than_a_guess = ceiling is not None and loss > ceiling
        if self.on_divergence == "stop" and self.spike_rows >= DIVERGED_ROWS and worse_than_a_guess:
            assert level is not None
            raise DivergedError(
                f"step {step}: the loss diverged ({loss:.4g}, {loss / level:.3g}x its running "
                f"level {level:.4g}, for {self.spike_rows} metrics rows): lower --lr"
                f"{' or set --clip-norm 1.0' if self.clip_norm == 0 else ''}, or pass "
                "--on-divergence warn to train on"
            )
        if not spike:  # a spike must not drag the level up after it
            known = self.level if self.level is not None else loss
            self.level = known + LEVEL_WEIGHT * (loss - known)
        return spike


def skip_step(session: Session, optimizer: torch.optim.Optimizer, model: ParallelModel) -> None:
    """Skip an optimizer step: drop its gradients; the sync strategy still counts the step.

    skip_step(session, optimizer, model)   # instead of session.step(optimizer, model)
    """
    optimizer.zero_grad(set_to_none=True)
    scaler = session.precision.scaler
    if scaler is not None:
        # Gradients were unscaled for clipping this step: the scaler must close its step (and,
        # having seen an inf, it lowers its scale) or the next unscale_ refuses to run.
        scaler.update()
    # Replicas that step apart meet every N steps by the strategy's count, which must keep
    # pace with the step counter (checkpoints and resumes rely on both).
    model.strategy.after_step(model.module, session.layout)


def check_finite_weights(parameters: Any, env: DistEnv, step: int) -> None:
    """Refuse to checkpoint weights that hold NaN or inf (every rank must call it).

    check_finite_weights(model.parameters(), env, step=100)   # ShardwiseError if not finite
    """
    flags = [_is_finite(p).logical_not() for p in parameters]
    # One read-back for the whole model rather than one per tensor.
    bad = torch.stack(flags).sum().double().cpu().reshape(1) if flags else torch.zeros(1).double()
    total = int(all_reduce_sum(bad, env).item())
    if total:
        raise ShardwiseError(
            f"step {step}: {total} weight tensor(s) hold NaN or inf; refusing to save them as "
            "a checkpoint: lower --lr, set --clip-norm, or resume from an earlier checkpoint"
        )


def _is_finite(parameter: torch.Tensor) -> torch.Tensor:
    local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
    return torch.isfinite(local.detach()).all()


def _ranks(ranks: Sequence[int]) -> str:
    label = "rank" if len(ranks) == 1 else "ranks"
    return f"{label} {', '.join(map(str, ranks))}"
