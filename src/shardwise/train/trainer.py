"""The training loop: read it top to bottom in `Trainer.fit`.

    trainer = Trainer(config, Session.from_config(env, config), corpus, model, run_dir, stages)
    result = trainer.fit()   # result.summary (a dict), result.checkpoint (the last one saved)

Loss normalisation is what makes every layout exact: each micro-batch's summed token loss is
divided by the token count of the whole optimizer step (known to every rank from the sampler),
so the gradient is exactly that of the global token-mean loss for any split over ranks,
micro-steps and pipeline micro-batches. How a micro-step runs (DDP replica, pipeline stage,
tensor-parallel shard) is the prepared model's business: the trainer is a user of the same
`Session` a user's own loop calls, so the loop is the same for every layout.
Metrics rows and run totals are `train/accounting.py`'s; the exported model is `train/export.py`'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from shardwise.checkpoint import TrainerState
from shardwise.config import TrainConfig
from shardwise.data.batch import Batch
from shardwise.data.prepare import PreparedCorpus
from shardwise.data.sampler import SamplerPosition
from shardwise.distributed import all_gather_floats, all_reduce_sum
from shardwise.errors import ShardwiseError
from shardwise.memory.record import MemoryWatch
from shardwise.optim import build_optimizer, warm_optimizer
from shardwise.partition import PipelineCut
from shardwise.report import MetricsWriter, TrainProgress
from shardwise.run_dir import holds_lease
from shardwise.session import Session
from shardwise.train.accounting import RunTotals, Window
from shardwise.train.build import step_groups, stream_identity
from shardwise.train.evaluation import Evaluations
from shardwise.train.faults import Faults
from shardwise.train.health import TrainingHealth, check_finite_weights, skip_step
from shardwise.train.lr_schedule import warmup_cosine
from shardwise.train.preemption import Preempted, PreemptionCheck
from shardwise.train.resume import data_fingerprint, model_fingerprint, resume_training
from shardwise.train.summary import run_summary
from shardwise.train.timing import StepClock


@dataclass(frozen=True)
class FitResult:
    """What a finished `fit` leaves: the run's summary and the checkpoint export reads from.

    `summary` is None when `--resume` found the run already at `max_steps`: nothing was
    trained, so there is nothing new to report (the run's own summary stays as it was).
    """

    summary: dict | None
    checkpoint: Path


class Trainer:
    """Trains `model` on `corpus` as this worker's share of a data/pipeline/tensor-parallel job."""

    def __init__(
        self,
        config: TrainConfig,
        session: Session,
        corpus: PreparedCorpus,
        model: nn.Module,
        run_dir: Path,
        stages: PipelineCut | None = None,
        preemption: PreemptionCheck | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.env = session.env
        self.corpus = corpus
        self.run_dir = run_dir
        self.stages = stages
        self.model_fingerprint = model_fingerprint(model)  # of the whole model, before any cut
        # Predicted (rank 0) and measured from here, before the run allocates anything.
        cuts = stages and stages.cuts
        self.memory = MemoryWatch.start(
            config,
            corpus,
            self.env,
            model,
            cuts,
            session.parallelism,
            warm=lambda: warm_optimizer(config, self.env.device),
        )
        self.model = session.prepare(model, cuts=stages.cuts if stages else None)
        self.optimizer = build_optimizer(self.model.parameters(), config)
        self.scheduler = warmup_cosine(
            self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
        )
        self.state = TrainerState(world_size=self.env.world_size)
        self.totals = RunTotals()
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.resume_notes: list[str] = []
        self.clock = StepClock(self.model.parameters())
        # Empty lists unless a test asked this run for faults (train/faults.py).
        self.hooks = (faults or Faults()).step_hooks(self.clock, self.model.strategy.traffic)
        self.preemption = preemption or PreemptionCheck.for_config(config, self.env)
        meets = session.meets_between_steps(self.model)  # async workers judge their own steps
        self.health = TrainingHealth(config, self.env, corpus.vocab_size, agree=meets)
        self.evaluations = Evaluations(config, corpus.eval, self.model, self.env)

    def fit(self) -> FitResult:
        """Train to `max_steps`, checkpoint, evaluate, and summarise the run."""
        started = time.perf_counter()
        self._resume_if_asked()
        if self.resumed_from is not None and self.state.step >= self.config.max_steps:
            return FitResult(None, self.resumed_from)  # a finished run: no step, no metrics row
        layout = self.model.layout
        start, device = self.state.position, self.env.device
        ranks, rank = layout.data_ranks, layout.data_rank
        steps = step_groups(self.config, self.corpus, ranks, rank, device, start)
        main = self.env.is_main
        with (
            MetricsWriter(self.run_dir, self.config.tensorboard)
            if main
            else contextlib.nullcontext() as metrics,
            TrainProgress(self.config.max_steps, self.state.step, enabled=main) as progress,
        ):
            window = Window()
            while self.state.step < self.config.max_steps:
                micro_batches = next(steps)
                self._train_step(micro_batches, window)
                evaluated = self.evaluations.if_due(self.state.step, window, progress.evaluation)
                if evaluated or self._due(self.config.log_every):  # eval_loss on its step's row
                    row = self._close_window(window) | evaluated
                    window = Window()  # logging's own cost counts in the next window
                    if main:
                        metrics.log(row)
                progress.update(self.state.step, self.last_loss, self.totals.tokens_per_s)
                for hook in self.hooks.after_step:
                    hook(self.state.step)
                stop = self.preemption.agreed(self.state.step, self.config.max_steps)
                if stop or self._due(self.config.checkpoint_every):
                    saving = time.perf_counter()
                    self._save(background=self.config.checkpoint_async and not stop)
                    window.started += time.perf_counter() - saving  # not training time
                if stop:  # SIGTERM or Ctrl-C: every rank stops after this step, saved
                    raise Preempted(self.state.step, self.last_checkpoint, self.preemption.received)
        if self.last_checkpoint is None:  # nothing saved on the way
            self._save()
        assert self.last_checkpoint is not None  # for the type checker: just saved
        return FitResult(run_summary(self, started), self.last_checkpoint)

    def _train_step(self, micro_batches: list[Batch], window: Window) -> None:
        self.clock.start()
        for hook in self.hooks.before_forward:
            hook()
        last = len(micro_batches) - 1
        session, model, device = self.session, self.model, self.env.device
        losses = []
        for index, batch in enumerate(micro_batches):
            batch = batch.to(device)
            loss = session.forward_backward(
                model,
                batch.tokens,
                batch.targets,
                step_tokens=batch.step_tokens,
                sync=index == last,
                reduce=False,  # summed over ranks once per metrics window instead
                **batch.model_kwargs(device),
            )
            losses.append(loss)
        self.clock.backward_done()
        norm = session.clip_gradients(model, self.optimizer, self.config.clip_norm)
        if self.health.check_step(self.state.step + 1, losses, norm):  # or skip, or stop
            for loss, batch in zip(losses, micro_batches, strict=True):  # a skipped step's stay out
                window.record_micro_step(loss, batch if model.owns_loss else None)
            window.grad_norm = norm
            session.step(self.optimizer, model)
        else:
            skip_step(session, self.optimizer, model)
        if self.state.step + 1 == self.config.max_steps:  # before the last checkpoint is saved
            session.finish(model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step = session.steps_done(model, self.state.step + 1, self.config.max_steps)
        self.state.position = SamplerPosition(*micro_batches[-1].position)
        window.record_step(*self.clock.stop(), micro_batches[-1].rank_costs)

    def _close_window(self, window: Window) -> dict:
        """One metrics row: global loss and throughput, per-rank step time and memory."""
        if not self.session.meets_between_steps(self.model):  # workers' step counts differ
            window.merge_steps(self.state.step)  # one window: the whole (never resumed) run
        counts = all_reduce_sum(window.counts(), self.env).tolist()
        now = time.perf_counter()  # the window ends once the counts agree, before the gather
        peak = self.memory.meter.lifetime_peak_bytes()  # since the process began
        timings = window.timings(peak, self.model.strategy.traffic)
        gathered = all_gather_floats(timings, self.env)
        figures = window.close(counts, gathered, now=now)
        self.totals.add(figures)
        self.state.tokens += int(figures.tokens)
        row = figures.row(self.state.step, self.scheduler.get_last_lr()[0])
        row |= {"tokens": self.state.tokens, "train_s": round(self.totals.train_s, 3)}  # so far
        row |= self.health.close_window(figures.loss, self.state.step)  # spikes, skipped steps
        self.last_loss = row["loss"]
        return row

    def _due(self, every: int) -> bool:
        step, meets = self.state.step, self.session.meets_between_steps(self.model)
        return (meets and every > 0 and step % every == 0) or step == self.config.max_steps

    def _resume_if_asked(self) -> None:
        if self.config.resume is not None:
            parts = self.model, self.optimizer, self.scheduler, self.corpus, self.model_fingerprint
            self.state, self.resumed_from, self.resume_notes = resume_training(
                self.config, self.session, *parts
            )

    def _save(self, background: bool = False) -> None:
        if not holds_lease(self.run_dir):
            raise ShardwiseError(
                f"--run-dir {self.run_dir}: this run no longer holds the run dir's lock (its "
                "launcher is gone); the worker stops without writing a checkpoint"
            )
        check_finite_weights(self.model.parameters(), self.env, self.state.step)  # last defence
        self.state.scheduler = self.scheduler.state_dict()
        self.state.stream = stream_identity(self.config)
        self.state.config = self.config.model_dump(mode="json")
        self.state.model_fingerprint = self.model_fingerprint
        if self.env.is_main and not self.state.data_fingerprint:  # only rank 0 writes it
            self.state.data_fingerprint = data_fingerprint(self.corpus)
        parts = self.run_dir / "checkpoints", self.model, self.optimizer
        background &= self.state.step < self.config.max_steps  # the last save is waited for
        self.last_checkpoint = self.session.save(*parts, state=self.state, background=background)
