"""Input nested 100,000 levels deep is one line naming its file and line, not a RecursionError.

JSON and TOML parsers recurse once per level of nesting, so `[[[[...]]]]` on one line of
--data x.jsonl, or in a --config file, overflows Python's stack inside the parser; a config
nested less deeply overflows later, in whatever prints or validates its value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise.cli import main
from shardwise.config.files import load_config
from shardwise.data.corpus import numbered_sequences, read_sequences
from shardwise.errors import ShardwiseError

DEEP = 100_000
GOOD = json.dumps({"text": "a line of text"})


def deep_jsonl_lines() -> dict[str, str]:
    return {
        "a bare array": "[" * DEEP + "]" * DEEP,
        "the text": '{"text": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
        "the tokens": '{"tokens": ' + "[" * DEEP + "]" * DEEP + "}",
    }


def deep_toml_configs() -> dict[str, str]:
    return {
        "an array": "seed = " + "[" * DEEP + "]" * DEEP,
        "an inline table": "seed = " + "{a = " * DEEP + "1" + "}" * DEEP,
        # These parse (dotted keys and table headers do not recurse in the parser), then
        # overflowed in the repr of the value that pydantic's error message quotes.
        "dotted keys": "seed" + ".a" * 5_000 + " = 1",
        "a table header": "[seed" + ".a" * 5_000 + "]\nb = 1",
        "a modest array": "seed = " + "[" * 500 + "]" * 500,
    }


def one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1, err[-2000:]
    return err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(deep_jsonl_lines()))
def test_a_deep_jsonl_line_is_one_line_naming_it(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Before: RecursionError from json.loads, a traceback through the CLI.
    data = tmp_path / "data.jsonl"
    data.write_text(f"{GOOD}\n\n{GOOD}\n{deep_jsonl_lines()[case]}\n{GOOD}\n")
    where = f"{data}:4:"
    with pytest.raises(ShardwiseError, match="nested") as caught:
        read_sequences(data)
    assert str(caught.value).startswith(where)
    with pytest.raises(ShardwiseError, match="nested"):
        list(numbered_sequences(data))  # the reader that finds a bad id's line again
    err = one_line_error(["--data", str(data), "--run-dir", str(tmp_path / "run")], capsys)
    assert where in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(deep_toml_configs()))
def test_a_deep_toml_config_is_one_line_naming_its_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Before: RecursionError from tomllib, or from the repr of the value in the error message.
    config = tmp_path / "run.toml"
    deep = deep_toml_configs()[case]
    config.write_text(f'# a config\nmax_len = 64\n\n{deep}\nmodel = "gru"\n')
    with pytest.raises(ShardwiseError) as caught:
        load_config(config)
    message = str(caught.value)
    assert message.startswith(f"--config {config}, line 4:"), message[:300]
    assert "nested" in message and len(message) < 400
    err = one_line_error(["--config", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert f"{config}, line 4:" in err


@pytest.mark.timeout(30)
def test_a_config_nested_as_far_as_settings_go_still_loads(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('split_points = ["blocks.1"]\npp = 2\n')
    assert load_config(config).split_points == ["blocks.1"]
