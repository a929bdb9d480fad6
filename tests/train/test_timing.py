import time

import pytest
import torch

from shardwise.train.timing import StepClock, imbalance


def test_imbalance_is_slowest_over_mean_summed_over_steps() -> None:
    assert imbalance([[1.0, 2.0], [1.0, 1.0]]) == pytest.approx(1.2)
    assert imbalance([[1.0, 1.0], [1.0, 1.0]]) == pytest.approx(1.0)


def test_time_after_the_last_gradient_counts_as_waiting() -> None:
    layer = torch.nn.Linear(4, 4)
    clock = StepClock(layer.parameters())
    clock.start()
    layer(torch.randn(2, 4)).sum().backward()
    time.sleep(0.05)  # stands in for DDP waiting on a slower rank's buckets
    clock.backward_done()
    compute, wait = clock.stop()
    assert wait >= 0.05
    assert 0 <= compute < wait
