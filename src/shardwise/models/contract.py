"""How a model takes tokens and gives logits, found by probing it: users' models train as written.

    contract = model_contract(model, "mylm:build", vocab_size=256)   # one probe, in eval mode
    logits = contract(model, tokens)   # [batch, time, vocab] for tokens [batch, time]
    contract.describe()   # "model call: forward(tokens, None), time-major; log-probabilities ..."

Every layout calls a model through its contract, so a model written the way pytorch/examples
writes them (time-major, a `hidden` argument, a `(log_probs [T*B, V], hidden)` tuple) trains
without a wrapper. What a probe can tell:
- extra required positional arguments (a `hidden`) are given `None`, as most RNN code accepts;
- the logits are the one tensor of the output shaped like them (a tuple element, a dict value,
  `logits` first); several candidates need `--model-output`;
- batch-first or time-major: one sequence's logits must not change when another row of the
  batch changes. Only one reading of the input keeps the rows apart for a model that mixes along
  time; a model for which both or neither do is called batch-first or must be declared;
- log-probabilities train as logits do (cross-entropy re-normalises them exactly).
It also refuses a model whose logits at a position change with a later token: trained on the
next token, it would learn to copy it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardwise.errors import ShardwiseError, first_line

# Keyword arguments the loop can pass beside the tokens; a model gets those its forward names.
BATCH_KEYWORDS = frozenset({"lengths", "positions", "segment_ids"})
LAYOUTS = ("auto", "batch-first", "time-major")
# Probe shape: rows and length differ, so a swapped reading shows in the shapes and the rows.
_ROWS, _LENGTH = 3, 7


@dataclass(frozen=True)
class ModelContract:
    """How to call a model: `contract(model, tokens)` gives logits `[batch, time, vocab]`."""

    time_major: bool = False
    extra_args: int = 0  # positional Nones after the tokens (a `hidden`)
    output: int | str | None = None  # where the logits are in a tuple or dict; None: the output
    flat: bool = False  # logits come as [rows * time, vocab], in the input's order
    log_probs: bool = False
    keywords: frozenset[str] = field(default=BATCH_KEYWORDS)
    vocab_size: int | None = None  # the model's own logits size, when probed

    def __call__(self, module: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        given = {name: value for name, value in kwargs.items() if name in self.keywords}
        if kwargs.get("segment_ids") is not None and "segment_ids" not in given:
            raise ShardwiseError(
                "packed rows need a model that takes segment_ids; train without --packing"
            )
        x = tokens.t() if self.time_major else tokens
        logits = _pick(module(x, *([None] * self.extra_args), **given), self.output)
        if self.flat:
            logits = logits.reshape(*x.shape, -1)
        return logits.transpose(0, 1) if self.time_major else logits

    @property
    def is_plain(self) -> bool:
        """Whether the model is called as `model(tokens)` and returns the logits tensor."""
        return not (self.time_major or self.extra_args or self.flat) and self.output is None

    def describe(self) -> str:
        """One line for --dry-run: how the model is called and where its logits are."""
        layout = "time-major" if self.time_major else "batch-first"
        call = ", ".join(["tokens", *(["None"] * self.extra_args)])
        where = "the output" if self.output is None else _where(self.output)
        kind = "log-probabilities" if self.log_probs else "logits"
        # As the model gives them, before __call__ turns them batch-first.
        dims = "time, batch" if self.time_major else "batch, time"
        shape = f"[{dims.replace(',', ' x')}, vocab]" if self.flat else f"[{dims}, vocab]"
        vocab = f" of {self.vocab_size}" if self.vocab_size else ""
        return f"model call: forward({call}), {layout}; {kind}{vocab} as {shape} in {where}"


PLAIN = ModelContract()
_PROBED: dict[tuple, ModelContract] = {}  # contract_for's probes, by class, shapes, settings


def contract_for(
    model: nn.Module,
    name: str,
    *,
    vocab_size: int | None = None,
    input_layout: str = "auto",
    output: str | None = None,
    max_len: int | None = None,
) -> ModelContract:
    """How to call `model`, probed (see `model_contract`), and checked on `max_len` tokens.

    contract = contract_for(model, config.model, vocab_size=256)

    Without `vocab_size` the probe's ids stay below 16 and below every embedding table's size.
    """
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    bound = vocab_size or min([16, *tables])
    # The launcher, the builder and the session each ask of the same seeded model: probed once
    # a process for a class and its parameters' shapes (a probe is several calls of the model).
    shapes = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items())
    key = (type(model), shapes, name, bound, input_layout, output)
    contract = _PROBED.get(key)
    if contract is None:
        contract = model_contract(
            model, name, vocab_size=bound, input_layout=input_layout, output=output
        )
        _PROBED[key] = contract
    if max_len is not None:
        check_length(model, name, contract, max_len)
    return contract


def check_length(model: nn.Module, name: str, contract: ModelContract, max_len: int) -> None:
    """Refuse in one line a model that cannot take a sequence of `max_len` tokens.

    check_length(model, "mylm:build", contract, max_len=256)   # a position table of 128 fails
    """
    tokens = torch.zeros(1, max_len, dtype=torch.long)
    try:
        with probing(model):
            contract(model, tokens.to(next(model.parameters(), tokens).device))
    except Exception as error:
        cause = first_line(error, with_type=True, whole=True)
        raise ShardwiseError(
            f"model {name!r} fails on a sequence of --max-len {max_len} tokens ({cause}); "
            "lower --max-len or let the model take longer sequences"
        ) from error


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no running statistics updated) and no gradients; every
    submodule's own mode restored afterwards.

        with probing(model):
            logits = model(probe_tokens(256, device))
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def probe_tokens(
    vocab_size: int, device: torch.device, *, seed: int, length: int, rows: int = 3
) -> torch.Tensor:
    """A seeded random [rows, length] batch of ids below `vocab_size`; the global RNG untouched.

    tokens = probe_tokens(256, torch.device("cpu"), seed=0, length=7)   # alike on every rank
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (rows, length), generator=generator)
    return tokens.to(device)


