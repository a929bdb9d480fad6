"""What runs once before a rank's memory baseline is taken: each technique's code on a toy, so that
what that code costs a process once (its imports, DTensor's and DDP's first steps) is the
baseline's and not counted as the run's state. After the warm-up, applying them loads nothing
new."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import write_corpus
from ranks import run_ranks
from shardwise.distributed import DistEnv

pytestmark = pytest.mark.timeout(120)


def _loaded_by(build) -> list[str]:
    before = set(sys.modules)
    build()
    return sorted(name for name in set(sys.modules) - before if name.startswith("torch"))


def warmed_then_applied(env: DistEnv) -> dict[str, list[str]]:
    from torch.nn.parallel import DistributedDataParallel

    from shardwise.parallel.mesh import Layout
    from shardwise.parallel.sync import sync_strategy
    from shardwise.techniques.pipeline import warm as warm_pipeline
    from shardwise.techniques.sync import warm as warm_sync

    layout = Layout(dp=2).build(env)
    found = {
        "sync warm": _loaded_by(lambda: warm_sync(sync_strategy("allreduce"), layout)),
        "pipeline warm": _loaded_by(lambda: warm_pipeline(None, layout)),
    }

    def apply() -> None:
        from torch.distributed import pipelining  # noqa: F401

        wrapped = DistributedDataParallel(nn.Linear(8, 8), gradient_as_bucket_view=True)
        wrapped(torch.ones(2, 8)).sum().backward()

    found["applied after"] = _loaded_by(apply)
    return found


@pytest.mark.distributed
def test_after_the_warm_up_applying_ddp_and_the_pipeline_loads_nothing_new() -> None:
    for found in run_ranks(warmed_then_applied, world=2, timeout_s=90):
        # The warm-ups did load what the techniques need (so this check could fail)...
        assert "torch.distributed.pipelining" in found["pipeline warm"]
        assert found["sync warm"], "DDP's first step loaded nothing: nothing to warm"
        # ...and once they have, the run's own DDP and pipeline load nothing more.
        assert found["applied after"] == []


_OPTIMIZER_WARMED = """
import subprocess
import sys
import torch
from shardwise.config import TrainConfig
from shardwise.optim import build_optimizer, warm_optimizer

def loaded_by(build):
    before = set(sys.modules)
    build()
    return sorted(set(sys.modules) - before)

def run_step():
    model = torch.nn.Linear(8, 8)
    optimizer = build_optimizer(model.parameters(), TrainConfig())
    model(torch.ones(2, 8)).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()

print(len(loaded_by(lambda: warm_optimizer(TrainConfig(), torch.device("cpu")))))
print(loaded_by(run_step))
"""


def test_after_the_optimizer_warm_up_the_runs_optimizer_loads_nothing_new() -> None:
    # A fresh interpreter: in this one an earlier test may have loaded what AdamW imports.
    done = subprocess.run(
        [sys.executable, "-c", _OPTIMIZER_WARMED], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    warmed, after = done.stdout.splitlines()
    # The first AdamW of a process imports hundreds of modules (so this check could fail)...
    assert int(warmed) > 50
    # ...and once the toy has taken them, the run's optimizer, clip and step load nothing more.
    assert after == "[]"


_LAUNCHER_WARMED = """
import sys
import torch
from shardwise.config import TrainConfig
from shardwise.memory.budget import kept_budget
from shardwise.train.build import load_corpus

config = TrainConfig(
    data=sys.argv[1], model="transformer", max_len=32, max_steps=2, batching="fixed",
    batch_size=2,
)
corpus = load_corpus(config)
before = "torch._dynamo" in sys.modules
kept_budget(config, corpus, config.layout(2), None, torch.device("cpu"), 2)
print(before, "torch._dynamo" in sys.modules)
"""


def test_the_launchers_baseline_holds_the_optimizers_imports_as_a_ranks_does(
    tmp_path: Path,
) -> None:
    # A CPU rank's baseline is the launcher's resident memory: it must hold what each rank's
    # holds before its baseline, the first AdamW's imports (torch's compiler stack) among them.
    data = write_corpus(tmp_path / "corpus.txt")
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER_WARMED, str(data)],
        capture_output=True,
        text=True,
        timeout=90,
        env=os.environ | {"SHARDWISE_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
