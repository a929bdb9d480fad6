"""`--resume RUN_DIR` skips, in one line each, every checkpoint it cannot check or load.

Whatever is wrong with the newest checkpoint - a file it cannot read, data that trips the
loader, a state that claims what the run could not have reached, weights of another dtype - the
resume names it ("step_00000003 skipped: <reason>"), takes the next older one, and still ends
exactly where the uninterrupted run did. Named directly, the same checkpoint is refused in one
line: the user asked for that one, so nothing else is taken instead.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoint import lies
from checkpoint.trained_run import (
    Base,
    assert_ends_exactly,
    copy_run,
    resume,
    step_dir,
    train_base,
)
from shardwise.errors import ShardwiseError

pytestmark = pytest.mark.timeout(240)

Lie = Callable[[Path], Path]

LIES: list[Lie] = [
    lies.plant_unknown_layout,
    lies.plant_invalid_rng_state,
    lies.plant_empty_model_fingerprint,
    lies.plant_empty_data_fingerprint,
    lies.plant_far_step,
    lies.plant_far_epoch,
    lies.plant_far_tokens,
    lies.plant_int64_weights,
    lies.plant_int64_shard_only,
]


def lie_id(lie: Lie) -> str:
    return lie.__name__.removeprefix("plant_")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return train_base(tmp_path_factory.mktemp("base"))


def assert_skipped(summary: dict, skipped: Path, resumed: Path) -> str:
    """The resume noted `skipped` in one line and went on from `resumed`; the note."""
    note = summary["resume_notes"][0]
    assert note.startswith(f"{skipped.name} skipped: "), summary["resume_notes"]
    assert "\n" not in note
    assert summary["resumed_from"] == str(resumed)
    return note


@pytest.mark.parametrize("lie", LIES, ids=lie_id)
def test_a_run_dir_resume_skips_a_lying_checkpoint_and_ends_exactly(
    base: Base, tmp_path: Path, lie: Lie
) -> None:
    run = copy_run(base, tmp_path)
    tampered = lie(step_dir(run, 3))
    older = step_dir(run, 3) if tampered != step_dir(run, 3) else step_dir(run, 2)
    summary = resume(base, run)
    assert_skipped(summary, tampered, older)
    assert summary["steps"] == 3
    assert_ends_exactly(base, run)


@pytest.mark.parametrize("lie", LIES, ids=lie_id)
def test_a_named_lying_checkpoint_is_refused_in_one_line(
    base: Base, tmp_path: Path, lie: Lie
) -> None:
    run = copy_run(base, tmp_path)
    tampered = lie(step_dir(run, 3))
    with pytest.raises(ShardwiseError) as refused:
        resume(base, run, resume_from=tampered)
    assert "\n" not in str(refused.value)
    assert str(tampered) in str(refused.value)


# ---- files the resume may not read --------------------------------------------------------------


def deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make reading `denied` (a file, or a folder and all in it) raise EACCES, as chmod 000
    does for anyone but root: opening it, listing it, and looking up anything inside it."""
    is_folder = denied.is_dir()

    def where(path: object, dir_fd: int | None) -> str | None:
        if isinstance(path, int):
            return None  # an open descriptor: it was opened through a check already
        text = os.fsdecode(path)  # type: ignore[arg-type]
        if dir_fd is not None and not os.path.isabs(text):
            text = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text)
        return os.path.abspath(text)

    def inside(path: str | None) -> bool:
        return is_folder and path is not None and path.startswith(f"{denied}{os.sep}")

    def guarded(original: Callable, opens: bool) -> Callable:
        def call(path: object, *args: object, **kwargs: object) -> object:
            found = where(path, kwargs.get("dir_fd"))  # type: ignore[arg-type]
            if inside(found) or (opens and found == str(denied)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), found)
            return original(path, *args, **kwargs)

        return call

    for module, name, opens in [
        (builtins, "open", True),
        (io, "open", True),
        (os, "open", True),
        (os, "scandir", True),
        (os, "listdir", True),
        (os, "stat", False),
        (os, "lstat", False),
    ]:
        monkeypatch.setattr(module, name, guarded(getattr(module, name), opens))


UNREADABLE = {
    "shard": lambda run: step_dir(run, 3) / lies.SHARD,
    "step-dir": lambda run: step_dir(run, 3),
}


@pytest.mark.parametrize("what", UNREADABLE)
def test_an_unreadable_shard_or_step_dir_is_skipped(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    run = copy_run(base, tmp_path)
    deny(monkeypatch, UNREADABLE[what](run))
    summary = resume(base, run)
    note = assert_skipped(summary, step_dir(run, 3), step_dir(run, 2))
    assert "ermission denied" in note
    monkeypatch.undo()
    assert_ends_exactly(base, run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
@pytest.mark.parametrize("what", UNREADABLE)
def test_a_chmod_000_shard_or_step_dir_is_skipped(base: Base, tmp_path: Path, what: str) -> None:
    run = copy_run(base, tmp_path)
    unreadable = UNREADABLE[what](run)
    unreadable.chmod(0)
    try:
        summary = resume(base, run)
    finally:
        unreadable.chmod(0o755)
    assert_skipped(summary, step_dir(run, 3), step_dir(run, 2))
