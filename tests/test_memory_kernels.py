"""The host's kernel caches: bounded before a process's first kernel, and what they keep of each
new batch shape measured by the profile and counted in the prediction.

Each side is a fresh interpreter: the caches read their capacity once, at the first kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shardwise.memory.kernels import CAPACITY, VARIABLES

pytestmark = pytest.mark.timeout(180)

MiB = 2**20
WIDTHS = [21 + 3 * i for i in range(12)]  # twelve batch shapes none of the sides ran before

# A bf16 Transformer's forward and backward at each of WIDTHS (rows of 4), then the resident
# memory kept, freed memory handed back; or the profile's measure of what each shape keeps.
_SIDE = """
import json, sys
from shardwise.memory.kernels import bound_kernel_caches
if sys.argv[1] == "bounded":
    bound_kernel_caches()
import torch
from shardwise.memory.activations import profile_activations
from shardwise.memory.measure import release_freed_memory, status_bytes
from shardwise.models import TransformerLM
from shardwise.models.contract import ModelContract
from shardwise.precision import Precision

torch.manual_seed(0)
model = TransformerLM(vocab_size=256, dim=128, num_layers=2)
autocast = Precision("bf16", torch.device("cpu")).autocast
if sys.argv[2] == "profile":
    kept = profile_activations(model, ModelContract(), autocast, 64).kernels
    print(json.dumps({"per_shape": kept.per_shape, "most": kept.most}))
    raise SystemExit
def step(width):
    tokens = torch.zeros(4, width, dtype=torch.long)
    with autocast():
        model(tokens).float().sum().backward()
    model.zero_grad(set_to_none=True)
step(17)  # what a first backward loads once
release_freed_memory()
start = status_bytes("VmRSS")
for width in json.loads(sys.argv[3]):
    step(width)
release_freed_memory()
print(json.dumps({"kept": status_bytes("VmRSS") - start}))
"""


def _sides(*sides: tuple[str, str]) -> list[dict]:
    """Run each (caches, what) side in its own interpreter, side by side; their JSON lines."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}  # the libraries' default
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _SIDE, caches, what, json.dumps(WIDTHS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for caches, what in sides
    ]
    found = []
    for process in started:
        out, err = process.communicate(timeout=150)
        assert process.returncode == 0, err
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def test_bounded_caches_keep_a_fraction_and_the_profile_knows_how_much() -> None:
    default, bounded, profiled = _sides(
        ("default", "run"), ("bounded", "run"), ("bounded", "profile")
    )
    # At the libraries' 1024 entries each new shape's kernels stay (measured: ~8 MiB a
    # shape for this model, 100 MiB after twelve); bounded, the caches fill and then evict.
    assert default["kept"] > 40 * MiB, default
    assert bounded["kept"] < default["kept"] / 3, (bounded, default)
    # The profile, on shapes of one row, saw the caches fill: what the prediction counts for
    # twelve shapes is what twelve kept, within a third.
    assert profiled["most"] is not None, profiled
    assert 0 < profiled["per_shape"] < profiled["most"]
    assert abs(profiled["most"] - bounded["kept"]) < bounded["kept"] / 3, (profiled, bounded)


def test_the_command_line_bounds_the_caches_for_what_it_starts_and_keeps_a_users_own() -> None:
    code = (
        "import json, os\n"
        "from shardwise.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps({{v: os.environ.get(v) for v in {VARIABLES!r}}}))"
    )
    for given, want in (({}, str(CAPACITY)), ({VARIABLES[0]: "7"}, "7")):
        env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | given
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        # Set in the launcher's own environment: the workers it starts inherit them.
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == {VARIABLES[0]: want, VARIABLES[1]: str(CAPACITY)}, done
