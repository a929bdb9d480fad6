"""Numbers no run can use (inf, nan, a timeout too short to join, a negative seed) are one line."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from shardwise.config import TrainConfig, build_config, load_config
from shardwise.errors import ShardwiseError
from test_cli import assert_one_line_error, run_cli

# flag and value: a fragment of the one error line
BAD_NUMBERS = {
    "--timeout-s inf": "timeout_s (--timeout-s) = 'inf': Input should be a finite number",
    "--timeout-s nan": "timeout_s (--timeout-s) = 'nan': Input should be a finite number",
    "--timeout-s 0.001": "greater than or equal to 1",
    "--timeout-s 1e9": "less than or equal to 86400",
    "--seed -1": "seed (--seed) = '-1': Input should be greater than or equal to 0",
    "--seed 4294967296": "less than or equal to 4294967295",
    "--seed 99999999999999999999999": "less than or equal to 4294967295",
    "--lr inf": "lr (--lr) = 'inf': Input should be a finite number",
    "--lr nan": "lr (--lr) = 'nan'",
    "--clip-norm nan": "clip_norm (--clip-norm) = 'nan'",
    "--eval-fraction nan": "eval_fraction (--eval-fraction) = 'nan'",
    "--bucket-mb inf": "bucket_mb (--bucket-mb) = 'inf'",
}
FLOAT_FIELDS = [
    name
    for name, field in TrainConfig.model_fields.items()
    if field.annotation is float or float in typing.get_args(field.annotation)
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", list(BAD_NUMBERS))
def test_an_unusable_number_is_one_line_before_any_worker_starts(
    flag: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    code, err = run_cli(["--data", str(corpus), *flag.split(), "--run-dir", str(run_dir)], capsys)
    assert_one_line_error(code, err, BAD_NUMBERS[flag])
    assert not run_dir.exists()  # refused by the config: no worker made the run dir


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_no_float_setting_takes_a_non_finite_value(name: str, value: str) -> None:
    with pytest.raises(ShardwiseError, match=f"{name} .*= '{value}': Input should be a finite"):
        build_config({name: value})


def test_every_float_field_is_checked() -> None:
    # The check above must not pass by finding none: these are today's float settings.
    expected = {"eval_fraction", "outer_lr", "outer_momentum", "bucket_mb", "timeout_s"}
    assert expected | {"clip_norm", "lr", "weight_decay", "min_lr_ratio"} <= set(FLOAT_FIELDS)


def test_toml_inf_and_nan_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    for text in ("lr = inf\n", "timeout_s = nan\n"):  # TOML spells both as plain floats
        path.write_text(text)
        with pytest.raises(ShardwiseError, match="Input should be a finite number"):
            load_config(path)


def test_the_edges_of_the_ranges_are_accepted() -> None:
    config = build_config({"timeout_s": 1, "seed": 2**32 - 1})
    assert (config.timeout_s, config.seed) == (1.0, 2**32 - 1)
    assert build_config({"timeout_s": 86_400, "seed": 0}).seed == 0


@pytest.mark.timeout(60)
def test_the_real_command_says_it_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "shardwise", "train", "--timeout-s", "inf", "--seed", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "shardwise: error: config: timeout_s (--timeout-s) = 'inf': Input should be a finite number"
    ]
