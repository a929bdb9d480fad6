"""What `shardwise.run` returns: rank 0's summary as typed fields, and the trained model.

    result = shardwise.run(TrainConfig(model="gru", max_steps=100))
    result.eval_loss, result.tokens_per_s
    model = result.load_model()   # the trained nn.Module, from run_dir/model.safetensors

summary.json stays the record on disk; `RunResult` is the same keys, typed. Building one from
a summary with a key too many or too few is a bug (the summary and this class drifted apart),
so it fails loudly rather than dropping or inventing a figure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardwise.report.summary import json_value

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class RunResult:
    """One finished run, as rank 0 summed it up (summary.json), in summary.json's order."""

    world_size: int
    layout: dict[str, int]  # the degrees and world size: {"dp": 2, "pp": 1, "tp": 1, ...}
    stages: tuple[tuple[str, ...], ...] | None  # each pipeline stage's layers; None: one stage
    device: str
    precision: str
    sync: str  # how replicas agreed: allreduce, local-sgd or diloco
    model: str  # a built-in's name or 'package.module:factory'
    vocab_size: int  # what the model was built with: 256 bytes, or more for token ids
    steps: int
    nonfinite_steps_skipped: int  # steps with a NaN/inf loss or gradient skipped (--on-nonfinite)
    tokens: int
    tokens_per_s: float
    wall_time_s: float  # this attempt's training (after a restart: the last attempt's)
    final_train_loss: float | None  # None: no step was logged
    eval_loss: float | None  # None: no held-out tokens
    peak_rss_bytes: tuple[int, ...]  # per rank
    padding_fraction: float
    imbalance: float
    rank_wait_s: tuple[float, ...]  # per rank
    wait_fraction: float | None
    sync_bytes_per_step: tuple[float, ...]  # per rank: payload handed to collectives, run mean
    sync_exchanges: tuple[int, ...]  # per rank: collectives (DDP buckets) that carried it
    sync_time_s: tuple[float, ...]  # per rank: backward's end wait + exchanges after the step
    compute_time_s: tuple[float, ...]  # per rank: the rest of the steps' time
    eval_tokens: int  # held-out targets eval_loss averages over (a seeded subset, --eval-tokens)
    eval_tokens_available: int  # held-out targets in all (--eval-fraction of the data)
    eval_s: float  # seconds every evaluation took (not counted as training time)
    sync_staleness_histogram: dict[str, int] | None  # async: {staleness: steps}, all ranks
    sync_workers_lost: dict[str, str] | None  # async: {rank: why} of workers that died
    batching: str
    data_notes: str
    resumed_from: Path | None
    resume_notes: tuple[str, ...]
    run_dir: Path
    parameters: int
    sample_text: str
    restarts: tuple[dict[str, Any], ...]  # each: time, rank, reason, resumed_from_step, steps_lost
    wall_time_s_since_launch: float | None  # the whole run, restarts included (our launcher)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> RunResult:
        """The result for rank 0's summary dict; ValueError unless its keys are exactly ours.

        result = RunResult.from_summary(json.loads((run_dir / "summary.json").read_text()))
        """
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in summary]
        unknown = [key for key in summary if key not in names]
        if missing or unknown:
            raise ValueError(
                f"a run summary does not match RunResult: missing {missing}, unknown {unknown}; "
                "the summary's keys and RunResult's fields must change together"
            )
        values = dict(summary)
        per_rank = ("sync_bytes_per_step", "sync_exchanges", "sync_time_s", "compute_time_s")
        for name in ("peak_rss_bytes", "rank_wait_s", *per_rank, "resume_notes", "restarts"):
            values[name] = tuple(values[name])
        if values["stages"] is not None:
            values["stages"] = tuple(tuple(stage) for stage in values["stages"])
        values["run_dir"] = Path(values["run_dir"])
        if values["resumed_from"] is not None:
            values["resumed_from"] = Path(values["resumed_from"])
        return cls(**values)

    def to_summary(self) -> dict[str, Any]:
        """The summary dict as summary.json holds it (lists and strings, not tuples and paths).

        assert result.to_summary() == json.loads((result.run_dir / "summary.json").read_text())
        """
        return json.loads(json.dumps(dataclasses.asdict(self), default=json_value))

    def load_model(self) -> nn.Module:
        """The trained model, rebuilt and loaded from `run_dir/model.safetensors`, in eval mode.

        model = result.load_model()
        text = shardwise.models.generate(model, b"The ", 200)

        Built as the run built it: its config.toml's model at the run's vocabulary size. A
        factory model must be importable here as it was in the run.
        """
        # Imported here: a result that is only read needs neither a corpus nor a model.
        from safetensors.torch import load_file

        from shardwise.config import TrainConfig
        from shardwise.config.files import read_toml
        from shardwise.models import build_model
        from shardwise.run_dir import WEIGHTS_FILE

        # A record, not an order: an older version's config.toml may hold settings it ignored.
        config = TrainConfig.from_record(read_toml(self.run_dir / "config.toml"))
        model = build_model(config.model, self.vocab_size)
        model.load_state_dict(load_file(str(self.run_dir / WEIGHTS_FILE)))
        return model.eval()
