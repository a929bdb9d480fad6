"""What tensor parallelism splits in one model: each module's style, in words, and what stays whole.

plan = find_layer_split(model, tp=2)               # tensor_parallel.py builds it
parallelize_module(stage, mesh, plan.within(stage))
print(plan.describe())                       # what --dry-run shows
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle


@dataclass(frozen=True)
class LayerSplit:
    """Which modules of a model tensor parallelism splits, how, and which it leaves whole, why.

    plan = find_layer_split(model, tp=2)
    plan.styles, print(plan.describe())   # {"widen": ColwiseParallel(), ...}
    """

    tp: int
    styles: dict[str, ParallelStyle]
    labels: dict[str, str]  # module name -> how it is split, in words
    whole: dict[str, str] = field(default_factory=dict)  # module name -> why it is not split
    token_bound: int = 2  # token ids below this are valid probe input
    pairs: dict[str, str] = field(default_factory=dict)  # column-wise Linear -> row-wise reader

    def within(self, part: nn.Module) -> dict[str, ParallelStyle]:
        """The styles of the modules `part` (the model or one pipeline stage) holds; a pair
        whose halves fell on two stages stays whole (a sharded activation cannot cross)."""
        held = {name for name, _ in part.named_modules()}
        for a, b in self.pairs.items():
            if not {a, b} <= held:
                held -= {a, b}
        return {name: style for name, style in self.styles.items() if name in held}

    def describe(self) -> str:
        """One line per split module, then the candidates left whole (what --dry-run prints)."""
        lines = [f"tensor parallel over {self.tp} ranks splits:"]
        lines += [f"  {name}: {label}" for name, label in self.labels.items()]
        lines += [f"  {name}: left whole ({why})" for name, why in self.whole.items()]
        return "\n".join(lines)
