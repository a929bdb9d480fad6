"""The one job every contender of benchmarks/peers.py trains: data, model, padding, evaluation.

    job = Job.from_argv()                  # --tokens, --dump-every, --lr, --out (set by peers.py)
    train, held_out = job_sequences()      # `shardwise train`'s default corpus and its split
    model = initial_model()                # `shardwise train`'s default LSTM, its seeded weights

What a user of a plain training loop would also write (a dataset over the sequences and a
collate that pads to the longest) lives here too, once for every peer, so that each contender's
script holds its framework's calls and nothing else: their line counts compare those calls.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from shardwise.config import TrainConfig
from shardwise.data.batch import collate
from shardwise.train.build import load_corpus, seeded_model

IGNORE = -100  # the target of a padded slot, which cross_entropy skips
# The corpus peers.py names for every contender (unset: the embedded one).
DATA_ENV = "SHARDWISE_PEERS_DATA"


def defaults() -> TrainConfig:
    """What `shardwise train` trains with no flags but the corpus."""
    return TrainConfig(data=os.environ.get(DATA_ENV) or None)


@dataclass(frozen=True)
class Job:
    """What the parent tells each contender: token budget, dump period, lr, batch, output folder."""

    tokens: int
    dump_every: int
    lr: float
    batch_size: int
    out: Path

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> Job:
        parser = argparse.ArgumentParser()
        parser.add_argument("--tokens", type=int, required=True)
        parser.add_argument("--dump-every", type=int, required=True)
        parser.add_argument("--lr", type=float, default=3e-3)
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args(argv)
        return cls(args.tokens, args.dump_every, args.lr, args.batch_size, args.out)

    def argv(self) -> list[str]:
        """The flags that make `from_argv` give this job back."""
        return [
            f"--tokens={self.tokens}",
            f"--dump-every={self.dump_every}",
            f"--lr={self.lr}",
            f"--batch-size={self.batch_size}",
            f"--out={self.out}",
        ]


def job_sequences() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The default corpus's training and held-out sequences, as `shardwise train` has them."""
    corpus = load_corpus(defaults())
    return corpus.train, corpus.eval


def initial_model() -> nn.Module:
    """The default model with the default seed's weights: the same in every contender."""
    return seeded_model(defaults(), load_corpus(defaults()).vocab_size)


def state_hash(model: nn.Module) -> str:
    """A digest of every tensor in the model's state, to show the contenders start alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Sequences(Dataset):
    """A list of token sequences as a map-style dataset, one sequence an item."""

    def __init__(self, sequences: list[np.ndarray]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sequences[index]


def pad_to_longest(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs seq[:-1] and targets seq[1:], padded to the batch's longest (targets with -100)."""
    width = max(len(seq) for seq in sequences) - 1
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        values = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        inputs[row, : len(seq) - 1] = values[:-1]
        targets[row, : len(seq) - 1] = values[1:]
    return inputs, targets


@torch.no_grad()
def held_out_loss(model: nn.Module, sequences: list[np.ndarray], batch_size: int = 32) -> float:
    """Token-mean cross-entropy of `model` over `sequences` (evaluation mode, no dropout).

    Sequences go in length order with their lengths, so the LSTM skips the padding; a
    unidirectional model's outputs at real positions do not depend on padding after them.
    """
    model.eval()
    ordered = sorted(sequences, key=len)
    loss_sum, tokens = 0.0, 0
    for begin in range(0, len(ordered), batch_size):
        batch = collate(ordered[begin : begin + batch_size], step_tokens=1)
        logits = model(batch.tokens, batch.lengths)
        loss_sum += float(
            F.cross_entropy(
                logits.flatten(0, 1).float(),
                batch.targets.flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        tokens += batch.n_tokens
    return loss_sum / tokens
