import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.precision import Precision


def test_bf16_autocast_runs_matmuls_in_bf16_on_cpu() -> None:
    precision = Precision("bf16", torch.device("cpu"))
    with precision.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_fp32_leaves_dtypes_alone() -> None:
    with Precision("fp32", torch.device("cpu")).autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_on_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(ShardwiseError, match="use --precision bf16"):
        Precision("fp16", torch.device("cpu"))


def test_clip_returns_the_norm_before_clipping_and_clips() -> None:
    layer = torch.nn.Linear(3, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    norm = Precision("fp32", torch.device("cpu")).clip(optimizer, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert layer.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_zero_clip_norm_means_no_clipping() -> None:
    layer = torch.nn.Linear(3, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    Precision("fp32", torch.device("cpu")).clip(optimizer, 0.0)
    assert layer.weight.grad.norm().item() == pytest.approx(5.0)
