"""Remember a profiled cut, so that a dry run and the run after it train the same stages.

    key = cut_key(model, sample, stages=2, microbatches=4, schedule="1f1b")
    cuts = remembered_cuts(key)          # None the first time
    remember_cuts(key, plan.cuts)        # JSON in $SHARDWISE_CACHE/cuts/<key>.json

A profile times each piece, and times are noisy: profiled twice, a close call can land on
either side. The first profile of a model on a sample decides; later plans of the same model,
sample and settings reuse its cut and only re-predict. Entries are JSON lists of names, checked
against the model again when used (`stage_starts`), so a stale or edited entry cannot do more
than name a cut that is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from shardwise.data.cache import default_cache_dir

# Bump when profiling or partitioning changes enough that old cuts should be made again.
FORMAT_VERSION = 1


def cut_key(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    stages: int,
    microbatches: int,
    schedule: str,
    adjusted: str = "",
) -> str:
    """A hash of the model's structure and weights' shapes, the sample and the settings
    (`adjusted`: what changes the profiled costs, e.g. the recompute entry, when any)."""
    digest = hashlib.sha256()
    shapes = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    what = [FORMAT_VERSION, type(model).__qualname__, shapes, stages, microbatches, schedule]
    what += [adjusted] if adjusted else []  # keys made before `adjusted` stay as they were
    digest.update(json.dumps(what).encode())
    digest.update(sample.cpu().contiguous().numpy().tobytes())
    digest.update(str(tuple(sample.shape)).encode())
    return digest.hexdigest()[:32]


def remembered_cuts(key: str, cache_dir: Path | None = None) -> list[str] | None:
    """The cut stored under `key`, or None when there is none or it is not a list of names."""
    try:
        cuts = json.loads(_path(key, cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(cuts, list) and all(isinstance(cut, str) for cut in cuts):
        return cuts
    return None


def remember_cuts(key: str, cuts: list[str], cache_dir: Path | None = None) -> None:
    """Store `cuts` under `key` atomically; a cache that cannot be written is skipped."""
    path = _path(key, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(cuts, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only cache costs a second profile next time, nothing else


def _path(key: str, cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / "cuts" / f"{key}.json"
