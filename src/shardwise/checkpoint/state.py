"""The non-tensor part of a checkpoint, as schema-checked JSON.

    state = TrainerState(step=100, world_size=2)
    (path / STATE_FILE).write_text(state.to_json())
    state = read_state(path)          # CheckpointRejected unless it fits the schema exactly

Everything a resume needs besides tensors lives here — step, data position, scheduler and
loss-scaler state, the optimizer's hyperparameters, the run's settings and fingerprints of the
model and data — so the DCP shards hold tensors only and nothing loaded is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shardwise.checkpoint.manifest import parse_record
from shardwise.checkpoint.verified import VerifiedFiles
from shardwise.data.sampler import SamplerPosition

STATE_FILE = "trainer_state.json"
_MAX_STATE_BYTES = 64 << 20

JsonScalar = bool | int | float | str | None
# An optimizer group's hyperparameters: numbers, flags and pairs like AdamW's betas.
GroupValue = bool | int | float | str | None | list[float]


class TrainerState(BaseModel):
    """Where training stands, and what produced it; `trainer_state.json` on disk."""

    # allow_inf_nan: a NaN or infinite scale, rate or setting is never a state a run reached.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    step: int = Field(0, ge=0)
    position: SamplerPosition = Field(default_factory=SamplerPosition)
    tokens: int = Field(0, ge=0)
    scheduler: dict[str, JsonScalar | list[JsonScalar]] = Field(default_factory=dict)
    scaler: dict[str, JsonScalar] = Field(default_factory=dict)
    optimizer_groups: list[dict[str, GroupValue]] = Field(default_factory=list)
    world_size: int = Field(1, ge=1)
    stream: dict[str, JsonScalar] = Field(default_factory=dict)  # what fixes the data order
    config: dict[str, Any] = Field(default_factory=dict)  # the run's settings, as JSON
    model_fingerprint: str = ""
    data_fingerprint: str = ""

    @field_validator("position")
    @classmethod
    def _position_is_not_negative(cls, position: SamplerPosition) -> SamplerPosition:
        if position.epoch < 0 or position.offset < 0:
            raise ValueError("epoch and offset must not be negative")
        return position

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainerState:
        """Parse and validate; strict JSON types (no "15" for 15, no 1.5 for an int)."""
        return cls.model_validate_json(text)


def read_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint `path`, as its manifest seals it, against the schema."""
    with VerifiedFiles(path) as files:
        return state_of(files)


def state_of(files: VerifiedFiles) -> TrainerState:
    """The trainer state among `files`, checked against its digest, then against the schema."""
    data = files.read(STATE_FILE, max_bytes=_MAX_STATE_BYTES)
    return parse_record(files.root, STATE_FILE, data, TrainerState)
