"""A remembered cut: reused when the model, sample and settings match, harmless when edited."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.models import RecurrentLM
from shardwise.parallel.stages import model_pieces, stage_starts
from shardwise.partition.store import cut_key, remember_cuts, remembered_cuts


def key_for(model: torch.nn.Module, sample: torch.Tensor, **settings: object) -> str:
    options = {"stages": 2, "microbatches": 4, "schedule": "1f1b"} | settings
    return cut_key(model, sample, **options)  # type: ignore[arg-type]


def test_a_cut_is_remembered_under_its_key(tmp_path: Path) -> None:
    key = key_for(RecurrentLM(num_layers=3), torch.zeros(4, 8, dtype=torch.long))
    assert remembered_cuts(key, tmp_path) is None
    remember_cuts(key, ["blocks.1"], tmp_path)
    assert remembered_cuts(key, tmp_path) == ["blocks.1"]


def test_another_model_sample_or_setting_is_another_key() -> None:
    sample = torch.zeros(4, 8, dtype=torch.long)
    base = key_for(RecurrentLM(num_layers=3), sample)
    assert base == key_for(RecurrentLM(num_layers=3), sample)  # weights' values do not matter
    assert base != key_for(RecurrentLM(num_layers=4), sample)
    assert base != key_for(RecurrentLM(num_layers=3), sample + 1)
    assert base != key_for(RecurrentLM(num_layers=3), sample, microbatches=8)
    assert base != key_for(RecurrentLM(num_layers=3), sample, schedule="gpipe")


@pytest.mark.parametrize("content", ["not json", '{"cuts": 1}', "[1, 2]", '"blocks.1"'])
def test_an_entry_that_is_not_a_list_of_names_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "cuts").mkdir()
    (tmp_path / "cuts" / "k.json").write_text(content)
    assert remembered_cuts("k", tmp_path) is None


def test_an_edited_entry_can_only_name_a_cut_that_is_refused(tmp_path: Path) -> None:
    remember_cuts("k", ["os.system"], tmp_path)
    cuts = remembered_cuts("k", tmp_path)
    model = RecurrentLM(num_layers=3)
    with pytest.raises(ShardwiseError, match="names no module"):
        stage_starts(model, model_pieces(model), cuts or [], 2)
