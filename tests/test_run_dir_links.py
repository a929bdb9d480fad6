"""A run dir from elsewhere may hold symbolic links: shardwise never writes through one.

Each test plants a link in a run dir pointing at a "victim" outside it, runs the real writer,
and checks the victim is byte-identical afterwards: the link was replaced by a regular file,
or the run was refused in one line naming the link.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shardwise
from helpers import quick_config
from shardwise.cli import main
from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.report import MetricsWriter, plot_metrics, write_report, write_summary
from shardwise.run_dir import (
    LOCK_FILE,
    WRITTEN_BY_RUNS,
    check_run_dir,
    hold_run_dir,
    remove_run_outputs,
)
from shardwise.safe_write import replace_file
from shardwise.train.export import export_model
from test_run_dir import quick_flags

pytestmark = pytest.mark.timeout(30)

VICTIM_BYTES = b"someone else's file, not the run's\n"
PLOTS = ("loss.png", "throughput.png", "rank_step_time.png")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the run dir holding files a link in the run dir may point at."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


def victim(outside: Path, name: str = "victim.txt") -> Path:
    path = outside / name
    path.write_bytes(VICTIM_BYTES)
    return path


def plant(run: Path, name: str, target: Path) -> Path:
    link = run / name
    link.symlink_to(target)
    return link


def is_untouched(path: Path) -> bool:
    return path.read_bytes() == VICTIM_BYTES


def is_replaced(link: Path) -> bool:
    return link.is_file() and not link.is_symlink()


def refuses_link(refused: pytest.ExceptionInfo[ShardwiseError], link: Path) -> None:
    message = str(refused.value)
    assert "\n" not in message
    assert f"{link} is a symbolic link" in message, message


def used(run: Path) -> Path:
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    return run


# The lock file: opened in place and locked, so a link there is refused, never followed.


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_linked_lock_file_is_refused_not_truncated(
    run: Path, outside: Path, overwrite: bool
) -> None:
    target = victim(outside)
    link = plant(run, LOCK_FILE, target)
    config = TrainConfig(run_dir=run, overwrite=overwrite)
    with pytest.raises(ShardwiseError) as refused:
        check_run_dir(config, run)  # the preflight, before any worker starts
    refuses_link(refused, link)
    with pytest.raises(ShardwiseError) as refused, hold_run_dir(config, run):
        pass
    refuses_link(refused, link)
    assert is_untouched(target)


def test_a_dangling_lock_link_does_not_create_its_target(run: Path, outside: Path) -> None:
    link = plant(run, LOCK_FILE, outside / "new.txt")
    with pytest.raises(ShardwiseError) as refused, hold_run_dir(TrainConfig(run_dir=run), run):
        pass
    refuses_link(refused, link)
    assert not (outside / "new.txt").exists()


# Files written in place (appended to, or written by the worker as they stand): refused before
# training, unless --overwrite deletes them first.


@pytest.mark.parametrize(
    ("name", "resume"),
    [
        ("metrics.jsonl", True),
        ("tensorboard", True),  # TensorBoard is on by default
        ("config.toml", True),
        ("config.toml", False),  # a fresh dir: the first file a run writes
    ],
)
def test_a_link_written_in_place_is_refused_before_training(
    run: Path, outside: Path, name: str, resume: bool
) -> None:
    target = outside if name == "tensorboard" else victim(outside)
    link = plant(used(run) if resume else run, name, target)
    config = TrainConfig(run_dir=run, resume=run if resume else None)
    with pytest.raises(ShardwiseError) as refused:
        check_run_dir(config, run)
    refuses_link(refused, link)
    with pytest.raises(ShardwiseError) as refused, hold_run_dir(config, run):
        pass
    refuses_link(refused, link)
    assert target.is_dir() or is_untouched(target)


def test_the_metrics_writer_never_appends_through_a_link(run: Path, outside: Path) -> None:
    target = victim(outside)
    plant(run, "metrics.jsonl", target)
    with MetricsWriter(run, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": 2.5})
    assert is_untouched(target)


def test_the_metrics_writer_writes_no_tensorboard_files_through_a_link(
    run: Path, outside: Path
) -> None:
    pytest.importorskip("tensorboard")
    victim(outside)
    plant(run, "tensorboard", outside)
    with MetricsWriter(run, tensorboard=True) as metrics:
        metrics.log({"step": 1, "loss": 2.5})
    assert sorted(path.name for path in outside.iterdir()) == ["victim.txt"]


# Files replaced whole: written under a new name and renamed over the link, which goes.


def test_plots_replace_links_instead_of_writing_through_them(run: Path, outside: Path) -> None:
    rows = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 100.0 * s, "rank_step_time_s": [0.1]}
            for s in (1, 2, 3)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    targets = [victim(outside, name) for name in PLOTS]
    links = [plant(run, name, target) for name, target in zip(PLOTS, targets, strict=True)]
    assert plot_metrics(run) == links
    assert all(is_untouched(target) for target in targets)
    assert all(is_replaced(link) and link.read_bytes().startswith(b"\x89PNG") for link in links)


def test_the_exported_model_replaces_a_link(run: Path, outside: Path) -> None:
    target = victim(outside)
    link = plant(run, "model.safetensors", target)
    model = torch.nn.Linear(2, 3)
    export_model(TrainConfig(sample_bytes=0), model, run)
    assert is_untouched(target)
    assert is_replaced(link)
    assert torch.equal(load_file(str(link))["weight"], model.weight.detach())


def test_the_summary_replaces_a_link(run: Path, outside: Path) -> None:
    target = victim(outside)
    link = plant(run, "summary.json", target)
    assert write_summary(run, {"steps": 3}) == link
    assert is_untouched(target)
    assert is_replaced(link) and json.loads(link.read_text()) == {"steps": 3}


def test_the_report_replaces_a_link(run: Path, outside: Path) -> None:
    target = victim(outside)
    link = plant(run, "report.md", target)
    assert write_report(run, {"steps": 3}, []) == link
    assert is_untouched(target)
    assert is_replaced(link) and link.read_text().startswith("# Run report")


def test_a_dangling_link_is_replaced_without_creating_its_target(run: Path, outside: Path) -> None:
    link = plant(run, "summary.json", outside / "new.txt")
    replace_file(link, "{}")
    assert not (outside / "new.txt").exists()
    assert is_replaced(link) and link.read_text() == "{}"
    assert sorted(path.name for path in run.iterdir()) == ["summary.json"]  # no temporary left


# Removal: --overwrite unlinks links, it never deletes or empties what they point to.


def test_overwrite_unlinks_every_linked_output_and_keeps_their_targets(
    run: Path, outside: Path
) -> None:
    target = victim(outside)
    folder = outside / "folder"
    folder.mkdir()
    (folder / "kept.bin").write_bytes(VICTIM_BYTES)
    for name in WRITTEN_BY_RUNS:
        plant(run, name, folder if name in ("checkpoints", "tensorboard") else target)
    with hold_run_dir(TrainConfig(run_dir=run, overwrite=True), run):
        assert sorted(path.name for path in run.iterdir()) == [LOCK_FILE]
    assert is_untouched(target) and is_untouched(folder / "kept.bin")


def test_removing_a_real_output_folder_unlinks_the_links_inside_it(
    run: Path, outside: Path
) -> None:
    target = victim(outside)
    (run / "tensorboard").mkdir()
    plant(run / "tensorboard", "events", outside)
    plant(run / "tensorboard", "file", target)
    remove_run_outputs(run)
    assert not (run / "tensorboard").exists()
    assert sorted(path.name for path in outside.iterdir()) == ["victim.txt"]
    assert is_untouched(target)


# The whole path once: a finished run's outputs swapped for links, then --resume.


@pytest.mark.timeout(90)
def test_resuming_a_run_dir_full_of_links_writes_through_none(
    corpus: Path, tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shardwise.run(quick_config(corpus, run, nproc=1, max_steps=2, checkpoint_every=2))
    replaced = (*PLOTS, "summary.json", "report.md", "model.safetensors")
    targets = {name: victim(outside, name) for name in (*replaced, "metrics.jsonl")}
    for name, target in targets.items():
        (run / name).unlink()
        plant(run, name, target)
    assert main(quick_flags(corpus, run, "--resume", str(run))) == 2
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"shardwise: error: .*{run / 'metrics.jsonl'} is a symbolic link.*", line)

    (run / "metrics.jsonl").unlink()  # as the refusal says; the other links stay
    result = shardwise.run(quick_config(corpus, run, nproc=1, max_steps=3, resume=run))
    assert result.steps == 3
    assert all(is_untouched(target) for target in targets.values())
    assert all(is_replaced(run / name) for name in replaced)


@pytest.mark.parametrize("name", ["step_00000002", "step_00000004.partial"])
def test_a_link_where_a_checkpoint_belongs_is_refused_before_training(
    run: Path, outside: Path, name: str
) -> None:
    link = used(run) / "checkpoints" / name
    link.symlink_to(outside, target_is_directory=True)
    config = TrainConfig(run_dir=run, resume=run)
    with pytest.raises(ShardwiseError) as refused:
        check_run_dir(config, run)
    message = str(refused.value)
    assert "\n" not in message and str(link) in message and "link" in message, message
    assert sorted(path.name for path in outside.iterdir()) == []
