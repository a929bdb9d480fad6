"""A run's memory as predicted and as measured, per rank: what summary.json and report.md keep.

    watch = MemoryWatch.start(config, corpus, env, model, cuts, parallelism)  # before prepare()
    ...                                                           # train
    summary["memory"] = watch.summary()                           # every rank calls it

Rank 0 predicts every rank's peak before anything of the run is allocated (the same prediction
the launcher made, memory/predict.py); each rank then measures from its own start. A rank's
prediction is recorded on the ground of its own measured baseline, and its error is given both
on the whole peak and on what training added above the baseline, the part the prediction models
(on CPU the baseline, an idle torch process, is most of a small run's peak).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from shardwise.config import TrainConfig
from shardwise.data.prepare import PreparedCorpus
from shardwise.distributed import DistEnv, all_gather_floats
from shardwise.memory.kernels import kernel_cache_capacities
from shardwise.memory.measure import (
    MemoryMeter,
    mmap_threshold,
    model_bytes,
    release_freed_memory,
)
from shardwise.memory.predict import MemoryPrediction, MemoryPredictor
from shardwise.parallel.parallelism import Parallelism
from shardwise.parallel.parallelize import warm_techniques


@dataclass
class MemoryWatch:
    """This rank's meter and (on rank 0) every rank's prediction."""

    env: DistEnv
    meter: MemoryMeter
    prediction: MemoryPrediction | None

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        corpus: PreparedCorpus,
        env: DistEnv,
        model: nn.Module,
        cuts: Sequence[str] | None,
        parallelism: Parallelism | None = None,
        warm: Callable[[], None] | None = None,
    ) -> MemoryWatch:
        """Predict (rank 0), then start measuring: `model` is the whole model as built. With
        the run's `parallelism`, its techniques run once on a toy first (every rank), and then
        `warm` (the loop's own code on a toy: its optimizer): their one-time cost is the
        baseline's, not the run's (parallelize.warm_techniques). The model's own code has run
        by then (its contract probe, the profile)."""
        prediction = None
        if env.is_main:
            predictor = MemoryPredictor(config, corpus, baseline=0)
            prediction = predictor.predict(config, config.layout(env.world_size), cuts)
        if parallelism is not None:
            warm_techniques(parallelism)
        if warm is not None:
            warm()
        release_freed_memory()  # the profile's and the toys' freed pages: not the baseline's
        return cls(env, MemoryMeter.start(env.device, held=model_bytes(model)), prediction)

    def summary(self) -> dict[str, Any] | None:
        """summary.json's "memory": per rank, predicted parts and total, measured baseline and
        peak, and the errors (rank 0's answer; None on the others). A collective."""
        figures = self.meter.figures()
        reserved = figures["reserved_bytes"]
        gathered = all_gather_floats(
            [
                float(self.env.rank),
                figures["baseline_bytes"],
                figures["peak_bytes"],
                -1 if reserved is None else reserved,
                float(bool(figures["peak_since_start"])),
            ],
            self.env,
        )
        if self.prediction is None:
            return None
        # By rank: an asynchronous run gathers only the workers still in it (a lost one is
        # missing, and its prediction has nothing to be set against).
        measured = {int(row[0]): row[1:] for row in gathered}
        ranks = []
        for predicted in self.prediction.ranks:
            if predicted.rank not in measured:
                continue
            baseline, peak, reserved, since = measured[predicted.rank]
            grounded = predicted.with_baseline(int(baseline))
            ranks.append(
                {
                    "rank": grounded.rank,
                    "predicted_bytes": grounded.total,
                    "predicted_parts": dict(grounded.parts),
                    "worst_batch": {
                        "step": grounded.batch.step,
                        "rows": grounded.batch.shape.rows,
                        "width": grounded.batch.shape.width,
                        "packed": grounded.batch.shape.packed,
                    },
                    "baseline_bytes": int(baseline),
                    "peak_bytes": int(peak),
                    "reserved_bytes": None if reserved < 0 else int(reserved),
                    "peak_since_start": bool(since),
                    "error": relative_error(grounded.total, peak),
                    "error_above_baseline": relative_error(
                        grounded.total - baseline, peak - baseline
                    ),
                }
            )
        return {
            "device": self.env.device.type,
            "ranks": ranks,
            "mmap_threshold": mmap_threshold() if self.env.device.type == "cpu" else None,
            # The host's kernel caches' capacities ("": the libraries' default).
            "kernel_caches": kernel_cache_capacities(),
        }


def relative_error(predicted: float, measured: float) -> float | None:
    """(predicted - measured) / measured: positive when the prediction is above; None at 0.

    >>> relative_error(110, 100), relative_error(5, 0)
    (0.1, None)
    """
    return None if measured <= 0 else round((predicted - measured) / measured, 4)
