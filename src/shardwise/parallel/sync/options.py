"""The settings a synchronisation strategy takes, apart from the config that carries them.

    options = SyncOptions(grad_compression="bf16", sync_every=8)
    strategy = sync_strategy("local-sgd", options)

The fields are the sync technique's settings (techniques/sync.py), less the strategy's name,
with the same types and defaults, plus the run's `timeout_s` for the groups a strategy creates:
a setting declared there is a field here, with nothing written twice. The sync declaration
builds one from a run's config; a user's own loop may build one directly. It lives here, not in
the config package, so that `parallel/` never imports the config (which imports `data/`).

>>> SyncOptions().sync_every, SyncOptions(outer_lr=0.5).outer_lr
(8, 0.5)
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

from shardwise.techniques.sync import SETTINGS

SyncOptions = make_dataclass(
    "SyncOptions",
    [
        *((s.name, s.type, field(default=s.default)) for s in SETTINGS if s.name != "sync"),
        ("timeout_s", float, field(default=300.0)),  # the run's, for the groups it creates
    ],
    frozen=True,
)
SyncOptions.__module__ = __name__
SyncOptions.__doc__ = "Every strategy's knobs (the sync technique's settings); each reads its own."