def model_contract(
    model: nn.Module,
    name: str,
    *,
    vocab_size: int,
    input_layout: str = "auto",
    output: str | None = None,
) -> ModelContract:
    """Probe `model` (named `name` in messages) once and return how to call it.

        contract = model_contract(model, "mylm:build", vocab_size=256)

    Raises `ShardwiseError` with one line when the model cannot be called with tokens, its
    logits cannot be found, its layout is ambiguous and undeclared, or it sees the future.
    """
    extra_args, keywords = _signature(model, name)
    picked = _output_key(output)
    probe = probe_tokens(
        min(vocab_size, 16), torch.device("cpu"), seed=0, length=_LENGTH, rows=_ROWS
    )
    with probing(model):
        return _probe(model, name, probe, extra_args, keywords, picked, input_layout)


def _probe(
    model: nn.Module,
    name: str,
    probe: torch.Tensor,
    extra_args: int,
    keywords: frozenset[str],
    output: int | str | None,
    input_layout: str,
) -> ModelContract:
    raw = _call(model, name, probe, extra_args)
    where, logits = _find_logits(raw, name, output)
    flat = logits.dim() == 2
    contract = ModelContract(
        extra_args=extra_args,
        output=where,
        flat=flat,
        keywords=keywords,
        vocab_size=int(logits.shape[-1]),
        log_probs=_are_log_probs(logits),
    )
    time_major = _time_major(model, name, probe, contract, input_layout)
    contract = ModelContract(**{**contract.__dict__, "time_major": time_major})
    _check_causal(model, name, probe, contract)
    return contract


def _signature(model: nn.Module, name: str) -> tuple[int, frozenset[str]]:
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return 0, frozenset()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for parameter in parameters:
        if parameter.kind == parameter.KEYWORD_ONLY and parameter.default is parameter.empty:
            raise ShardwiseError(
                f"model {name!r}: forward needs the keyword argument {parameter.name!r}, which "
                "shardwise cannot give; give it a default"
            )
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise ShardwiseError(f"model {name!r}: forward takes no tokens; make it forward(tokens)")
    required = [p for p in positional[1:] if p.default is p.empty]
    keywords = frozenset(p.name for p in parameters if p.name in BATCH_KEYWORDS)
    return len(required), keywords


def _output_key(output: str | None) -> int | str | None:
    if output is None:
        return None
    return int(output) if output.lstrip("-").isdigit() else output


def _call(model: nn.Module, name: str, tokens: torch.Tensor, extra_args: int) -> Any:
    device = next(model.parameters(), torch.empty(0)).device
    args = ", ".join(["tokens", *(["None"] * extra_args)])
    try:
        return model(tokens.to(device), *([None] * extra_args))
    except Exception as error:
        cause = first_line(error, with_type=True, whole=True)
        raise ShardwiseError(
            f"model {name!r}: forward({args}) with tokens of shape {tuple(tokens.shape)} raised "
            f"{cause}; make forward take a LongTensor of token ids (extra arguments get None)"
        ) from error


