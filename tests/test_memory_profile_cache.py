"""The activation profile is remembered on disk: the launcher's prediction and the run's record
of one model profile it once, and anything that decides it (the model's shapes, its call, the
precision, the widths) makes another entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardwise.memory import activations
from shardwise.models import build_model
from shardwise.models.contract import contract_for

pytestmark = pytest.mark.timeout(120)


def test_a_profile_is_reused_and_another_model_or_width_is_profiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = activations.profile_activations

    def counting(*args: object, **kwargs: object) -> activations.ActivationProfile:
        calls.append(args[3] if len(args) > 3 else kwargs.get("widest"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(activations, "profile_activations", counting)
    model = build_model("gru", 64)
    contract = contract_for(model, "gru", vocab_size=64)
    plain = activations.contextlib.nullcontext

    def profile(model: object, contract: object, widest: int) -> object:
        return activations.cached_profile(model, contract, plain, widest, False, "fp32", tmp_path)

    first = profile(model, contract, 16)
    assert profile(build_model("gru", 64), contract, 16) == first and calls == [16]
    profile(model, contract, 32)
    wider = build_model("gru", 128)
    profile(wider, contract_for(wider, "gru", vocab_size=128), 16)
    assert calls == [16, 32, 16]
    assert len(list((tmp_path / "memory").glob("*.json"))) == 3


def test_a_damaged_entry_is_profiled_again(tmp_path: Path) -> None:
    model = build_model("gru", 64)
    contract = contract_for(model, "gru", vocab_size=64)
    args = (model, contract, activations.contextlib.nullcontext, 16, False, "fp32", tmp_path)
    first = activations.cached_profile(*args)
    (entry,) = (tmp_path / "memory").glob("*.json")
    entry.write_text("{not json")
    assert activations.cached_profile(*args) == first
