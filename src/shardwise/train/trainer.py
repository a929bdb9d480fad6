"""The training loop: read it top to bottom in `Trainer.fit`.

    trainer = Trainer(config, env, corpus, model, run_dir)
    summary = trainer.fit()   # dict, also written to run_dir/summary.json by rank 0

Loss normalisation is what makes data parallelism exact: each micro-batch's summed token loss is
divided by the token count of the whole optimizer step (known to every rank from the sampler) and
multiplied by the world size that DDP's gradient average divides by again. The gradient is then
exactly that of the global token-mean loss, for any split over ranks and micro-steps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from shardwise.checkpoint import (
    TrainerState,
    agree_on_checkpoint,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from shardwise.config import TrainConfig
from shardwise.data.batch import IGNORE_INDEX, Batch, collate
from shardwise.data.loader import make_loader
from shardwise.data.prepare import PreparedCorpus
from shardwise.data.sampler import FixedBatchSampler, SamplerPosition
from shardwise.distributed import DistEnv, all_gather_floats, all_reduce_sum, peak_memory_bytes
from shardwise.models import generate
from shardwise.parallel.data_parallel import gradient_sync, unwrap, wrap_data_parallel
from shardwise.report import MetricsWriter, TrainProgress
from shardwise.train.precision import Precision
from shardwise.train.schedule import warmup_cosine


@dataclass
class _Window:
    """What happened since the last metrics row, on this rank."""

    loss_sum: torch.Tensor
    tokens: int = 0
    slots: int = 0
    steps: int = 0
    compute_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """Trains `model` on `corpus` as this worker's share of a data-parallel job."""

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
        self.model = wrap_data_parallel(model, env)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = warmup_cosine(
            self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
        )
        self.precision = Precision(config.precision, env.device)
        self.state = TrainerState(world_size=env.world_size)
        self.totals = {"tokens": 0, "slots": 0, "train_s": 0.0}
        self.last_loss: float | None = None

    # ---- the loop -------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to `max_steps`, checkpoint, evaluate, and summarise the run."""
        self.started = time.perf_counter()
        self._resume_if_asked()
        steps = self._step_groups(self._loader())
        main = self.env.is_main
        with (
            MetricsWriter(self.run_dir, self.config.tensorboard)
            if main
            else contextlib.nullcontext() as metrics,
            TrainProgress(self.config.max_steps, self.state.step, enabled=main) as progress,
        ):
            window = self._new_window()
            while self.state.step < self.config.max_steps:
                micro_batches = next(steps)
                self._train_step(micro_batches, window)
                if self._due(self.config.log_every):
                    row = self._close_window(window)
                    window = self._new_window()  # logging's own cost counts in the next window
                    if main:
                        metrics.log(row)
                progress.update(self.state.step, self.last_loss, self._tokens_per_s())
                if self._due(self.config.checkpoint_every):
                    saving = time.perf_counter()
                    self._save()
                    window.started += time.perf_counter() - saving  # not training time
        if not self._due(self.config.checkpoint_every):
            self._save()
        return self._finish()

    def _train_step(self, micro_batches: list[Batch], window: _Window) -> None:
        started = time.perf_counter()
        for index, batch in enumerate(micro_batches):
            batch = batch.to(self.env.device)
            last = index == len(micro_batches) - 1
            with gradient_sync(self.model, enabled=last), self.precision.autocast():
                loss_sum = self._loss_sum(self.model, batch)
            scale = self.env.world_size / batch.step_tokens
            self.precision.backward(loss_sum * scale)
            window.loss_sum += loss_sum.detach().float()
            window.tokens += batch.n_tokens
            window.slots += batch.n_slots
        self.grad_norm = self.precision.clip(self.optimizer, self.config.clip_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.position = SamplerPosition(*micro_batches[-1].position)
        window.steps += 1
        window.compute_s += time.perf_counter() - started

    @staticmethod
    def _loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch.tokens, batch.model_lengths(batch.tokens.device))
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch.targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    # ---- data ---------------------------------------------------------------------------------

    def _loader(self) -> Iterator[Batch]:
        sampler = FixedBatchSampler(
            np.fromiter((len(seq) for seq in self.corpus.train), dtype=np.int64),
            batch_size=self.config.batch_size,
            world_size=self.env.world_size,
            rank=self.env.rank,
            grad_accum=self.config.grad_accum,
            seed=self.config.seed,
            start=self.state.position,
        )
        loader = make_loader(self.corpus.train, sampler, self.env.device, self.config.num_workers)
        return iter(loader)

    def _step_groups(self, batches: Iterator[Batch]) -> Iterator[list[Batch]]:
        while True:
            yield [next(batches) for _ in range(self.config.grad_accum)]

    # ---- metrics ------------------------------------------------------------------------------

    def _new_window(self) -> _Window:
        return _Window(loss_sum=torch.zeros((), device=self.env.device))

    def _close_window(self, window: _Window) -> dict:
        """One metrics row: global loss and throughput, per-rank step time and memory."""
        counts = torch.tensor(
            [window.loss_sum.item(), window.tokens, window.slots], dtype=torch.float64
        )
        loss_sum, tokens, slots = all_reduce_sum(counts, self.env).tolist()
        elapsed = time.perf_counter() - window.started
        self.totals["tokens"] += int(tokens)
        self.totals["slots"] += int(slots)
        self.totals["train_s"] += elapsed
        self.state.tokens += int(tokens)
        self.last_loss = loss_sum / max(tokens, 1)
        memory = peak_memory_bytes(self.env.device)
        per_rank = all_gather_floats([window.compute_s / max(window.steps, 1), memory], self.env)
        return {
            "step": self.state.step,
            "loss": self.last_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": tokens / elapsed,
            "padding_fraction": 1 - tokens / max(slots, 1),
            "rank_step_time_s": [row[0] for row in per_rank],
            "rank_rss_bytes": [int(row[1]) for row in per_rank],
        }

    def _tokens_per_s(self) -> float | None:
        if not self.totals["train_s"]:
            return None
        return self.totals["tokens"] / self.totals["train_s"]

    def _due(self, every: int) -> bool:
        return (
            every > 0 and self.state.step % every == 0
        ) or self.state.step == self.config.max_steps

    # ---- checkpoints --------------------------------------------------------------------------

    def _resume_if_asked(self) -> None:
        wanted = self.config.resume
        chosen = find_checkpoint(wanted) if wanted and self.env.is_main else None
        path = agree_on_checkpoint(chosen, self.env) if wanted else None
        if path is None:
            return
        self.state = load_checkpoint(path, self.model, self.optimizer, self.env)
        self.scheduler.load_state_dict(self.state.scheduler)
        self.precision.load_state_dict(self.state.scaler)
        self.state.world_size = self.env.world_size

    def _save(self) -> None:
        self.state.scheduler = self.scheduler.state_dict()
        self.state.scaler = self.precision.state_dict()
        save_checkpoint(
            self.run_dir / "checkpoints", self.model, self.optimizer, self.state, self.env
        )

    # ---- the end ------------------------------------------------------------------------------

    def _finish(self) -> dict:
        eval_loss = self.evaluate()
        memory = all_gather_floats([peak_memory_bytes(self.env.device)], self.env)
        summary = {
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "precision": self.config.precision,
            "model": self.config.model,
            "parameters": sum(p.numel() for p in unwrap(self.model).parameters()),
            "steps": self.state.step,
            "tokens": self.totals["tokens"],
            "tokens_per_s": self._tokens_per_s() or 0.0,
            "wall_time_s": time.perf_counter() - self.started,
            "final_train_loss": self.last_loss,
            "eval_loss": eval_loss,
            "peak_rss_bytes": [int(row[0]) for row in memory],
            "padding_fraction": 1 - self.totals["tokens"] / max(self.totals["slots"], 1),
            "data_notes": self.corpus.notes,
            "run_dir": str(self.run_dir),
        }
        if self.env.is_main:
            save_file(
                {
                    k: v.detach().cpu().contiguous()
                    for k, v in unwrap(self.model).state_dict().items()
                },
                str(self.run_dir / "model.safetensors"),
            )
            summary["sample_text"] = self.sample_text()
        return summary

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss on the held-out sequences, each rank taking every world_size-th one."""
        mine = self.corpus.eval[self.env.rank :: self.env.world_size]
        model = unwrap(self.model)
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for begin in range(0, len(mine), self.config.batch_size):
            batch = collate(mine[begin : begin + self.config.batch_size], step_tokens=1)
            with self.precision.autocast():
                loss = self._loss_sum(model, batch.to(self.env.device))
            totals += torch.tensor([float(loss), batch.n_tokens], dtype=torch.float64)
        model.train()
        loss_sum, tokens = all_reduce_sum(totals, self.env).tolist()
        return loss_sum / tokens if tokens else None

    def sample_text(self) -> str:
        """A few lines the trained model writes after a fixed prompt (seeded)."""
        if not self.config.sample_bytes:
            return ""
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        prompt = b"The "
        text = generate(unwrap(self.model), prompt, self.config.sample_bytes, generator=generator)
        return (prompt + text).decode("utf-8", errors="replace")
