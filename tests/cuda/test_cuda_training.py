"""Training on a CUDA device through the public entry points, against the same run on the CPU.

    python -m pytest -m cuda tests/cuda      # on a GPU machine; here every test skips, saying why

One process each (nproc=1): two ranks on one GPU cannot share NCCL, the backend of a CUDA job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shardwise
from helpers import metrics, quick_config
from shardwise.report.result import RunResult

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch sees none (run `pytest -m cuda tests/cuda` on one)",
    ),
    pytest.mark.timeout(300),
]

MODELS = ["lstm", "gru", "transformer"]
STEPS = 3


@pytest.fixture(autouse=True)
def full_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain fp32 products on the GPU (no TF32), so fp32 runs compare at float tolerance."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def losses(corpus: Path, run: Path, **overrides: object) -> list[float]:
    """Per-step training losses of a one-process run through `shardwise.run`."""
    result = shardwise.run(quick_config(corpus, run, nproc=1, max_steps=STEPS, **overrides))
    assert result is not None and result.steps == overrides.get("max_steps", STEPS)
    return [row["loss"] for row in metrics(run)]


@pytest.mark.parametrize("model", MODELS)
def test_a_cuda_run_takes_the_cpu_runs_steps_in_fp32(corpus: Path, tmp_path: Path, model: str):
    on_cpu = losses(corpus, tmp_path / "cpu", model=model, device="cpu")
    on_gpu = losses(corpus, tmp_path / "gpu", model=model, device="cuda")
    assert RunResult.read(tmp_path / "gpu").device.startswith("cuda")
    # Float rounding differs (cuDNN's kernels, reduction order); Adam turns it into weight
    # differences of order lr, so three steps stay within 1e-3 of each other.
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("precision", "first", "later"), [("bf16", 2e-2, 5e-2), ("fp16", 5e-3, 5e-2)]
)
def test_bf16_autocast_and_fp16_loss_scaling_follow_fp32(
    corpus: Path, tmp_path: Path, model: str, precision: str, first: float, later: float
):
    fp32 = losses(corpus, tmp_path / "fp32", model=model, device="cuda")
    low = losses(corpus, tmp_path / precision, model=model, device="cuda", precision=precision)
    # bf16 keeps 8 bits of mantissa, fp16 11: the first step's loss differs only by the
    # forward's rounding; later ones also by the update's (and fp16's scaler may skip a step).
    torch.testing.assert_close(low[0], fp32[0], rtol=first, atol=0)
    torch.testing.assert_close(low[1:], fp32[1:], rtol=later, atol=0)
    rows = metrics(tmp_path / precision)
    assert all(row["nonfinite_steps_skipped"] <= 1 for row in rows), rows


@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_saved_on_one_device_resumes_on_the_other(
    corpus: Path, tmp_path: Path, first: str, then: str
):
    whole = losses(corpus, tmp_path / "whole", device="cpu", max_steps=4)
    run = tmp_path / "run"
    losses(corpus, run, device=first, max_steps=2, checkpoint_every=1)
    resumed = losses(corpus, run, device=then, max_steps=4, resume=run)
    assert len(resumed) == 4
    torch.testing.assert_close(resumed, whole, rtol=1e-3, atol=0)


@pytest.mark.parametrize("model", MODELS)
def test_a_model_trained_on_cuda_loads_onto_either_device(corpus: Path, tmp_path: Path, model):
    losses(corpus, tmp_path / "run", model=model, device="cuda")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for device in ("cpu", "cuda"):
        loaded = RunResult.read(tmp_path / "run").load_model().to(device)
        with torch.no_grad():
            outputs[device] = loaded(tokens.to(device)).cpu()
    torch.testing.assert_close(outputs["cuda"], outputs["cpu"], rtol=1e-4, atol=1e-4)


OWN_LOOP = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    import shardwise
    from shardwise.models import RecurrentLM

    session = shardwise.setup(device="cuda", precision=sys.argv[1])
    model = session.prepare(RecurrentLM(cell="gru", hidden_dim=64, embed_dim=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog " * 50))
    windows = text[: len(text) // 33 * 33].view(-1, 33)
    data = torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])
    devices, seen = set(), []
    for epoch in range(3):
        for x, y in session.loader(data, batch_size=8):
            devices.add(x.device.type)
            optimizer.zero_grad()
            loss = session.forward_backward(model, x, y)
            session.step(optimizer, model)
        seen.append(session.mean(loss.detach()))
    where = {p.device.type for p in model.parameters()}
    print(json.dumps({"device": str(session.device), "params": sorted(where),
                      "batches": sorted(devices), "losses": seen}))
    session.close()
    """
)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_own_loop_api_trains_on_cuda(tmp_path: Path, precision: str) -> None:
    # A process of its own: setup() joins a process group, which a process does once.
    done = subprocess.run(
        [sys.executable, "-c", OWN_LOOP, precision],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["device"].startswith("cuda")
    assert found["params"] == ["cuda"] and found["batches"] == ["cuda"]
    assert found["losses"][-1] < found["losses"][0]
