"""The training loop: read it top to bottom in `Trainer.fit`.

    trainer = Trainer(config, env, corpus, model, run_dir)
    result = trainer.fit()   # result.summary (a dict), result.checkpoint (the last one saved)

Loss normalisation is what makes every layout exact: each micro-batch's summed token loss is
divided by the token count of the whole optimizer step (known to every rank from the sampler),
so the gradient is exactly that of the global token-mean loss for any split over ranks,
micro-steps and pipeline micro-batches. How a micro-step runs (DDP replica, pipeline stage,
tensor-parallel shard) is the engine's business (`train/engines.py`); the loop is the same.
Metrics rows and run totals are `train/accounting.py`'s; the exported model is `train/export.py`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shardwise.checkpoint import (
    TrainerState,
    agree_on_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from shardwise.config import TrainConfig
from shardwise.data.batch import Batch
from shardwise.data.loader import make_loader
from shardwise.data.prepare import PreparedCorpus
from shardwise.data.sampler import SamplerPosition
from shardwise.distributed import DistEnv, all_gather_floats, all_reduce_sum, peak_memory_bytes
from shardwise.errors import ShardwiseError
from shardwise.report import MetricsWriter, TrainProgress
from shardwise.train.accounting import RunTotals, Window
from shardwise.train.batching import build_sampler, stream_identity
from shardwise.train.engines import make_engine
from shardwise.train.evaluation import held_out_loss
from shardwise.train.precision import Precision
from shardwise.train.resume import (
    Fingerprints,
    LiveState,
    check_resume,
    data_fingerprint,
    model_fingerprint,
)
from shardwise.train.schedule import lr_factor, warmup_cosine
from shardwise.train.timing import StepClock


@dataclass(frozen=True)
class FitResult:
    """What a finished `fit` leaves: the run's summary and the checkpoint export reads from."""

    summary: dict
    checkpoint: Path


