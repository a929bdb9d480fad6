"""Split large layers across tensor-parallel ranks with `torch.distributed.tensor.parallel`.

    parallelize_lm(model, layout.submesh("tp"))                # head, embedding, MLP, attention
    parallelize_lm(stage, layout.submesh("tp"), parts=("head",))   # only the vocabulary projection

A model may declare its split in a `tp_styles()` method, `{part: {layer name: style}}`, with the
parts `head`, `embed`, `mlp` and `attn` and the styles "column-wise", "row-wise" and
"column-wise, output gathered"; `("column-wise", heads)` is a layer whose outputs are that many
attention heads laid out head by head, which must divide over the ranks. The built-ins declare
Megatron's scheme (over a 1-D mesh):
- `head` (the vocabulary projection, the Linear in `head`): column-wise, logits gathered, so the
  loss sees whole rows of logits.
- `embed` (the token Embedding): row-wise over the vocabulary, outputs summed.
- `mlp`: `fc1` column-wise then `fc2` row-wise: the hidden activation stays sharded in between.
- `attn`: `qkv` column-wise then `proj` row-wise. The Transformer lays `qkv` out head by head,
  so each rank's columns are whole heads and attention runs on them unchanged.
Every split layer takes and returns plain replicated tensors, so a split module composes with
pipeline stages and with data-parallel replicas like any other module. Models that declare no
split are planned by what their layers do (structural_split.py), and every split is checked
against the whole model on a probe batch where it is applied (`checked_split`). Works on gloo
(CPU) and NCCL alike in torch 2.13.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from shardwise.errors import ShardwiseError, first_line
from shardwise.models.contract import probing
from shardwise.parallel.faithful import Forward, token_bound
from shardwise.parallel.layer_split import LayerSplit
from shardwise.parallel.mesh import Layout
from shardwise.parallel.structural_split import structural_split

PARTS = ("head", "embed", "mlp", "attn")
STYLES = ("column-wise", "row-wise", "column-wise, output gathered")


def find_layer_split(
    model: nn.Module,
    tp: int,
    parts: Sequence[str] = PARTS,
    forward: Forward | None = None,
    vocab_size: int | None = None,
) -> LayerSplit:
    """The split of a whole model: as its `tp_styles()` declares (built-ins do), else by structure.

        plan = find_layer_split(build_model("gru"), 2)          # embed and head.1, as declared
        plan = find_layer_split(OddNames(256), 2, forward=call)  # probed (see structural_split.py)

    `forward` is the model's own call, tokens [batch, time] -> logits (default `model(tokens)`).
    """
    if not callable(getattr(model, "tp_styles", None)):
        return structural_split(model, tp, tuple(parts), forward, vocab_size)
    styles = tensor_parallel_styles(model, tp, parts)
    labels = {name: _label(style) for name, style in styles.items()}
    declared = _declared_layers(model)
    tables = [model.get_submodule(name) for name, (part, *_) in declared.items() if part == "embed"]
    sizes = [table.num_embeddings for table in tables if isinstance(table, nn.Embedding)]
    bound = min(sizes, default=vocab_size or token_bound(model))  # ids the token table takes
    return LayerSplit(tp, styles, labels, token_bound=bound)


def warm_up(layout: Layout) -> None:
    """A column-wise then row-wise pair of toy layers split over the tensor-parallel ranks,
    one forward and backward, then dropped: DTensor's first operations build what stays with
    the process (dispatch tables and sharding caches, tens of MiB on CPU), which after this is
    part of the baseline a rank's peak is measured from. A collective over "tp"; the RNG is
    left as it was."""
    if layout.tp == 1 or layout.device_mesh is None:
        return
    device = layout.device
    with torch.random.fork_rng(devices=[]):
        toy = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)).to(device)
    styles = {"0": ColwiseParallel(), "1": RowwiseParallel()}
    parallelize_module(toy, layout.submesh("tp"), styles)
    toy(torch.ones(2, 8, device=device)).sum().backward()


def require_split(plan: LayerSplit, model: nn.Module) -> None:
    """Refuse a --tp run that would split nothing: every rank would repeat the same work."""
    if plan.styles:
        return
    why = "; ".join(f"{name}: {reason}" for name, reason in plan.whole.items())
    raise ShardwiseError(
        f"--tp {plan.tp}: {type(model).__name__} has no layer tensor parallelism can split "
        "(no Linear making its logits, no Embedding of its tokens, no two Linears joined by "
        f"elementwise operations alone{'; ' + why if why else ''}); train without --tp"
    )


def checked_split(
    part: nn.Module,
    tp_mesh: DeviceMesh,
    styles: dict[str, ParallelStyle],
    probe: Callable[[], torch.Tensor],
) -> None:
    """Split `part` by `styles`, refused unless `probe()` gives what it gave before the split.

        checked_split(model, layout.submesh("tp"), plan.within(model), lambda: model(tokens))

    Every tensor-parallel rank holds the same part with the same weights and probe, so each
    compares its split part with the whole one, and all of them agree on the verdict.
    """
    with probing(part):
        before = probe()
    parallelize_module(part, tp_mesh, styles)
    try:
        with probing(part):
            after = probe()
    except Exception as error:  # a wrong split often breaks shapes rather than values
        raise ShardwiseError(
            f"--tp {tp_mesh.size()}: splitting {', '.join(styles)} breaks the model's forward "
            f"({first_line(error, with_type=True)}); train this model without --tp"
        ) from error
    check_split_outputs(before, after, styles, tp_mesh.size())


def check_split_outputs(
    before: torch.Tensor, after: torch.Tensor, styles: dict[str, ParallelStyle], tp: int
) -> None:
    """Refuse a split whose probe output differs from the whole model's (a pairing we got wrong).

    before = probe(); parallelize_module(part, mesh, styles)
    check_split_outputs(before, probe(), styles, tp=2)
    """
    difference = float((after.float() - before.float()).abs().max()) if before.numel() else 0.0
    if before.shape != after.shape or difference > 1e-4 * (1.0 + float(before.abs().max())):
        raise ShardwiseError(
            f"--tp {tp}: splitting {', '.join(styles)} changes the model's outputs on a probe "
            f"batch (max difference {difference:.3g}); train this model without --tp"
        )


def _label(style: ParallelStyle) -> str:
    if isinstance(style, ColwiseParallel):
        layouts = style.output_layouts
        gathered = any(isinstance(layout, Replicate) for layout in (*layouts,))
        return "column-wise, output gathered" if gathered else "column-wise"
    return "row-wise"


def parallelize_lm(
    module: nn.Module, tp_mesh: DeviceMesh, parts: Sequence[str] = PARTS
) -> nn.Module:
    """Shard the chosen `parts` of `module` (a model or a pipeline stage) over `tp_mesh`.

        model = parallelize_lm(model, layout.submesh("tp"))
        logits = model(tokens)   # the same logits, each rank holding 1/T of the split weights

    Every rank must hold the same weights beforehand (build the model with the same seed).
    A layer whose split dimension does not divide by the mesh size raises `ShardwiseError`.
    """
    plan = tensor_parallel_styles(module, tp_mesh.size(), parts)
    if plan:
        parallelize_module(module, tp_mesh, plan)
    return module


def tensor_parallel_styles(
    module: nn.Module, tp: int, parts: Sequence[str] = PARTS
) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan of `module.tp_styles()`: {module name: ColwiseParallel, ...}.

    tensor_parallel_styles(TransformerLM(num_layers=1), 2)
    # {"embed": RowwiseParallel, "blocks.0.attn.qkv": ColwiseParallel, ..., "head.1": ...}

    `module` is a model or a pipeline stage (which declares its share of the model's plan); one
    that declares no plan splits nothing. Layers come in the module's order.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ShardwiseError(f"tensor-parallel parts {unknown} unknown; choose from {PARTS}")
    declared = _declared_layers(module)
    plan: dict[str, ParallelStyle] = {}
    for name, child in module.named_modules():
        if name not in declared or declared[name][0] not in parts:
            continue
        _, word, heads = declared[name]
        if heads is not None:  # column shards of a head-by-head layout must hold whole heads
            _require_divisible(name, heads, "heads", tp)
        style = _style(module, name, child, word)
        _check_divisible(name, child, style, tp)
        plan[name] = style
    return plan


def _declared_layers(module: nn.Module) -> dict[str, tuple[str, str, int | None]]:
    """`module.tp_styles()`, checked, as {layer name: (part, style, heads or None)}."""
    tp_styles = getattr(module, "tp_styles", None)
    if not callable(tp_styles):
        return {}
    who = f"{type(module).__name__}.tp_styles()"
    declared_parts = tp_styles()
    if not isinstance(declared_parts, Mapping) or not all(
        isinstance(styles, Mapping) for styles in declared_parts.values()
    ):
        raise ShardwiseError(f"{who} returns {declared_parts!r}; return {{part: {{layer: style}}}}")
    layers: dict[str, tuple[str, str, int | None]] = {}
    for part, styles in declared_parts.items():
        if part not in PARTS:
            raise ShardwiseError(f"{who} names the part {part!r}; use {', '.join(PARTS)}")
        for name, declared in styles.items():
            word, heads = _style_and_heads(declared)
            if word not in STYLES or not (heads is None or (isinstance(heads, int) and heads > 0)):
                raise ShardwiseError(
                    f"{who} gives {name!r} the style {declared!r}; use one of {STYLES}, or "
                    "('column-wise', heads) for a layer whose outputs are whole heads"
                )
            try:
                module.get_submodule(name)
            except AttributeError:
                raise ShardwiseError(f"{who} lists {name!r}, which is not a submodule") from None
            layers[name] = (part, word, heads)
    return layers


def _style_and_heads(declared: object) -> tuple[object, object]:
    if isinstance(declared, tuple) and len(declared) == 2:
        return declared
    return declared, None


def _style(module: nn.Module, name: str, child: nn.Module, word: str) -> ParallelStyle:
    if isinstance(child, nn.Embedding) and word == "row-wise":
        return RowwiseParallel(input_layouts=Replicate())  # every rank reads all the token ids
    if isinstance(child, nn.Linear):
        return {
            "column-wise": ColwiseParallel(),
            "row-wise": RowwiseParallel(),
            "column-wise, output gathered": ColwiseParallel(output_layouts=Replicate()),
        }[word]
    raise ShardwiseError(
        f"{type(module).__name__}.tp_styles() splits {name!r} ({type(child).__name__}) {word}; "
        "tensor parallelism splits an nn.Linear in any style and an nn.Embedding row-wise"
    )


def _check_divisible(name: str, child: nn.Module, style: ParallelStyle, tp: int) -> None:
    if isinstance(child, nn.Embedding):
        size, what = child.num_embeddings, "vocabulary entries"
    elif isinstance(style, ColwiseParallel):
        size, what = child.out_features, "output features"
    else:
        size, what = child.in_features, "input features"
    _require_divisible(name, size, what, tp)


def _require_divisible(name: str, size: int, what: str, tp: int) -> None:
    if size % tp:
        raise ShardwiseError(
            f"--tp {tp}: layer {name!r} has {size} {what}, which {tp} ranks cannot split "
            f"evenly; choose a --tp that divides {size}"
        )
