"""A flag means what it says: one the run's mode never reads is refused when given, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardwise.config import TrainConfig, build_config, load_config
from shardwise.config.rules import only_in
from shardwise.errors import ShardwiseError

# Per setting: a value other than its default, a mode that ignores it, a mode that reads it.
CASES = {
    "batch_size": (32, {}, {"batching": "fixed"}),
    "tokens_per_batch": (4096, {"batching": "fixed"}, {}),
    "sort_window": (7, {"batching": "fixed"}, {}),
    "microbatches": (8, {"tp": 2}, {"pp": 2}),
    "schedule": ("gpipe", {}, {"pp": 2}),
    "sync_every": (4, {"sync": "async", "ps": 1}, {"sync": "local-sgd"}),
    "sync_warmup_steps": (2, {}, {"sync": "diloco"}),
    "sync_groups": ("node", {}, {"sync": "local-sgd"}),
    "outer_lr": (0.5, {"sync": "local-sgd"}, {"sync": "diloco"}),
    "outer_momentum": (0.5, {}, {"sync": "diloco"}),
    "outer_bf16": (True, {"sync": "local-sgd"}, {"sync": "diloco"}),
    "powersgd_rank": (2, {"grad_compression": "bf16"}, {"grad_compression": "powersgd"}),
    "powersgd_warmup_steps": (5, {}, {"grad_compression": "powersgd"}),
    "max_staleness": (4, {"sync": "diloco"}, {"sync": "async", "ps": 1}),
    "bucket_mb": (10.0, {"pp": 2}, {}),
    "input_layout": ("time-major", {"model": "gru"}, {"model": "user_models:time_major_lstm"}),
    "model_output": ("0", {}, {"model": "user_models:odd_names"}),
    "recompute_every": (2, {}, {"recompute": "full"}),
    "offload": (True, {}, {"shard": "full"}),
}


def test_every_setting_of_one_mode_has_a_case() -> None:
    assert set(CASES) == set(only_in())


@pytest.mark.parametrize("name", CASES)
def test_a_setting_the_mode_ignores_is_refused_in_one_line_naming_it(name: str) -> None:
    value, ignoring, reading = CASES[name]
    with pytest.raises(ShardwiseError) as caught:
        build_config({**ignoring, name: value})
    message = str(caught.value)
    flag = "--" + name.replace("_", "-")
    assert f": {flag}" in message and " has no effect with " in message and "\n" not in message
    assert getattr(build_config({**reading, name: value}), name) == value


@pytest.mark.parametrize("name", CASES)
def test_its_default_given_explicitly_passes(name: str) -> None:
    _, ignoring, _ = CASES[name]
    default = TrainConfig.model_fields[name].default
    build_config({**ignoring, name: default})


def test_batch_size_under_token_batching_says_what_to_use_instead() -> None:
    with pytest.raises(ShardwiseError) as caught:
        build_config({"batch_size": "4"})  # as the flag arrives
    assert str(caught.value) == (
        "config: --batch-size 4 has no effect with --batching tokens (the default) (it is "
        "--batching fixed's sequences per batch; token batches hold --tokens-per-batch tokens); "
        "use --tokens-per-batch N instead, or add --batching fixed"
    )
    assert build_config({"batching": "fixed"}).fixed_batch_size == 16
    assert build_config({"batching": "fixed", "batch_size": "4"}).fixed_batch_size == 4


def test_an_old_config_toml_with_the_old_default_batch_size_still_loads(tmp_path: Path) -> None:
    # What to_toml wrote before --batch-size became fixed batching's alone: every field.
    path = tmp_path / "config.toml"
    path.write_text('batching = "tokens"\nbatch_size = 16\ntokens_per_batch = 2048\n')
    config = load_config(path)
    assert config.batch_size is None and "batch_size" not in config.to_toml()


def test_two_budgets_are_refused_from_python_too() -> None:
    with pytest.raises(ValueError, match="--max-steps and --max-tokens both say when to stop"):
        TrainConfig(max_steps=50, max_tokens=1000)
    with pytest.raises(ValueError, match="--max-tokens and --epochs both say when to stop"):
        TrainConfig(max_tokens=1000, epochs=1.0)
    TrainConfig(max_steps=300, max_tokens=1000)  # the default: what every recorded config holds


@pytest.mark.parametrize(
    "values",
    [
        {"batching": "fixed", "batch_size": 8},
        {"tokens_per_batch": 512, "sort_window": 64},
        {"pp": 2, "microbatches": 8, "schedule": "gpipe"},
        {"sync": "diloco", "sync_every": 4, "outer_lr": 0.5, "outer_bf16": True},
        {"grad_compression": "powersgd", "powersgd_rank": 2},
        {"sync": "async", "ps": 1, "max_staleness": 4},
        {"model": "user_models:odd_names", "model_output": "0"},
    ],
    ids=["fixed", "tokens", "pipeline", "diloco", "powersgd", "async", "own model"],
)
def test_config_toml_holds_only_what_the_run_reads_and_loads_back(
    tmp_path: Path, values: dict
) -> None:
    config = TrainConfig(**values)
    text = config.to_toml()
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path) == config
    for name, rule in only_in().items():
        assert (f"\n{name} = " in f"\n{text}") == rule.reads(config), name


def test_a_recorded_config_with_settings_its_run_ignored_still_resumes() -> None:
    # An older version's checkpoint: --batch-size 32 under token batching, an ignored
    # --sync-every, and a --max-tokens run's steps (derived from its budget) beside it.
    record = {**TrainConfig().model_dump(mode="json"), "batch_size": 32, "sync_every": 4}
    record.update(max_tokens=10_000, max_steps=37)
    saved = TrainConfig.from_record(record)
    assert (saved.batch_size, saved.sync_every, saved.max_steps) == (32, 4, 37)
    with pytest.raises(ValueError, match="--batch-size 32 has no effect"):
        TrainConfig.model_validate(record)
