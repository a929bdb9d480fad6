"""The measurement inside a contender's loop: its training clock, token budget and weight dumps.

    recorder = Recorder(job, weights=lambda: model.module.state_dict(), start_hash=state_hash(m))
    for inputs, targets in loader:
        ...                                   # the contender's own step
        if recorder.step_done(targets):       # budget spent: every rank stops at the same step
            break
    recorder.finish()                         # rank 0 writes result.json

The clock runs only inside training steps: it stops at the end of each step for the
bookkeeping (one all-reduce of the step's token counts, which every rank needs to stop at the
same step) and, every `dump_every` tokens, for rank 0 to write the weights (between barriers),
and starts again before the next step. What each dump records is (training seconds, tokens so
far); the parent evaluates the weights later, on the held-out sequences, outside every clock.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from job import IGNORE, Job
from safetensors.torch import save_file

ONE_THREAD_PER_RANK = 1  # 2 ranks on 2 cores: what `shardwise train` picks here too


def limit_threads() -> None:
    """One intra-op thread per rank, as in every contender (shardwise sets it from the cores)."""
    torch.set_num_threads(ONE_THREAD_PER_RANK)


class Recorder:
    """Counts a rank's useful tokens and padded slots, keeps the clock and writes the dumps."""

    def __init__(
        self, job: Job, weights: Callable[[], dict[str, torch.Tensor]], start_hash: str
    ) -> None:
        self.job = job
        self.weights = weights
        self.start_hash = start_hash
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.tokens = 0  # useful (target) tokens over every rank
        self.slots = 0  # computed target slots over every rank, padding included
        self.steps = 0
        self.elapsed = 0.0
        self.dumps: list[dict[str, float | int | str]] = []
        self.next_dump = job.dump_every
        job.out.mkdir(parents=True, exist_ok=True)
        self._dump()  # the starting point: 0 s, 0 tokens
        self.started = time.perf_counter()

    def step_done(self, targets: torch.Tensor) -> bool:
        """Close the step whose targets these were; True once the token budget is spent."""
        self.elapsed += time.perf_counter() - self.started
        counts = torch.tensor([int((targets != IGNORE).sum()), targets.numel()], dtype=torch.int64)
        dist.all_reduce(counts)
        self.tokens += int(counts[0])
        self.slots += int(counts[1])
        self.steps += 1
        done = self.tokens >= self.job.tokens
        if done or self.tokens >= self.next_dump:
            self._dump()
            while self.next_dump <= self.tokens:
                self.next_dump += self.job.dump_every
        self.started = time.perf_counter()
        return done

    def finish(self) -> None:
        """Gather every rank's peak RSS; rank 0 writes result.json into the job's folder."""
        peak = torch.zeros(self.world_size, dtype=torch.float64)
        peak[self.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        dist.all_reduce(peak)
        if self.rank == 0:
            result = {
                "start_hash": self.start_hash,
                "tokens": self.tokens,
                "slots": self.slots,
                "steps": self.steps,
                "elapsed_s": self.elapsed,
                "peak_rss_bytes": peak.tolist(),
                "threads": torch.get_num_threads(),
                "dumps": self.dumps,
            }
            (self.job.out / "result.json").write_text(json.dumps(result))

    def _dump(self) -> None:
        dist.barrier()
        if self.rank == 0:
            path = self.job.out / f"dump_{len(self.dumps):03d}.safetensors"
            state = {name: t.detach().cpu().contiguous() for name, t in self.weights().items()}
            save_file(state, str(path))
            self.dumps.append({"elapsed_s": self.elapsed, "tokens": self.tokens, "path": str(path)})
        dist.barrier()
