"""What a resumed run may change, and the checks that keep a resume honest.

    changes = check_resume(path, state, config, corpus, fingerprints)   # or ShardwiseError
    changes   # ["max_steps: 300 -> 400 (the cosine decay now ends at step 400)"]

A checkpoint records the settings that produced it. On resume, settings that only say how long,
where or how visibly to train apply and are listed; settings that would silently make it
another run (its data, its model, its data order, its learning-rate schedule) are refused with
the reason. The state must also agree with itself and with this run: the step its scheduler
reached, the learning rate that schedule gives, a data position inside the data.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from shardwise.checkpoint import (
    CheckpointRejected,
    TrainerState,
    candidates,
    find_checkpoint,
    is_checkpoint_dir,
    load_newest,
    read_state,
)
from shardwise.config import Record, TrainConfig
from shardwise.data.prepare import PreparedCorpus
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import ParallelModel
from shardwise.session import Session
from shardwise.techniques import registered
from shardwise.techniques import settings as technique_settings
from shardwise.train.build import stream_identity
from shardwise.train.lr_schedule import follow_lr_schedule, lr_factor

# Another value makes it another run: the reason the resume is refused (the config's own settings;
# the techniques' follow).
REFUSED = {
    "model": "the checkpoint holds another model's weights",
    "max_len": "sequences would be cut differently, which changes the data",
    "long_sequences": "sequences would be cut differently, which changes the data",
    "eval_fraction": "the held-out split, and so the training data, would change",
    "lr": "the learning-rate schedule is part of the run",
    "warmup_steps": "the learning-rate schedule is part of the run",
    "min_lr_ratio": "the learning-rate schedule is part of the run",
    "weight_decay": "the optimizer's settings are part of the run",
    "seed": "the data order is part of the run",
    "batching": "the data order is part of the run",
    "sort_window": "the data order is part of the run",
}
# The techniques' settings that make another run (their declared `resume` reason), each refused
# only where the saved run read it (its `read_when`), else a mere change.
REFUSED |= {name: s.resume for name, s in technique_settings().items() if s.resume is not None}
IN_EFFECT = {name: s.read_when for name, s in technique_settings().items() if s.resume is not None}
# Not settings of the run itself (where it lives, how it survives failures and signals); the
# data is compared by its tokens' fingerprint instead.
IGNORED = {
    "run_dir",
    "resume",
    "overwrite",
    "data",
    "max_restarts",
    "preempt_grace_s",
    "heartbeat_timeout_s",
}

# Where this node sits in a job, not what the run is: a continued run takes them from its own
# command line (TrainConfig.settings() already leaves out run_dir, resume and overwrite).
NOT_CONTINUED = {"node_rank", "rdzv_endpoint"}


def recorded_settings(path: Path) -> Record:
    """The settings the run at `path` trained with: what `--resume path` continues from.

        load_config(None, {"max_steps": 400}, recorded_settings(Path("runs/a")))

    `path` is a run dir (its newest checkpoint whose trainer state verifies speaks for it) or
    one checkpoint. The checkpoint's own record is the one `check_resume` compares this run
    against, and a start that was refused never rewrites it, as it does config.toml.
    """
    source = f"--resume {path}"
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
        raise ShardwiseError(
            f"{source}: {problem}; pass a run directory or one of its checkpoints/step_XXXXXXXX"
        )
    named = is_checkpoint_dir(path)
    listed = [path] if named else candidates(path / "checkpoints") or candidates(path)
    if not listed:
        find_checkpoint(path)  # its one line: no complete checkpoint there
    reasons = []
    for checkpoint in listed:
        try:
            saved = saved_config(checkpoint, read_state(checkpoint))
        except CheckpointRejected as rejected:
            if named:
                raise
            reasons.append(f"{checkpoint.name}: {rejected.reason}")
            continue
        values = {k: v for k, v in saved.settings().items() if k not in NOT_CONTINUED}
        return Record(source, values)
    raise ShardwiseError(
        f"{source}: no checkpoint there records the run's settings ({reasons[0]}); resume from "
        "a checkpoint the run wrote, or start a new run"
    )


@dataclass(frozen=True)
class LiveState:
    """This run's optimizer groups and scheduler state, before anything is loaded."""

    optimizer_groups: list[dict]
    scheduler: dict


@dataclass(frozen=True)
class Fingerprints:
    """What identifies the model's structure and the exact token data of a run."""

    model: str
    data: str


