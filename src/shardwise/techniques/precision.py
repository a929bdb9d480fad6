"""Mixed precision: bf16 autocast, or fp16 with loss scaling (precision.py does the work).

>>> PRECISION.settings[0].default
'fp32'
"""

from __future__ import annotations

from typing import Any, Literal

from shardwise.techniques.base import Setting, Technique

SETTINGS = (
    Setting(
        "precision",
        Literal["fp32", "bf16", "fp16"],
        "fp32",
        "bf16 autocast (CPU or GPU) or fp16 with loss scaling (GPU).",
    ),
)


def check(config: Any) -> None:
    # Checked here rather than in the workers, so a bad combination fails in the launcher
    # within a second instead of after every worker has started and profiled the model.
    if config.precision == "fp16" and config.pp * config.tp > 1:
        raise ValueError(
            "--precision fp16 is not supported with --pp or --tp above 1 yet (the stages "
            "would have to agree on loss-scale overflows); use --precision bf16"
        )


def entry(config: Any, layout: Any) -> str:
    return config.precision


PRECISION = Technique(
    name="precision", title="Precision", settings=SETTINGS, check=check, entry=entry
)
