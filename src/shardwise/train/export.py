"""The end of a run on rank 0: the whole trained model as `model.safetensors`, and a sample.

    whole = whole_model(trainer.model, result.checkpoint, config, vocab_size)
    summary = {**result.summary, **export_model(config, whole, run_dir, trainer.model.contract)}

Kept apart from the loop: rebuilding the whole model (from the final checkpoint when the model
was cut over ranks) and sampling text are the report's business, not training's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from shardwise.checkpoint import load_model_weights
from shardwise.config import TrainConfig
from shardwise.models import build_model, generate
from shardwise.models.contract import PLAIN, ModelContract
from shardwise.models.generate import BYTE_VOCAB
from shardwise.parallel.model import ParallelModel
from shardwise.run_dir import WEIGHTS_FILE
from shardwise.safe_write import replace_file
from shardwise.train.build import warnings_shown_once

SAMPLE_PROMPT = b"The "


def whole_model(
    model: ParallelModel, checkpoint: Path, config: TrainConfig, vocab_size: int
) -> nn.Module:
    """The trained model in one piece: this rank's, or rebuilt from `checkpoint` (model parallel).

    Call on one rank only: no rank holds a pipeline's or shards' whole model, but the final
    checkpoint does.
    """
    if model.holds_whole_model:
        return model.part
    with warnings_shown_once():
        whole = build_model(config.model, vocab_size)
    return load_model_weights(checkpoint, whole)


def export_model(
    config: TrainConfig, model: nn.Module, run_dir: Path, contract: ModelContract = PLAIN
) -> dict[str, Any]:
    """Write `run_dir/model.safetensors`; return the summary's `parameters` and `sample_text`."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # As bytes, replaced whole: save_file of safetensors 0.4 writes through a link there.
    replace_file(run_dir / WEIGHTS_FILE, save(weights))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "sample_text": sample_text(model, config.sample_bytes, config.seed, contract),
    }


def sample_text(
    model: nn.Module, sample_bytes: int, seed: int, contract: ModelContract = PLAIN
) -> str:
    """A few lines `model` writes after a fixed prompt, seeded; "" when `sample_bytes` is 0.

    text = sample_text(model, sample_bytes=200, seed=0)   # "The ..." (same seed, same text)

    Also "" for a model of fewer than 256 tokens: its ids are not bytes, so there is no text.
    """
    if not sample_bytes or (contract.vocab_size or BYTE_VOCAB) < BYTE_VOCAB:
        return ""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    text = generate(model, SAMPLE_PROMPT, sample_bytes, generator=generator, call=contract)
    return (SAMPLE_PROMPT + text).decode("utf-8", errors="replace")