def check_resume(
    path: Path,
    state: TrainerState,
    config: TrainConfig,
    corpus: PreparedCorpus,
    fingerprints: Fingerprints,
    live: LiveState,
) -> list[str]:
    """Refuse a resume that would change the run; the lines describing what does change.

    `live` is this run's freshly built optimizer and scheduler: the checkpoint's scheduler
    state must have exactly their shape, and every optimizer hyperparameter but the learning
    rate (which follows the schedule) must match.
    """
    _check_stream(path, state, config)
    saved = saved_config(path, state)
    # Named settings first: their refusal says more than a fingerprint that differs.
    changes = _setting_changes(path, saved, config)
    _check_fingerprints(path, state, fingerprints)
    _check_position(path, state, corpus)
    _check_progress(path, state, saved, corpus)
    _check_optimizer(path, state, live.optimizer_groups)
    _check_same_shape(path, "scheduler", state.scheduler, live.scheduler)
    _check_schedule(path, state, saved)
    return changes


def _check_stream(path: Path, state: TrainerState, config: TrainConfig) -> None:
    if state.stream and state.stream != stream_identity(config):
        raise ShardwiseError(
            f"--resume {path}: the checkpoint's data order came from {state.stream}, "
            f"this run's from {stream_identity(config)}; resume with the same settings "
            "(batch sizes, world size and layout may change)"
        )


def saved_config(path: Path, state: TrainerState) -> TrainConfig:
    """The settings the checkpoint was written with."""
    if not state.config:
        raise CheckpointRejected(path, "it records no run settings (not written by a run)")
    try:
        return TrainConfig.from_record(state.config)  # an older run's ignored settings too
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise CheckpointRejected(path, f"its recorded settings are invalid ({reason})") from None


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer's name, shape and dtype."""
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()]
    return hashlib.sha256(repr(layout).encode()).hexdigest()[:16]


def data_fingerprint(corpus: PreparedCorpus) -> str:
    """A digest of the training and held-out token sequences."""
    digest = hashlib.sha256()
    for group in (corpus.train, corpus.eval):
        digest.update(np.array([len(seq) for seq in group], dtype=np.int64).tobytes())
        for seq in group:
            digest.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _check_schedule(path: Path, state: TrainerState, saved: TrainConfig) -> None:
    # The stored learning rates are the ones the checkpoint's own schedule gives at its step.
    last_epoch = state.scheduler.get("last_epoch")
    if last_epoch != state.step:
        raise CheckpointRejected(path, f"its scheduler is at step {last_epoch}, not {state.step}")
    expected = saved.lr * lr_factor(
        state.step, saved.warmup_steps, saved.max_steps, saved.min_lr_ratio
    )
    groups = len(state.optimizer_groups)
    if state.scheduler.get("base_lrs") != [saved.lr] * groups:
        raise CheckpointRejected(path, f"its scheduler's base rates are not its --lr {saved.lr:g}")
    last_lr = state.scheduler.get("_last_lr")
    stored = [*(last_lr if isinstance(last_lr, list) else [None])]
    stored += [group.get("lr") for group in state.optimizer_groups]
    for lr in stored:
        if not isinstance(lr, float | int) or not math.isclose(lr, expected, rel_tol=1e-9):
            raise CheckpointRejected(
                path,
                f"its learning rate {lr} at step {state.step} is not the {expected:g} "
                "its schedule gives",
            )


def _check_optimizer(path: Path, state: TrainerState, live: list[dict]) -> None:
    scheduled = {"lr", "initial_lr", "params"}
    if len(live) != len(state.optimizer_groups):
        raise CheckpointRejected(path, f"it has {len(state.optimizer_groups)} optimizer groups")
    for group, saved in zip(live, state.optimizer_groups, strict=True):
        for key in sorted((set(group) | set(saved)) - scheduled):
            ours = list(group[key]) if isinstance(group.get(key), tuple) else group.get(key)
            if ours != saved.get(key):
                raise CheckpointRejected(
                    path, f"its optimizer's {key} is {saved.get(key)!r}, this run's {ours!r}"
                )


def _check_same_shape(path: Path, what: str, saved: object, live: object) -> None:
    """`saved` has `live`'s keys, and values of its types, all the way down."""
    if isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise CheckpointRejected(path, f"its {what} state has other fields than this run's")
        for key in live:
            _check_same_shape(path, f"{what}.{key}", saved[key], live[key])
    elif isinstance(live, list):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise CheckpointRejected(path, f"its {what} has another length than this run's")
        for saved_item, live_item in zip(saved, live, strict=True):
            _check_same_shape(path, what, saved_item, live_item)
    elif type(saved) is not type(live) and not (isinstance(live, float) and type(saved) is int):
        raise CheckpointRejected(path, f"its {what} is {saved!r}, not a {type(live).__name__}")


def _check_technique_state(path: Path, state: TrainerState, layout: Layout) -> None:
    """Each technique's state in the checkpoint fits this layout (its `refuses_resume`)."""
    saved = saved_config(path, state)
    for technique in registered():
        if technique.refuses_resume is not None:
            refusal = technique.refuses_resume(saved, state.world_size, layout)
            if refusal is not None:
                raise ShardwiseError(f"--resume {path}: {refusal}")


