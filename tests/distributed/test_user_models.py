"""Users' own models, as written (tests/user_models.py), train on 2 ranks as on one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_adam_equivalent_weights, final_weights, metrics, quick_config, train

pytestmark = [pytest.mark.timeout(180), pytest.mark.distributed]


@pytest.mark.parametrize(
    "factory",
    ["user_models:time_major_lstm", "user_models:mask_in_forward", "user_models:odd_names"],
)
def test_two_ranks_train_a_users_model_as_one_process(
    corpus: Path, tmp_path: Path, factory: str
) -> None:
    common = {"model": factory, "batching": "fixed", "clip_norm": 0.5, "sample_bytes": 8}
    one = train(quick_config(corpus, tmp_path / "one", batch_size=8, **common), nproc=1)
    two = train(quick_config(corpus, tmp_path / "two", batch_size=4, **common), nproc=2)

    # Attention's in_proj_bias gets gradients near 1e-9, which AdamW amplifies (see helper).
    assert_adam_equivalent_weights(
        final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), lr=3e-3
    )
    for row_one, row_two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert row_one["loss"] == pytest.approx(row_two["loss"], rel=1e-5)
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-5)
    assert len(two["sample_text"]) > len("The ")  # sampled through the model's own call
