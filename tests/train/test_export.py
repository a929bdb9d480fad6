"""The end-of-run export: the whole model as safetensors, and the seeded sample text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from shardwise.models import build_model
from shardwise.train.export import export_model, sample_text


def test_export_writes_the_weights_and_reports_parameters_and_sample(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("gru", vocab_size=256)
    config = SimpleNamespace(sample_bytes=8, seed=3)

    fields = export_model(config, model, tmp_path)

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert fields["parameters"] == sum(p.numel() for p in model.parameters())
    assert fields["sample_text"] == sample_text(model, 8, seed=3)  # seeded: the same again
    assert fields["sample_text"].startswith("The ")


def test_no_sample_bytes_means_no_sample() -> None:
    assert sample_text(build_model("gru", vocab_size=256), 0, seed=0) == ""
