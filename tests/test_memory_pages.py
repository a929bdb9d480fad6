"""On the host a saved tensor holds the pages its forward wrote: oneDNN's LSTM saves a workspace
sized for its backward's writes too, and writes about two fifths of it in the forward. The
profile counts both (memory/activations.py); a host's prediction holds the written pages of
every layer and one layer's rest, a GPU's every byte. Each case runs in a fresh interpreter:
whether pages can be told apart depends on glibc's mmap threshold, which this process's earlier
tests may have fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

_PROFILES = """
import json, torch
from shardwise.loss import token_loss_sum
from shardwise.memory.activations import counts_pages, profile_activations
from shardwise.memory.batches import BatchShape
from shardwise.memory.measure import (
    peak_resident_bytes, release_freed_memory, reset_peak_resident, resident_bytes,
)
from shardwise.models import RecurrentLM, TransformerLM
from shardwise.models.contract import ModelContract

torch.manual_seed(0)
shape = BatchShape(rows=8, width=256)
found = {"counts_pages": counts_pages()}
models = {
    "lstm": RecurrentLM(vocab_size=64, embed_dim=32, hidden_dim=256, num_layers=2),
    "transformer": TransformerLM(vocab_size=64, dim=64, num_layers=2, num_heads=2, max_len=256),
}
for name, model in models.items():
    profile = profile_activations(model, ModelContract(), widest=64)
    host, device = profile.on_host(), profile.on_device()
    tokens = torch.zeros(shape.rows, shape.width, dtype=torch.long)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    release_freed_memory()
    start = resident_bytes()
    reset_peak_resident()
    token_loss_sum(ModelContract()(model, tokens), tokens).backward()
    found[name] = {
        "device": device.whole.bytes(shape),
        "device_workspace": device.workspace.bytes(shape),
        "host": host.whole.bytes(shape),
        "host_workspace": host.workspace.bytes(shape),
        "host_pieces": sum(piece.saved.bytes(shape) for piece in host.pieces),
        "scratch": host.scratch,
        "piece_scratch": [piece.scratch for piece in host.pieces],
        "device_scratch": device.scratch,
        "layer_weights": max(
            sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            for module in model.modules()
        ),
        "measured": peak_resident_bytes() - start - grads,
    }
print(json.dumps(found))
"""


def _profiles(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_",)}
    done = subprocess.run(
        [sys.executable, "-c", _PROFILES],
        capture_output=True,
        text=True,
        timeout=150,
        env=clean | env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_host_holds_the_pages_an_lstm_writes_and_one_layers_workspace() -> None:
    found = _profiles(MALLOC_MMAP_THRESHOLD_="131072")
    assert found["counts_pages"]
    lstm, transformer = found["lstm"], found["transformer"]
    # The LSTM's forward writes well under all it saves; its backward writes one layer's rest.
    assert lstm["host"] < 0.6 * lstm["device"]
    assert lstm["host_workspace"] > 0.2 * lstm["device"]
    assert lstm["device_workspace"] == 0  # a GPU's allocator holds every byte from the start
    # Its backward copies each layer's weights into oneDNN's layout and writes their gradients
    # there first: about twice a layer's weights, measured on a narrow batch (a host's alone).
    assert 1.5 * lstm["layer_weights"] < max(lstm["piece_scratch"]) < 3 * lstm["layer_weights"]
    assert lstm["device_scratch"] == 0
    # Its peak through forward and backward, measured (less its weights' gradients), is what the
    # host's view says, and not every byte saved, which is over a fifth more.
    host = lstm["host"] + lstm["host_workspace"] + lstm["scratch"]
    assert host == pytest.approx(lstm["measured"], rel=0.12)
    assert lstm["device"] > 1.2 * lstm["measured"]
    # A pipeline stage's pieces count pages too (a boundary saved by two pieces counts twice).
    assert lstm["host"] <= lstm["host_pieces"] < 0.6 * lstm["device"]
    # A Transformer writes everything it saves: both views agree.
    assert transformer["host"] == pytest.approx(transformer["device"], rel=0.02)
    assert transformer["host_workspace"] < 0.02 * transformer["device"]
    assert transformer["scratch"] < 0.02 * transformer["device"]  # a matmul's backward keeps none


def test_where_glibc_moves_its_threshold_every_saved_byte_counts_on_the_host_too() -> None:
    # Heap pages another tensor of the call wrote may back a storage: residency says nothing.
    found = _profiles(SHARDWISE_KEEP_MALLOC="1")
    assert not found["counts_pages"]
    lstm = found["lstm"]
    assert lstm["host"] == lstm["device"]
    assert lstm["host_workspace"] == 0
