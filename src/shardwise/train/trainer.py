"""The training loop: read it top to bottom in `Trainer.fit`.

    trainer = Trainer(config, env, corpus, model, run_dir)
    summary = trainer.fit()   # dict, also written to run_dir/summary.json by rank 0

Loss normalisation is what makes every layout exact: each micro-batch's summed token loss is
divided by the token count of the whole optimizer step (known to every rank from the sampler),
so the gradient is exactly that of the global token-mean loss for any split over ranks,
micro-steps and pipeline micro-batches. How a micro-step runs (DDP replica, pipeline stage,
tensor-parallel shard) is the engine's business (`train/engines.py`); the loop is the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from shardwise.checkpoint import (
    TrainerState,
    agree_on_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from shardwise.config import TrainConfig
from shardwise.data.batch import Batch, collate
from shardwise.data.loader import make_loader
from shardwise.data.prepare import PreparedCorpus
from shardwise.data.sampler import SamplerPosition
from shardwise.distributed import DistEnv, all_gather_floats, all_reduce_sum, peak_memory_bytes
from shardwise.errors import ShardwiseError
from shardwise.models import generate
from shardwise.report import MetricsWriter, TrainProgress
from shardwise.train.batching import build_sampler, stream_identity
from shardwise.train.engines import make_engine
from shardwise.train.precision import Precision
from shardwise.train.resume import (
    Fingerprints,
    LiveState,
    check_resume,
    data_fingerprint,
    model_fingerprint,
)
from shardwise.train.schedule import lr_factor, warmup_cosine
from shardwise.train.timing import StepClock, imbalance


@dataclass
class _Window:
    """What happened since the last metrics row, on this rank."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-step, on the device
    tokens: int = 0
    slots: int = 0
    compute_s: list[float] = field(default_factory=list)  # per step
    wait_s: list[float] = field(default_factory=list)  # per step
    predicted_imbalance: list[float] = field(default_factory=list)  # per step, token batching
    started: float = field(default_factory=time.perf_counter)


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
        self.totals: dict = {
            "tokens": 0,
            "slots": 0,
            "train_s": 0.0,
            "slowest_s": 0.0,
            "mean_s": 0.0,
        }
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.resume_notes: list[str] = []
        self.clock = StepClock(self.engine.parameters())

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
            window = _Window()
            while self.state.step < self.config.max_steps:
                micro_batches = next(steps)
                self._train_step(micro_batches, window)
                if self._due(self.config.log_every):
                    row = self._close_window(window)
                    window = _Window()  # logging's own cost counts in the next window
                    if main:
                        metrics.log(row)
                progress.update(self.state.step, self.last_loss, self._tokens_per_s())
                if self._due(self.config.checkpoint_every):
                    saving = time.perf_counter()
                    self._save()
                    window.started += time.perf_counter() - saving  # not training time
        if self.last_checkpoint is None:  # resumed at the end already: nothing trained
            self._save()
        return self._finish()

    def _train_step(self, micro_batches: list[Batch], window: _Window) -> None:
        self.clock.start()
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # Kept on the device: reading it back every micro-step would stall a GPU's queue.
            window.losses.append(self.engine.micro_step(batch.to(self.env.device), last))
            if self.engine.owns_counts:
                window.tokens += batch.n_tokens
                window.slots += batch.n_slots
        self.clock.backward_done()
        self.grad_norm = self.engine.clip(self.optimizer, self.config.clip_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.position = SamplerPosition(*micro_batches[-1].position)
        compute, wait = self.clock.stop()
        window.compute_s.append(compute)
        window.wait_s.append(wait)
        if micro_batches[-1].rank_costs:
            costs = micro_batches[-1].rank_costs
            window.predicted_imbalance.append(max(costs) / (sum(costs) / len(costs)))

    # ---- data ---------------------------------------------------------------------------------

    def _loader(self) -> Iterator[Batch]:
        lengths = np.fromiter((len(seq) for seq in self.corpus.train), dtype=np.int64)
        sampler = build_sampler(
            self.config,
            lengths,
            self.engine.data_world_size,
            self.engine.data_rank,
            start=self.state.position,
        )
        loader = make_loader(
            self.corpus.train,
            sampler,
            self.env.device,
            self.config.num_workers,
            packing=self.config.packs_rows,
        )
        return iter(loader)

    def _step_groups(self, batches: Iterator[Batch]) -> Iterator[list[Batch]]:
        while True:
            yield [next(batches) for _ in range(self.config.grad_accum)]

    # ---- metrics ------------------------------------------------------------------------------

    def _close_window(self, window: _Window) -> dict:
        """One metrics row: global loss and throughput, per-rank step time and memory."""
        counts = torch.tensor(
            [sum(float(loss) for loss in window.losses), window.tokens, window.slots],
            dtype=torch.float64,
        )
        loss_sum, tokens, slots = all_reduce_sum(counts, self.env).tolist()
        elapsed = time.perf_counter() - window.started
        self.totals["tokens"] += int(tokens)
        self.totals["slots"] += int(slots)
        self.totals["train_s"] += elapsed
        self.state.tokens += int(tokens)
        self.last_loss = loss_sum / max(tokens, 1)
        memory = peak_memory_bytes(self.env.device)
        per_rank = all_gather_floats([memory, *window.compute_s, *window.wait_s], self.env)
        steps = len(window.compute_s)
        compute = [row[1 : 1 + steps] for row in per_rank]
        wait = [row[1 + steps :] for row in per_rank]
        self.totals["rank_compute_s"] = _add(self.totals.get("rank_compute_s"), map(sum, compute))
        self.totals["rank_wait_s"] = _add(self.totals.get("rank_wait_s"), map(sum, wait))
        self.totals["slowest_s"] += sum(max(step) for step in zip(*compute, strict=True))
        self.totals["mean_s"] += sum(sum(step) / len(step) for step in zip(*compute, strict=True))
        return {
            "step": self.state.step,
            "loss": self.last_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": tokens / elapsed,
            "padding_fraction": 1 - tokens / max(slots, 1),
            "imbalance": imbalance(compute),
            "predicted_imbalance": _mean(window.predicted_imbalance),
            "rank_step_time_s": [
                (sum(c) + sum(w)) / steps for c, w in zip(compute, wait, strict=True)
            ],
            "rank_wait_s": [sum(w) for w in wait],
            "rank_rss_bytes": [int(row[0]) for row in per_rank],
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
        if not self.state.data_fingerprint:
            self.state.data_fingerprint = data_fingerprint(self.corpus)
        self.last_checkpoint = save_checkpoint(
            self.run_dir / "checkpoints", self.engine.module, self.optimizer, self.state, self.env
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
            "steps": self.state.step,
            "tokens": self.totals["tokens"],
            "tokens_per_s": self._tokens_per_s() or 0.0,
            "wall_time_s": time.perf_counter() - self.started,
            "final_train_loss": self.last_loss,
            "eval_loss": eval_loss,
            "peak_rss_bytes": [int(row[0]) for row in memory],
            "padding_fraction": 1 - self.totals["tokens"] / max(self.totals["slots"], 1),
            "imbalance": self.totals["slowest_s"] / max(self.totals["mean_s"], 1e-12),
            "rank_wait_s": self.totals.get("rank_wait_s", []),
            "wait_fraction": _wait_fraction(self.totals),
            "batching": self.config.batching,
            "data_notes": self.corpus.notes,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "resume_notes": self.resume_notes,
            "run_dir": str(self.run_dir),
        }
        if self.env.is_main:
            model = self.engine.whole_model(self.last_checkpoint)
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(self.run_dir / "model.safetensors"))
            summary["parameters"] = sum(p.numel() for p in model.parameters())
            summary["sample_text"] = self.sample_text(model)
        return summary

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss on the held-out sequences, each data rank taking its share."""
        world, rank = self.engine.data_world_size, self.engine.data_rank
        mine = self.corpus.eval[rank::world]
        self.engine.module.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for begin in range(0, len(mine), self.config.batch_size):
            batch = collate(mine[begin : begin + self.config.batch_size], step_tokens=1)
            loss_sum = self.engine.eval_loss_sum(batch.to(self.env.device))
            tokens = batch.n_tokens if self.engine.owns_counts else 0
            totals += torch.tensor([loss_sum, tokens], dtype=torch.float64)
        self.engine.module.train()
        loss_sum, tokens = all_reduce_sum(totals, self.env).tolist()
        return loss_sum / tokens if tokens else None

    def sample_text(self, model: nn.Module) -> str:
        """A few lines the trained model writes after a fixed prompt (seeded)."""
        if not self.config.sample_bytes:
            return ""
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        prompt = b"The "
        text = generate(model, prompt, self.config.sample_bytes, generator=generator)
        return (prompt + text).decode("utf-8", errors="replace")


def _add(totals: list[float] | None, values: Iterable[float]) -> list[float]:
    values = list(values)
    return values if totals is None else [a + b for a, b in zip(totals, values, strict=True)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _wait_fraction(totals: dict) -> float | None:
    compute, wait = totals.get("rank_compute_s"), totals.get("rank_wait_s")
    if not compute:
        return None
    return sum(wait) / (sum(compute) + sum(wait))
