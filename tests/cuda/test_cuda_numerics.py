"""What the GPU computes differently: cuDNN's packed recurrence, and gloo over CUDA tensors.

python -m pytest -m cuda tests/cuda      # on a GPU machine; here every test skips, saying why
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranks import run_ranks
from shardwise.models import RecurrentLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch sees none (run `pytest -m cuda tests/cuda` on one)",
    ),
    pytest.mark.timeout(120),
]


@pytest.fixture(autouse=True)
def full_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (len(lengths), max(lengths)), generator=g)
    return tokens, torch.tensor(lengths)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_sequences_through_cudnn_equal_each_sequence_alone(cell: str) -> None:
    torch.manual_seed(0)
    model = RecurrentLM(cell=cell, embed_dim=32, hidden_dim=64).cuda()
    assert torch.backends.cudnn.is_available()  # the packed kernels under test are cuDNN's
    tokens, lengths = batch([17, 3, 29, 11])
    packed = model(tokens.cuda(), lengths)
    packed_loss = sum(packed[i, :n].sum() for i, n in enumerate(lengths.tolist()))
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()))
    alone_loss = 0.0
    for i, n in enumerate(lengths.tolist()):
        alone = model(tokens[i : i + 1, :n].cuda())  # unpacked, no padding at all
        torch.testing.assert_close(packed[i : i + 1, :n], alone, rtol=1e-5, atol=1e-5)
        alone_loss = alone_loss + alone.sum()
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()))
    for ours, plain in zip(packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_on_cuda_equals_packed_on_cpu(cell: str) -> None:
    torch.manual_seed(0)
    model = RecurrentLM(cell=cell, embed_dim=32, hidden_dim=64)
    tokens, lengths = batch([9, 40, 2, 23], seed=1)
    on_cpu = model(tokens, lengths)
    on_gpu = model.cuda()(tokens.cuda(), lengths).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)


def ddp_gradients(env, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    # Two ranks on one GPU cannot use NCCL (it refuses a duplicate device), so run_ranks' gloo
    # group carries CUDA tensors here: the data-parallel arithmetic on the GPU, not NCCL's wire.
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 4).cuda())
    half = slice(env.rank * 4, env.rank * 4 + 4)
    F.mse_loss(model(inputs[half].cuda()), targets[half].cuda()).backward()
    return [p.grad.cpu() for p in model.parameters()]


@pytest.mark.distributed
def test_two_gloo_ranks_over_cuda_tensors_average_to_the_one_process_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    grads = run_ranks(ddp_gradients, world=2, args=(inputs, targets))
    torch.manual_seed(0)
    whole = nn.Linear(8, 4).cuda()
    F.mse_loss(whole(inputs.cuda()), targets.cuda()).backward()
    for rank in (0, 1):
        for ours, plain in zip(grads[rank], whole.parameters(), strict=True):
            torch.testing.assert_close(ours, plain.grad.cpu(), rtol=1e-5, atol=1e-6)
