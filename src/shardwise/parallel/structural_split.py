"""Split layers for tensor parallelism in a model we did not write, by what they do, not names.

    plan = structural_split(model, tp=2)              # probes model(tokens) on one process
    plan.styles   # {"lookup": RowwiseParallel, "widen": ColwiseParallel, "narrow": ..., ...}

Three kinds of layer split exactly, whatever they are called:
- the output head: an `nn.Linear` whose `out_features` is the model's logits size, column-wise
  with its output gathered (a Linear split that way computes exactly what it did whole);
- the token embedding: an `nn.Embedding` with that many entries, row-wise, outputs summed;
- a Megatron pair: a Linear `a` column-wise feeding a Linear `b` row-wise. That is exact only
  when `b`'s input is `a`'s output through elementwise operations alone, and nothing else reads
  `a`'s output. Names cannot tell (an attention `qkv` looks like an MLP's first layer), so the
  probe proves it on seeded random tokens, in eval mode, on one process:
  1. noise added to one shard of `a`'s output features changes `b`'s input in that shard only;
  2. with `a`'s output perturbed but `b`'s input held at its unperturbed value, the model's
     output does not move: `a` reaches the output through `b` alone;
  3. other tokens with `a`'s output held at its first value give `b` the same input: `b` reads
     nothing but `a` (no residual, no gate, no second projection as in attention).
Layers whose weights are tied to another module's, or that a forward calls more than once
(pairs), stay whole. The workers check the split model against the whole one all the same
(tensor_parallel.check_split_outputs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from shardwise.errors import ShardwiseError, first_line
from shardwise.models.contract import probing
from shardwise.parallel.faithful import Forward, own_forward, probe_tokens, token_bound
from shardwise.parallel.layer_split import LayerSplit

Hook = Callable[..., Any]


def structural_split(
    model: nn.Module,
    tp: int,
    parts: tuple[str, ...] | list[str] = ("head", "embed", "mlp", "attn"),
    forward: Forward | None = None,
    vocab_size: int | None = None,
) -> LayerSplit:
    """The plan for `model` over `tp` ranks, proven on probe batches through `forward`.

    plan = structural_split(OddNames(256), 2)
    plan.labels["widen"], plan.pairs   # "column-wise, feeding narrow", {"widen": "narrow"}
    """
    bound = vocab_size or token_bound(model)
    probe = _Probe(model, forward or own_forward(model), bound)
    with probing(model):
        calls, logits = probe.calls()
        shared = _shared_modules(model)
        styles: dict[str, ParallelStyle] = {}
        labels: dict[str, str] = {}
        whole: dict[str, str] = {}
        pairs = _pairs(probe, calls, shared, tp, whole) if {"mlp", "attn"} & set(parts) else []
        for a, b in pairs:
            styles[a], styles[b] = ColwiseParallel(), RowwiseParallel()
            labels[a], labels[b] = f"column-wise, feeding {b}", f"row-wise, fed by {a}"
    linears = [n for n in calls if isinstance(model.get_submodule(n), nn.Linear)]
    heads = [n for n in linears if model.get_submodule(n).out_features == logits]
    heads = [n for n in heads if n not in styles]  # the last Linear making logits, not paired
    if "head" in parts and heads and _usable(heads[-1], shared, whole, tp, logits):
        styles[heads[-1]] = ColwiseParallel(output_layouts=Replicate())
        labels[heads[-1]] = f"column-wise over the {logits} logits, gathered"
    for name in calls:
        module = model.get_submodule(name)
        if "embed" not in parts or not isinstance(module, nn.Embedding):
            continue
        fits = module.num_embeddings == logits and module.max_norm is None
        if fits and _usable(name, shared, whole, tp, logits):
            styles[name] = RowwiseParallel(input_layouts=Replicate())
            labels[name] = f"row-wise over the {logits} token entries, summed"
    return LayerSplit(tp, styles, labels, whole, bound, dict(pairs))


def _usable(name: str, shared: set[str], whole: dict[str, str], tp: int, size: int) -> bool:
    """Whether a head or embedding of `size` entries may split; why not goes into `whole`."""
    if name in shared:
        whole[name] = "its weight is tied to another module's"
        return False
    if size % tp:
        whole[name] = f"{size} entries do not split over {tp} ranks"
        return False
    return True


def _pairs(
    probe: _Probe, calls: dict[str, int], shared: set[str], tp: int, whole: dict[str, str]
) -> list[tuple[str, str]]:
    """Linear pairs (a, b) proven to be joined by elementwise operations alone, in call order."""
    model = probe.model
    once = [
        n
        for n, count in calls.items()
        if count == 1 and isinstance(model.get_submodule(n), nn.Linear) and n not in shared
    ]
    taken: set[str] = set()
    pairs = []
    for index, a in enumerate(once):
        width = model.get_submodule(a).out_features
        later = [
            b
            for b in once[index + 1 :]
            if b not in taken and model.get_submodule(b).in_features == width
        ]
        if a in taken or not later:
            continue
        reader = probe.first_reader(a, later)
        if reader is None:
            continue
        if width % tp:
            whole[a] = f"its {width} output features do not split over {tp} ranks"
        elif probe.joined_elementwise(a, reader, tp):
            pairs.append((a, reader))
            taken |= {a, reader}
    return pairs


class _Probe:
    """The model's forward on seeded tokens, with hooks reading or replacing layers' tensors."""

    def __init__(self, model: nn.Module, forward: Forward, bound: int) -> None:
        self.model, self.forward = model, forward
        device = next(model.parameters(), torch.empty(0)).device
        self.tokens = probe_tokens(bound, device)
        self.other = probe_tokens(bound, device, seed=self.tokens.shape[1] + 1)
        self.noise = torch.Generator().manual_seed(0)

    def run(
        self,
        tokens: torch.Tensor,
        outputs: dict[str, Hook] | None = None,
        inputs: dict[str, Hook] | None = None,
    ) -> torch.Tensor:
        module = self.model.get_submodule
        handles = [module(n).register_forward_hook(h) for n, h in (outputs or {}).items()]
        handles += [module(n).register_forward_pre_hook(h) for n, h in (inputs or {}).items()]
        try:
            out = self.forward(tokens)
        except ShardwiseError:
            raise
        except Exception as error:
            raise ShardwiseError(
                f"--tp: {type(self.model).__name__}'s forward fails on a probe batch of "
                f"{tuple(tokens.shape)} tokens ({first_line(error, with_type=True)}); fix it, "
                "or train without --tp"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
        return out[0] if isinstance(out, tuple) else out

    def calls(self) -> tuple[dict[str, int], int]:
        """How often each Linear and Embedding is called, in first-call order; the logits size."""
        counts: Counter[str] = Counter()
        hooks = {
            name: _counting(counts, name)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear | nn.Embedding)
        }
        logits = self.run(self.tokens, outputs=hooks)
        return dict(counts), int(logits.shape[-1])

    def first_reader(self, a: str, candidates: list[str]) -> str | None:
        """The first of `candidates` whose input moves when `a`'s output does."""
        before, after = self._inputs(candidates), self._inputs(candidates, {a: self._noisy(None)})
        moved = (b for b in candidates if b in before and not _same(before[b], after.get(b)))
        return next(moved, None)

    def joined_elementwise(self, a: str, b: str, tp: int) -> bool:
        """Checks 1-3 of the module docstring for the pair (a, b) over `tp` shards."""
        kept: dict[str, torch.Tensor] = {}
        base = self.run(
            self.tokens, outputs={a: _keep(kept, "a", output=True)}, inputs={b: _keep(kept, "b")}
        )
        width = kept["a"].shape[-1] // tp
        for shard in range(tp):
            lo, hi = shard * width, (shard + 1) * width
            perturbed = self._inputs([b], {a: self._noisy((lo, hi))}).get(b)
            if perturbed is None or perturbed.shape != kept["b"].shape:
                return False
            moved = perturbed != kept["b"]
            inside = moved[..., lo:hi].any()
            moved[..., lo:hi] = False
            if moved.any() or not inside:
                return False
        held_b = self.run(
            self.tokens, outputs={a: self._noisy(None)}, inputs={b: _replace(kept["b"])}
        )
        if not _same(held_b, base):
            return False
        held_a = self._inputs([b], {a: _replace(kept["a"], output=True)}, self.other).get(b)
        return _same(held_a, kept["b"])

    def _inputs(
        self,
        names: list[str],
        outputs: dict[str, Hook] | None = None,
        tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        kept: dict[str, torch.Tensor] = {}
        self.run(
            self.tokens if tokens is None else tokens,
            outputs=outputs,
            inputs={n: _keep(kept, n) for n in names},
        )
        return kept

    def _noisy(self, columns: tuple[int, int] | None) -> Hook:
        """An output hook adding seeded noise (as large as the output) to some feature columns."""

        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            lo, hi = columns or (0, out.shape[-1])
            scale = float(out.abs().mean()) + 1.0
            noise = torch.randn(out[..., lo:hi].shape, generator=self.noise) * scale
            out = out.clone()
            out[..., lo:hi] += noise.to(out.device, out.dtype)
            return out

        return hook


def _counting(counts: Counter[str], name: str) -> Hook:
    return lambda *_: counts.update([name])


def _keep(kept: dict[str, torch.Tensor], key: str, output: bool = False) -> Hook:
    def hook(_module: nn.Module, args: Any, out: Any = None) -> None:
        kept[key] = (out if output else args[0]).detach().clone()

    return hook


def _replace(value: torch.Tensor, output: bool = False) -> Hook:
    if output:
        return lambda _module, _args, _out: value.clone()
    return lambda _module, args: (value.clone(), *args[1:])


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    # The same operations on the same numbers: anything beyond rounding is a real dependence.
    if b is None or a.shape != b.shape:
        return False
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def _shared_modules(model: nn.Module) -> set[str]:
    """Modules reachable under two names, or holding a parameter another module holds too."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    shared = {n for aliases in names.values() if len(aliases) > 1 for n in aliases}
    for module_ids in owners.values():
        if len(module_ids) > 1:
            shared |= {n for i in module_ids for n in names[i]}
    return shared
