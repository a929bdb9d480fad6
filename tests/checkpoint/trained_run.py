"""One small trained run to tamper with, and resumes of it in this process.

    base = train_base(tmp_path_factory.mktemp("base"))    # steps 1-3, a checkpoint after each
    run = copy_run(base, tmp_path)                         # a private copy to tamper with
    summary = resume(base, run)                            # --resume RUN_DIR to step 3

In-process runs (one rank) let a test hook the loader between two of its steps.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import final_weights, quick_config, train, write_corpus

STEPS = 3


@dataclass(frozen=True)
class Base:
    corpus: Path
    run_dir: Path
    weights: dict[str, torch.Tensor]  # model.safetensors of the uninterrupted run


def train_base(root: Path) -> Base:
    corpus = write_corpus(root / "corpus.txt")
    run_dir = root / "run"
    train(quick_config(corpus, run_dir, max_steps=STEPS, checkpoint_every=1), nproc=1)
    return Base(corpus, run_dir, final_weights(run_dir))


def copy_run(base: Base, root: Path) -> Path:
    return Path(shutil.copytree(base.run_dir, root / "run"))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def resume(base: Base, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Resume `run_dir` (or the checkpoint `resume_from`) to step 3; rank 0's summary."""
    config = quick_config(
        base.corpus,
        run_dir,
        max_steps=STEPS,
        checkpoint_every=1,
        resume=resume_from or run_dir,
    )
    return train(config, nproc=1)


def assert_ends_exactly(base: Base, run_dir: Path) -> None:
    """The resumed run's final weights are the uninterrupted run's, bit for bit."""
    resumed = final_weights(run_dir)
    for name, tensor in base.weights.items():
        assert resumed[name].equal(tensor), name
