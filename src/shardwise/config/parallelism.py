"""The one reader of a config's parallel settings: a TrainConfig turned into a `Parallelism`.

    parallelism = parallelism_from(config, layout)
    model = parallelize(MyLM(), parallelism.with_cuts(cuts), env)

`shardwise train` (through the trainer's Session) and the own-loop `shardwise.setup()` both come
here, so the two cannot read the same settings two ways. Each registered technique builds its
own entry from the settings (techniques/).
"""

from __future__ import annotations

from shardwise.config.train_config import TrainConfig
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism
from shardwise.techniques import registered

# The techniques with a typed field of their own in Parallelism.
_FIELDS = ("pipeline", "tensor", "sync", "precision")


def parallelism_from(config: TrainConfig, layout: Layout) -> Parallelism:
    """How `config` parallelises a model over `layout` (cuts: the config's split points).

    Precision is named, not applied: the Session that runs it brings the autocast and the loss
    scaler for its device (session.py).
    """
    entries = {technique.name: technique.entry(config, layout) for technique in registered()}
    fields = {name: entries.pop(name) for name in _FIELDS}
    return Parallelism(
        layout,
        entries={name: entry for name, entry in entries.items() if entry is not None},
        **fields,
    )