def _find_logits(raw: Any, name: str, output: int | str | None) -> tuple[Any, torch.Tensor]:
    items = _items(raw)
    if output is not None:
        if output not in dict(items):
            raise ShardwiseError(
                f"--model-output {output!r}: model {name!r} returns {_shown(raw)}, which has no "
                f"{output!r}; name one of {[key for key, _ in items]}"
            )
        chosen = dict(items)[output]
        if not _looks_like_logits(chosen):
            raise ShardwiseError(
                f"--model-output {output!r}: model {name!r}'s {output!r} is {_shown(chosen)}, "
                f"not logits shaped [batch, time, vocab] for tokens {[_ROWS, _LENGTH]}"
            )
        return output, chosen
    found = [(key, value) for key, value in items if _looks_like_logits(value)]
    if isinstance(raw, Mapping) and any(key == "logits" for key, _ in found):
        found = [(key, value) for key, value in found if key == "logits"]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ShardwiseError(
            f"model {name!r} returns {_shown(raw)} for tokens {[_ROWS, _LENGTH]}: no tensor "
            "shaped like logits [batch, time, vocab] (or [batch x time, vocab]); return them"
        )
    raise ShardwiseError(
        f"model {name!r} returns several tensors that could be its logits "
        f"({', '.join(_where(key) for key, _ in found)}); say which with --model-output"
    )


def _items(raw: Any) -> list[tuple[Any, Any]]:
    if isinstance(raw, torch.Tensor):
        return [(None, raw)]
    if isinstance(raw, Mapping):
        return list(raw.items())
    if isinstance(raw, (tuple, list)):
        return list(enumerate(raw))
    return []


def _looks_like_logits(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    rows_time = {(_ROWS, _LENGTH), (_LENGTH, _ROWS)}
    if value.dim() == 3:
        return tuple(value.shape[:2]) in rows_time
    return value.dim() == 2 and value.shape[0] == _ROWS * _LENGTH


def _pick(raw: Any, output: int | str | None) -> torch.Tensor:
    return raw if output is None else raw[output]


def _are_log_probs(logits: torch.Tensor) -> bool:
    total = torch.logsumexp(logits.float(), dim=-1)
    return bool(torch.allclose(total, torch.zeros_like(total), atol=1e-4))


def _time_major(
    model: nn.Module, name: str, probe: torch.Tensor, contract: ModelContract, input_layout: str
) -> bool:
    if input_layout != "auto":
        return input_layout == "time-major"
    keeps_rows = {
        layout: _keeps_rows_apart(
            model, probe, ModelContract(**{**contract.__dict__, "time_major": layout})
        )
        for layout in (False, True)
    }
    if keeps_rows[False] or not keeps_rows[True]:
        if not (keeps_rows[False] or keeps_rows[True]):
            raise ShardwiseError(
                f"model {name!r}: one sequence's logits change with another row of the batch, "
                "read batch-first or time-major; declare --input-layout batch-first or time-major"
            )
        return False  # batch-first, or a model that never mixes along time: the same either way
    return True


def _keeps_rows_apart(model: nn.Module, probe: torch.Tensor, contract: ModelContract) -> bool:
    """Whether changing row 0's first token changes row 0's logits and no other row's."""
    changed = probe.clone()
    changed[0, 0] = (changed[0, 0] + 1) % max(int(probe.max()) + 1, 2)
    try:
        before, after = contract(model, probe), contract(model, changed)
    except Exception:  # a reading the model cannot take at all (a shape it refuses)
        return False
    if tuple(before.shape[:2]) != tuple(probe.shape):
        return False
    moved = _changed(before, after).amax(dim=(1, 2))
    return bool(moved[0] > 0 and not moved[1:].any())


def _check_causal(
    model: nn.Module, name: str, probe: torch.Tensor, contract: ModelContract
) -> None:
    changed = probe.clone()
    changed[0, -1] = (changed[0, -1] + 1) % max(int(probe.max()) + 1, 2)
    moved = _changed(contract(model, probe), contract(model, changed))[0, :-1]
    if moved.any():
        position = int(moved.amax(dim=-1).nonzero()[0])
        raise ShardwiseError(
            f"model {name!r}: its logits at position {position} change with the token at "
            f"position {probe.shape[1] - 1}: it sees the future, so next-token training would "
            "teach it to copy; make it causal (e.g. a causal attention mask)"
        )


def _changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    scale = before.float().abs().amax().clamp(min=1.0)
    return (after.float() - before.float()).abs() > 1e-5 * scale


def _where(key: Any) -> str:
    if key is None:
        return "the output"
    return f"element {key} of a tuple" if isinstance(key, int) else f"key {key!r} of a dict"


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
