"""Mistyped flags and values: one `shardwise: error:` line with what was meant, exit status 2."""

from __future__ import annotations

import pytest

from shardwise.cli import main

# arguments after `shardwise train`: the one line they must give
MISTAKES = {
    "--sync powersgd": "shardwise: error: --sync: 'powersgd' is not one of allreduce, local-sgd, "
    "diloco, async; powersgd is a value of --grad-compression: --grad-compression powersgd",
    "--sync alreduce": "shardwise: error: --sync: 'alreduce' is not one of allreduce, local-sgd, "
    "diloco, async (did you mean --sync allreduce?)",
    "--nprocs 4": "shardwise: error: unknown flag --nprocs (did you mean --nproc?)",
    "--max-step 3": "shardwise: error: unknown flag --max-step (did you mean --max-steps?)",
    "--powersgd": "shardwise: error: unknown flag --powersgd (did you mean --grad-compression "
    "powersgd?)",
    "--bf16": "shardwise: error: unknown flag --bf16 (did you mean --grad-compression bf16 or "
    "--precision bf16?)",
    "--xyzzy": "shardwise: error: unknown flag --xyzzy; see --help",
    "--grad-compression none powersgd": "shardwise: error: unexpected argument 'powersgd' "
    "(powersgd is a value of --grad-compression)",
}


@pytest.mark.parametrize("arguments", list(MISTAKES))
def test_a_mistyped_flag_or_value_is_one_line_naming_what_was_meant(
    arguments: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *arguments.split(), "--dry-run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == MISTAKES[arguments] + "\n"


def test_no_flag_is_taken_by_its_prefix(capsys: pytest.CaptureFixture) -> None:
    for prefix in ("--max-step", "--checkpoint-ev", "--conf"):
        with pytest.raises(SystemExit):
            main(["train", prefix, "3", "--dry-run"])
        assert f"unknown flag {prefix}" in capsys.readouterr().err


def test_a_missing_command_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert capsys.readouterr().err == (
        "shardwise: error: the following arguments are required: command\n"
    )
