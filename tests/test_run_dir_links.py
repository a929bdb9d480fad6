"""A run dir from elsewhere may hold symbolic links: shardwise never writes through one.

Each test plants a link in a run dir pointing at a "victim" outside it, runs the real writer,
and checks the victim is byte-identical afterwards: the link was replaced by a regular file,
or the run was refused in one line naming the link.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardwise.config import TrainConfig
from shardwise.report import plot_metrics, write_report, write_summary
from shardwise.run_dir import (
    LOCK_FILE,
    WRITTEN_BY_RUNS,
    hold_run_dir,
    remove_run_outputs,
)
from shardwise.safe_write import replace_file
from shardwise.train.export import export_model

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
