"""A resume states what it changes, refuses what would make it another run, and checks the state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import final_weights, quick_config, reseal, train, write_corpus
from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.train.resume import _setting_changes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three steps of a small GRU with a checkpoint after each, trained once for the module:
    its corpus and its run dir, which no test touches (each tampers with its own copy)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as patch:  # as conftest's private_corpus_cache does
        patch.setenv("SHARDWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(quick_config(corpus, root / "run", max_steps=3, checkpoint_every=1), nproc=1)
    return corpus, root / "run"


@pytest.fixture
def corpus(trained: tuple[Path, Path]) -> Path:
    """The corpus the trained run read: a resume on it names no change of data."""
    return trained[0]


@pytest.fixture
def run(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the trained run, as fresh as a run of its own: a resume writes into it."""
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def edit_state(path: Path, edit) -> None:
    state = json.loads((path / "trainer_state.json").read_text())
    edit(state)
    (path / "trainer_state.json").write_text(json.dumps(state))
    reseal(path)


def resume(corpus: Path, run: Path, **overrides: object) -> dict:
    values = {"max_steps": 3, "checkpoint_every": 1, "resume": run, **overrides}
    return train(quick_config(corpus, run, **values), nproc=1)


def test_settings_that_may_change_are_applied_and_listed(corpus: Path, run: Path) -> None:
    summary = resume(corpus, run, max_steps=5, log_every=2, checkpoint_every=1)
    assert summary["steps"] == 5
    assert summary["resumed_from"] == str(step_dir(run, 3))
    assert summary["resume_notes"] == [
        "max_steps: 3 -> 5 (the cosine decay now ends at step 5)",
        "log_every: 1 -> 2",
    ]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"lr": 0.1}, "lr was 0.003, now 0.1: the learning-rate schedule is part of the run"),
        ({"warmup_steps": 0}, "warmup_steps was 1, now 0"),
        ({"max_len": 32}, "max_len was 64, now 32"),
        ({"model": "lstm"}, "model was 'gru', now 'lstm': the checkpoint holds another model's"),
        ({"sync": "diloco"}, "sync was 'allreduce', now 'diloco': the checkpoint holds another"),
        ({"sync": "local-sgd"}, "sync was 'allreduce', now 'local-sgd': the checkpoint holds"),
    ],
)
def test_settings_that_would_make_another_run_are_refused(
    corpus: Path, run: Path, override: dict, reason: str
) -> None:
    with pytest.raises(ShardwiseError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        resume(corpus, run, **override)


def test_other_data_is_refused_and_the_same_data_elsewhere_is_noted(
    corpus: Path, run: Path, tmp_path: Path
) -> None:
    other = write_corpus(tmp_path / "other.txt", seed=1)
    with pytest.raises(ShardwiseError, match="this run's data differs from the checkpoint's"):
        resume(corpus, run, data=other)
    copy = Path(shutil.copy(corpus, tmp_path / "copy.txt"))
    summary = resume(corpus, run, data=copy, max_steps=4)
    assert f"data: {corpus} -> {copy} (the same tokens)" in summary["resume_notes"]


def test_an_inflated_learning_rate_is_refused_even_when_resealed(corpus: Path, run: Path) -> None:
    def inflate(state: dict) -> None:
        state["scheduler"]["_last_lr"] = [1e4]
        state["optimizer_groups"][0]["lr"] = 1e4

    edit_state(step_dir(run, 3), inflate)
    with pytest.raises(ShardwiseError, match=r"its learning rate 10000\.0 at step 3 is not"):
        resume(corpus, run, resume=step_dir(run, 3))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s["scheduler"].update(base_lrs=[3.0]), "base rates are not its --lr"),
        (lambda s: s["scheduler"].update(last_epoch=1), "its scheduler is at step 1, not 3"),
        (lambda s: s["optimizer_groups"][0].update(betas=[0.0, 0.0]), "optimizer's betas"),
        (lambda s: s["position"].update(offset=10**9), "past the"),
        (lambda s: s.update(model_fingerprint="0" * 16), "written for a model of another shape"),
    ],
)
def test_an_inconsistent_state_is_refused(corpus: Path, run: Path, edit, reason: str) -> None:
    edit_state(step_dir(run, 3), edit)
    with pytest.raises(ShardwiseError, match=reason):
        resume(corpus, run, resume=step_dir(run, 3))


def test_a_corrupted_newest_checkpoint_falls_back_and_still_ends_exactly(
    corpus: Path, run: Path, tmp_path: Path
) -> None:
    uninterrupted = final_weights(run)
    shard = step_dir(run, 3) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    summary = resume(corpus, run)
    assert summary["resumed_from"] == str(step_dir(run, 2))
    assert summary["resume_notes"][0].startswith("step_00000003 skipped: __0_0.distcp does not")
    resumed = final_weights(run)
    for name, tensor in uninterrupted.items():
        assert resumed[name].equal(tensor), name


@pytest.mark.parametrize(
    ("saved", "changed", "refused"),
    [
        ({"sync": "diloco"}, {"outer_lr": 0.5}, True),
        ({"sync": "local-sgd"}, {"outer_lr": 0.5}, False),  # local SGD has no outer optimizer
        ({"grad_compression": "powersgd"}, {"powersgd_rank": 2}, True),
        ({}, {"powersgd_rank": 2}, False),
        ({"sync": "local-sgd"}, {"sync_groups": "node"}, True),
    ],
)
def test_a_strategys_settings_bind_only_runs_that_used_it(
    saved: dict, changed: dict, refused: bool, tmp_path: Path
) -> None:
    # As recorded by a run: a setting its strategy ignores is refused only when given.
    before, after = TrainConfig(**saved), TrainConfig.from_record({**saved, **changed})
    if refused:
        with pytest.raises(ShardwiseError, match=f"{next(iter(changed))} was"):
            _setting_changes(tmp_path, before, after)
    else:
        assert _setting_changes(tmp_path, before, after) == [
            f"{name}: {getattr(before, name)} -> {value}" for name, value in changed.items()
        ]
