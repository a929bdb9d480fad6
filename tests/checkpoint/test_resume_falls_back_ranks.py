"""On two ranks, a checkpoint that fails on one rank only is skipped by both, alike.

Rank 1 alone reads `rng/rank1.safetensors`: if only it gave up, rank 0 would train on from the
newest checkpoint while rank 1 stopped (or loaded an older one). The ranks swap outcomes, so
both skip it with the same note, resume from the same older checkpoint, and end exactly where
the uninterrupted run did.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint.payloads import seal
from helpers import assert_same_weights, final_weights, quick_config, train, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def test_a_checkpoint_one_rank_cannot_load_is_skipped_by_every_rank(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("ranks")
    corpus = write_corpus(root / "corpus.txt")
    config = quick_config(corpus, root / "full", max_steps=3, checkpoint_every=1)
    train(config, nproc=2)
    run = Path(shutil.copytree(root / "full", root / "resumed"))
    newest = run / "checkpoints" / "step_00000003"
    rng = {"cpu": torch.full_like(torch.get_rng_state(), 255)}  # "Invalid mt19937 state"
    save_file(rng, str(newest / "rng" / "rank1.safetensors"))
    seal(newest)

    summary = train(config.model_copy(update={"run_dir": run, "resume": run}), nproc=2)
    assert summary["resumed_from"] == str(run / "checkpoints" / "step_00000002")
    assert summary["resume_notes"][0] == (
        "step_00000003 skipped: rng/rank1.safetensors holds an invalid RNG state "
        "(Invalid mt19937 state)"
    )
    assert summary["steps"] == 3
    assert_same_weights(final_weights(root / "full"), final_weights(run), 0)
