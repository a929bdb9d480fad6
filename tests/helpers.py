"""Test helpers: a small varied-length corpus, quick configs, and running them on N workers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

import shardwise
from shardwise.checkpoint.manifest import digest_files, listed_files, write_manifest
from shardwise.config import TrainConfig

WORDS = [
    "the",
    "model",
    "splits",
    "data",
    "across",
    "ranks",
    "while",
    "every",
    "gradient",
    "is",
    "averaged",
    "once",
    "per",
    "step",
]


def write_corpus(path: Path, paragraphs: int = 240, seed: int = 0) -> Path:
    """Paragraphs of 2 to 40 words, separated by blank lines (lengths vary ~20x)."""
    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(paragraphs)
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def quick_config(corpus: Path, run_dir: Path, **overrides: object) -> TrainConfig:
    """A few fast steps of a small GRU; dropout-free and seeded, so runs are comparable.

    Batches of 4 sequences (--batching fixed) or of 256 tokens (batching="tokens"): each mode
    gets only its own size, since a setting the run does not read is refused.
    """
    values: dict[str, object] = {
        "data": corpus,
        "model": "gru",
        "max_len": 64,
        "max_steps": 3,
        # The rate the tolerances of the tests comparing runs were set at: Adam's step turns
        # float rounding into weight differences in proportion to it.
        "lr": 3e-3,
        "warmup_steps": 1,
        "log_every": 1,
        "run_dir": run_dir,
        "tensorboard": False,
        "sample_bytes": 0,
        "timeout_s": 60,
        "clip_norm": 0.0,
        "batching": "fixed",
    }
    values.update(overrides)
    if values["batching"] == "fixed":
        values.setdefault("batch_size", 4)
    else:
        values.setdefault("tokens_per_batch", 256)
    if {"max_tokens", "epochs"} & overrides.keys() and "max_steps" not in overrides:
        values.pop("max_steps")
    return TrainConfig(**values)


def train(config: TrainConfig, nproc: int) -> dict:
    """Rank 0's summary of a finished run, through the public entry point `shardwise.run`."""
    result = shardwise.run(config.model_copy(update={"nproc": nproc}))
    assert result is not None, "rank 0 ran on another node"
    return result.to_summary()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def assert_adam_equivalent_weights(a: dict, b: dict, lr: float) -> None:
    """Same weights up to AdamW's amplification of rounding where gradients nearly vanish.

    Adam divides by the gradient's own magnitude, so a gradient of 1e-9 that a different
    reduction order rounds differently can move its weight by up to ~lr. A layout that computes
    a wrong gradient moves most elements; float rounding moves a handful.
    """
    assert a.keys() == b.keys()
    moved, total = 0, 0
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert diff.max() <= lr, name
        moved += int((diff > 1e-5).sum())
        total += diff.numel()
    assert moved <= 0.01 * total, f"{moved} of {total} weights differ by more than 1e-5"


def small_model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Two linear layers after one AdamW step, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def reseal(checkpoint: Path) -> None:
    """Rewrite a tampered checkpoint's manifest, as an attacker would: only content checks stand."""
    write_manifest(checkpoint, digest_files(checkpoint, listed_files(checkpoint)))
