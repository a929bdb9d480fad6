import os
from pathlib import Path

import pytest

from shardwise.config import TrainConfig, load_config
from shardwise.errors import ShardwiseError


def test_flags_override_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('batch-size = 8\nlr = 0.01\nmodel = "gru"\nbatching = "fixed"\n')
    config = load_config(path, {"batch_size": 32})
    assert (config.batch_size, config.lr, config.model) == (32, 0.01, "gru")


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("bach_size = 8\n")
    with pytest.raises(ShardwiseError, match=r"unknown key 'bach_size'.*batch_size"):
        load_config(path)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('batch_size = "many"\n')
    with pytest.raises(ShardwiseError, match=r"batch_size \(--batch-size\) = 'many'"):
        load_config(path)


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("batch_size = = 3\n")
    with pytest.raises(ShardwiseError, match="not valid TOML"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ShardwiseError, match="file not found"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.timeout(10)
def test_a_config_that_is_a_directory_or_a_pipe_is_a_one_line_error(tmp_path: Path) -> None:
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)  # reading it would block forever: nobody writes
    for path in (tmp_path, fifo):
        with pytest.raises(ShardwiseError, match="not a regular file; pass a TOML file"):
            load_config(path)


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("a file config.toml names must be there to load\n")
    config = TrainConfig(batching="fixed", batch_size=7, data=tmp_path / "x.txt", precision="bf16")
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"node_rank": 2, "nnodes": 2, "rdzv_endpoint": "h:1"}, "node_rank 2 must be below"),
        ({"nnodes": 2}, "needs rdzv_endpoint"),
        ({"rdzv_endpoint": "nohost"}, "not HOST:PORT"),
        ({"grad_accum": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_combinations(values: dict, message: str) -> None:
    with pytest.raises(ShardwiseError, match=message):
        load_config(None, values)


def test_the_default_learning_rate_follows_the_model_and_a_given_one_wins() -> None:
    assert TrainConfig().lr == TrainConfig(model="gru").lr == 8e-3
    assert TrainConfig(model="transformer").lr == TrainConfig(model="pkg.mod:build").lr == 3e-3
    assert TrainConfig(model="transformer", lr=1e-2).lr == 1e-2
    saved = TrainConfig(model="transformer").model_dump_json()  # as config.toml keeps it
    assert TrainConfig.model_validate_json(saved).lr == 3e-3