class Trainer:
    """Trains `model` on `corpus` as this worker's share of a data/pipeline/tensor-parallel job."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        corpus: PreparedCorpus,
        model: nn.Module,
        run_dir: Path,
    ) -> None:
        self.config = config
        self.env = env
        self.corpus = corpus
        self.run_dir = run_dir
        self.precision = Precision(config.precision, env.device)
        self.model_fingerprint = model_fingerprint(model)  # of the whole model, before any cut
        self.engine = make_engine(config, env, model, self.precision, corpus.vocab_size)
        self.optimizer = torch.optim.AdamW(
            self.engine.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = warmup_cosine(
            self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
        )
        self.state = TrainerState(world_size=env.world_size)
        self.totals = RunTotals()
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.resume_notes: list[str] = []
        self.clock = StepClock(self.engine.parameters())

    def fit(self) -> FitResult:
        """Train to `max_steps`, checkpoint, evaluate, and summarise the run."""
        started = time.perf_counter()
        self._resume_if_asked()
        steps = self._step_groups()
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
                if self._due(self.config.log_every):
                    row = self._close_window(window)
                    window = Window()  # logging's own cost counts in the next window
                    if main:
                        metrics.log(row)
                progress.update(self.state.step, self.last_loss, self.totals.tokens_per_s)
                if self._due(self.config.checkpoint_every):
                    saving = time.perf_counter()
                    self._save()
                    window.started += time.perf_counter() - saving  # not training time
        if self.last_checkpoint is None:  # resumed at the end already: nothing trained
            self._save()
        assert self.last_checkpoint is not None  # for the type checker: just saved
        return FitResult(self._summarise(started), self.last_checkpoint)

    def _train_step(self, micro_batches: list[Batch], window: Window) -> None:
        self.clock.start()
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            loss = self.engine.micro_step(batch.to(self.env.device), index == last)
            window.record_micro_step(loss, batch if self.engine.owns_counts else None)
        self.clock.backward_done()
        window.grad_norm = self.engine.clip(self.optimizer, self.config.clip_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.position = SamplerPosition(*micro_batches[-1].position)
        window.record_step(*self.clock.stop(), micro_batches[-1].rank_costs)

    def _step_groups(self) -> Iterator[list[Batch]]:
        """Each optimizer step's micro-batches, from where the run (or its checkpoint) stands."""
        config, train = self.config, self.corpus.train
        lengths = np.fromiter((len(seq) for seq in train), dtype=np.int64)
        dp, rank = self.engine.data_world_size, self.engine.data_rank
        sampler = build_sampler(config, lengths, dp, rank, start=self.state.position)
        device, workers = self.env.device, config.num_workers
        batches = iter(make_loader(train, sampler, device, workers, packing=config.packs_rows))
        # Not a generator function: the sampler is built now, so its errors come before training.
        return ([next(batches) for _ in range(config.grad_accum)] for _ in itertools.count())

    def _close_window(self, window: Window) -> dict:
        """One metrics row: global loss and throughput, per-rank step time and memory."""
        counts = all_reduce_sum(window.counts(), self.env).tolist()
        now = time.perf_counter()  # the window ends once the counts agree, before the gather
        gathered = all_gather_floats(window.timings(peak_memory_bytes(self.env.device)), self.env)
        figures = window.close(counts, gathered, now=now)
        self.totals.add(figures)
        self.state.tokens += int(figures.tokens)
        self.last_loss = figures.loss
        return figures.row(self.state.step, self.scheduler.get_last_lr()[0])

    def _due(self, every: int) -> bool:
        step = self.state.step
        return (every > 0 and step % every == 0) or step == self.config.max_steps

    def _resume_if_asked(self) -> None:
        if self.config.resume is None:
            return
        path, skipped = agree_on_checkpoint(self.config.resume, self.env)
        state = read_state(path)  # rank 0 verified every file moments ago
        if state.stream and state.stream != stream_identity(self.config):
            raise ShardwiseError(
                f"--resume {path}: the checkpoint's data order came from {state.stream}, "
                f"this run's from {stream_identity(self.config)}; resume with the same settings "
                "(batch sizes, world size and layout may change)"
            )
        fingerprints = Fingerprints(self.model_fingerprint, data_fingerprint(self.corpus))
        live = LiveState(
            [dict(group) for group in self.optimizer.param_groups], self.scheduler.state_dict()
        )
        changes = check_resume(path, state, self.config, self.corpus, fingerprints, live)
        self.state = load_checkpoint(
            path, self.engine.module, self.optimizer, self.env, verify=False
        )
        self.scheduler.load_state_dict(self.state.scheduler)
        self._follow_schedule()
        self.precision.load_state_dict(self.state.scaler)
        self.state.world_size = self.env.world_size
        self.resumed_from, self.resume_notes = path, [*skipped, *changes]
        if self.env.is_main:
            print(f"shardwise: resuming from {path} (step {self.state.step})", flush=True)
            for note in self.resume_notes:
                print(f"  {note}", flush=True)

    def _follow_schedule(self) -> None:
        # The rate for the next step comes from this run's schedule (max_steps may have changed).
        config, step = self.config, self.state.step
        factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    def _save(self) -> None:
        self.state.scheduler = self.scheduler.state_dict()
        self.state.stream = stream_identity(self.config)
        self.state.scaler = self.precision.state_dict()
        self.state.config = self.config.model_dump(mode="json")
        self.state.model_fingerprint = self.model_fingerprint
        if self.env.is_main and not self.state.data_fingerprint:  # only rank 0 writes it
            self.state.data_fingerprint = data_fingerprint(self.corpus)
        self.last_checkpoint = save_checkpoint(
            self.run_dir / "checkpoints", self.engine.module, self.optimizer, self.state, self.env
        )

    def _summarise(self, started: float) -> dict:
        eval_loss = held_out_loss(self.engine, self.corpus.eval, self.config.batch_size, self.env)
        memory = all_gather_floats([peak_memory_bytes(self.env.device)], self.env)
        return {
            "world_size": self.env.world_size,
            "layout": self.engine.layout.to_dict(),
            "device": self.env.device.type,
            "precision": self.config.precision,
            "model": self.config.model,
            "steps": self.state.step,
            **self.totals.summary_fields(
                wall_time_s=time.perf_counter() - started,
                final_train_loss=self.last_loss,
                eval_loss=eval_loss,
                peak_rss_bytes=[int(row[0]) for row in memory],
            ),
            "batching": self.config.batching,
            "data_notes": self.corpus.notes,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "resume_notes": self.resume_notes,
            "run_dir": str(self.run_dir),
        }
