"""Sample bytes from a byte-level language model, one token at a time.

text = b"Once upon" + generate(model, b"Once upon", max_new_tokens=200)
print(text.decode("utf-8", errors="replace"))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shardwise.errors import ShardwiseError

BYTE_VOCAB = 256


def generate(
    model: nn.Module,
    prompt: bytes,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    context: int = 256,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> bytes:
    """Continue `prompt` by `max_new_tokens` sampled bytes and return only the new bytes.

        rng = torch.Generator().manual_seed(0)
        more = generate(model, b"The ", max_new_tokens=50, generator=rng)

    `model` is a plain module (not a DDP wrapper) with `forward(tokens [B, T]) -> logits
    [B, T, V]`, or any model with `call(model, tokens)` giving those (a model contract),
    `V >= 256`; logits past the first 256 are never sampled, so special tokens
    are never emitted. Each step re-runs the model on the last `context` tokens (clamped to
    `model.max_len` when it has one). `temperature=0` picks the most likely byte; `top_k=None`
    samples from all 256. The model runs in eval mode under `torch.no_grad()`, and every
    submodule's training flag is restored afterwards. Sampling happens on the generator's
    device (the CPU without one), so a seeded CPU generator gives the same bytes on any
    device the model runs on, up to the model's own numerics.
    """
    _check_arguments(prompt, max_new_tokens, temperature, top_k, context)
    context = min(context, getattr(model, "max_len", context))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tokens = list(prompt)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                window = torch.tensor([tokens[-context:]], dtype=torch.long, device=device)
                logits = (model(window) if call is None else call(model, window))[0, -1]
                tokens.append(_sample(logits, temperature, top_k, generator))
    finally:
        for module, training in modes:
            module.training = training
    return bytes(tokens[len(prompt) :])


def _check_arguments(
    prompt: bytes, max_new_tokens: int, temperature: float, top_k: int | None, context: int
) -> None:
    if not prompt:
        raise ShardwiseError("prompt is empty; pass at least one byte for the model to continue")
    if max_new_tokens < 0:
        raise ShardwiseError(f"max_new_tokens={max_new_tokens}; pass 0 or more")
    if temperature < 0:
        raise ShardwiseError(f"temperature={temperature}; pass 0 (greedy) or a positive value")
    if top_k is not None and top_k < 1:
        raise ShardwiseError(f"top_k={top_k}; pass a positive count, or None for no cut-off")
    if context < 1:
        raise ShardwiseError(f"context={context}; pass at least 1 token of context")


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    if logits.shape[-1] < BYTE_VOCAB:
        raise ShardwiseError(
            f"the model gives {logits.shape[-1]} logits per position; generating bytes needs "
            f"at least {BYTE_VOCAB}, so build it with vocab_size >= {BYTE_VOCAB}"
        )
    device = generator.device if generator is not None else torch.device("cpu")
    logits = logits[:BYTE_VOCAB].to(device, torch.float32)
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < BYTE_VOCAB:
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
