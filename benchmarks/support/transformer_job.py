"""What the pipeline benchmarks share: a seeded TransformerLM, its flags, one fixed batch, and
joining the gloo group of spawned ranks.

parser = model_flags(argparse.ArgumentParser(), dim=256, layers=4, heads=4, batch=16)
model, batch = build_transformer(args), fixed_batch(args)
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwise.data.batch import Batch
from shardwise.models import TransformerLM


def model_flags(
    parser: argparse.ArgumentParser, dim: int, layers: int, heads: int, batch: int, length: int
) -> argparse.ArgumentParser:
    """Add --dim --layers --heads (the model) and --batch --length (the batch) to `parser`."""
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--batch", type=int, default=batch, help="sequences per step")
    parser.add_argument("--length", type=int, default=length, help="tokens per sequence")
    return parser


def build_transformer(args: argparse.Namespace) -> TransformerLM:
    """The same weights on every rank and in every run (seed 0)."""
    torch.manual_seed(0)
    return TransformerLM(
        dim=args.dim, num_layers=args.layers, num_heads=args.heads, max_len=args.length
    )


def fixed_batch(args: argparse.Namespace) -> Batch:
    """--batch random sequences of --length tokens, no padding (seed 1)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (args.batch, args.length), generator=generator)
    targets = torch.randint(0, 256, (args.batch, args.length), generator=generator)
    lengths = torch.full((args.batch,), args.length)
    return Batch(tokens, targets, lengths, step_tokens=args.batch * args.length)


def join_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Join the CPU process group of `world` spawned ranks rendezvousing on localhost:`port`."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
