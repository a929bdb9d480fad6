"""build_model / check_model_spec: built-ins, user factories, and every mistake a user can make."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from helpers import write_corpus
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.models import (
    BUILTIN_MODELS,
    RecurrentLM,
    TransformerLM,
    build_model,
    check_model_spec,
)

FACTORIES = """
    from torch import nn

    NUMBER = 3

    def with_vocab(vocab_size, hidden=8):
        return nn.Linear(hidden, vocab_size)

    def without_arguments():
        return nn.Linear(4, 4)

    def needs_width(width):
        return nn.Linear(width, width)

    def explodes():
        raise ValueError("bad\\nwidth")

    def not_a_module():
        return 42

    class Zoo:
        @staticmethod
        def small():
            return nn.GRU(4, 4)
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway importable module of factories, plus one that fails to import."""
    (tmp_path / "sw_factories.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "sw_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(tmp_path)
    for name in ("sw_factories", "sw_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "sw_factories"


def test_builtins_build_with_the_vocab_size() -> None:
    assert BUILTIN_MODELS == ("lstm", "gru", "transformer")
    lstm, gru, transformer = (build_model(name, vocab_size=260) for name in BUILTIN_MODELS)
    assert isinstance(lstm, RecurrentLM) and isinstance(lstm.blocks[0], nn.LSTM)
    assert isinstance(gru, RecurrentLM) and isinstance(gru.blocks[0], nn.GRU)
    assert isinstance(transformer, TransformerLM)
    assert all(m.head[-1].out_features == 260 for m in (lstm, gru, transformer))


def test_factories_get_vocab_size_only_when_they_ask_for_it(factories: str) -> None:
    assert build_model(f"{factories}:with_vocab", vocab_size=300).out_features == 300
    assert build_model(f"{factories}:without_arguments", vocab_size=300).out_features == 4
    assert isinstance(build_model(f"{factories}:Zoo.small"), nn.GRU)
    assert (
        build_model("shardwise.models:TransformerLM", vocab_size=260).head[-1].out_features == 260
    )


def test_check_model_spec_does_not_call_the_factory(factories: str) -> None:
    for spec in (*BUILTIN_MODELS, f"{factories}:explodes", f"{factories}:not_a_module"):
        check_model_spec(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lstn", r"not a built-in \(lstm, gru, transformer\) \(did you mean 'lstm'\?\)"),
        ("LSTM", r"\(did you mean 'lstm'\?\)"),
        ("", "not a built-in"),
        ("a.b:c:d", "'package.module:factory'"),
        (":build", "'package.module:factory'"),
        ("sw_factories:", "'package.module:factory'"),
        ("sw_no_such_module:build", "cannot import 'sw_no_such_module'.*No module named"),
        ("sw_broken:build", r"cannot import 'sw_broken' \(RuntimeError: no GPU here\)"),
        ("sw_factories:with_vocb", r"no attribute 'with_vocb' \(did you mean 'with_vocab'"),
        ("sw_factories:NUMBER", "'NUMBER' is of type int, not callable"),
        ("sw_factories:needs_width", r"cannot be called as factory\(\).*defaults"),
    ],
)
def test_mistakes_found_before_building(factories: str, spec: str, match: str) -> None:
    for call in (check_model_spec, build_model):
        with pytest.raises(ShardwiseError, match=match) as caught:
            call(spec)
        assert repr(spec) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("attribute", "match"),
    [
        ("explodes", "the factory raised ValueError: bad width"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
    ],
)
def test_mistakes_found_while_building(factories: str, attribute: str, match: str) -> None:
    with pytest.raises(ShardwiseError, match=match) as caught:
        build_model(f"{factories}:{attribute}")
    assert f"'{factories}:{attribute}'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_factorys_traceback_is_shown_once_above_its_one_line(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_corpus(tmp_path / "notes.txt")
    flags = ["--data", str(tmp_path / "notes.txt"), "--nproc", "1", "--device", "cpu"]
    spec = f"{factories}:explodes"
    assert main(["train", "--model", spec, *flags, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    *where, line = err.rstrip().splitlines()
    assert line.startswith(f"shardwise: error: model '{spec}': the factory raised ValueError: bad")
    # From the factory's own frame down: where in it, not where shardwise called it.
    assert where[0] == "Traceback (most recent call last):"
    assert 'sw_factories.py", line 16, in explodes' in where[1]
    assert where[-2:] == ["ValueError: bad", "width"]
    assert err.count("Traceback") == 1 and "build_model" not in err