def _check_position(path: Path, state: TrainerState, corpus: PreparedCorpus) -> None:
    if state.position.offset > len(corpus.train):
        raise CheckpointRejected(
            path,
            f"its data position {state.position.offset} is past the {len(corpus.train)} "
            "training sequences",
        )


def _check_progress(
    path: Path, state: TrainerState, saved: TrainConfig, corpus: PreparedCorpus
) -> None:
    """Step, epoch and tokens within what the run that wrote them could have reached.

    A step ends inside one epoch, or just into the next (token batches at an epoch's end), so
    epochs never outrun steps; and it reads at most one epoch and that next epoch's first
    samples, so at most twice the training tokens. Neither bound depends on batch sizes, which
    a resume may change.
    """
    if state.step > saved.max_steps:
        raise CheckpointRejected(
            path, f"its step {state.step} is past the {saved.max_steps} steps its run planned"
        )
    if state.position.epoch > state.step:
        raise CheckpointRejected(
            path,
            f"its data position is in epoch {state.position.epoch}, further than {state.step} "
            "steps reach",
        )
    most = 2 * state.step * sum(len(sequence) for sequence in corpus.train)
    if state.tokens > most:
        raise CheckpointRejected(
            path,
            f"it counts {state.tokens} tokens trained, more than {state.step} steps can hold "
            f"({most} at most)",
        )


def _check_fingerprints(path: Path, state: TrainerState, found: Fingerprints) -> None:
    # Every run records both: one missing would switch its check off, so it is refused.
    for what, recorded in (("model", state.model_fingerprint), ("data", state.data_fingerprint)):
        if not recorded:
            raise CheckpointRejected(path, f"it records no {what} fingerprint (every run does)")
    if state.model_fingerprint != found.model:
        raise ShardwiseError(
            f"--resume {path}: the checkpoint was written for a model of another shape "
            "(parameter names, shapes or dtypes differ); resume with the same --model"
        )
    if state.data_fingerprint != found.data:
        raise ShardwiseError(
            f"--resume {path}: this run's data differs from the checkpoint's (another --data "
            "file, or the file changed); resume on the same data, or start a new run"
        )


def _setting_changes(path: Path, saved: TrainConfig, config: TrainConfig) -> list[str]:
    changes = []
    for name in TrainConfig.model_fields:
        before, after = getattr(saved, name), getattr(config, name)
        if name in IGNORED or before == after:
            continue
        if name in REFUSED and IN_EFFECT.get(name, lambda _: True)(saved):
            raise ShardwiseError(
                f"--resume {path}: {name} was {before!r}, now {after!r}: {REFUSED[name]}; "
                f"resume with {_flag(name)} {before}, or start a new run"
            )
        changes.append(f"{name}: {before} -> {after}{_consequence(name, after)}")
    if saved.data != config.data:
        changes.append(f"data: {saved.data} -> {config.data} (the same tokens)")
    return changes


def _consequence(name: str, value: object) -> str:
    if name == "max_steps":
        return f" (the cosine decay now ends at step {value})"
    if name in {"batch_size", "tokens_per_batch", "grad_accum", "dp", "nproc", "nnodes"}:
        return " (the data stream continues from the same sample)"
    return ""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_training(
    config: TrainConfig,
    session: Session,
    model: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    corpus: PreparedCorpus,
    model_print: str,
) -> tuple[TrainerState, Path, list[str]]:
    """Load `--resume`'s newest good checkpoint after every check; its state, path and notes.

    state, path, notes = resume_training(config, session, model, optimizer, scheduler, corpus, p)

    `model_print` is the whole model's fingerprint, taken before it was cut into stages. From a
    run directory, a checkpoint that fails a check or its load is skipped for an older one.
    """
    fingerprints = Fingerprints(model_print, data_fingerprint(corpus))
    env = session.env
    assert config.resume is not None
    # Taken before any load: a checkpoint that fails half-way has changed the optimizer.
    live = LiveState([dict(group) for group in optimizer.param_groups], scheduler.state_dict())

    def check_and_load(path: Path, state: TrainerState) -> tuple[TrainerState, list[str]]:
        changes = check_resume(path, state, config, corpus, fingerprints, live)
        _check_technique_state(path, state, session.layout)
        loaded = session.load(path, model, optimizer, verified=True)
        if loaded != state:  # the state checked above is the one training goes on from
            raise CheckpointRejected(path, "its trainer state changed while it was loaded")
        return loaded, changes

    path, (state, changes), skipped = load_newest(config.resume, env, check_and_load)
    scheduler.load_state_dict(state.scheduler)
    factor = lr_factor(state.step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    follow_lr_schedule(optimizer, scheduler, factor)
    state.world_size = env.world_size
    notes = [*skipped, *changes]
    if env.is_main:
        print(f"shardwise: resuming from {path} (step {state.step})", flush=True)
        for note in notes:
            print(f"  {note}", flush=True)
    return state, path, notes
