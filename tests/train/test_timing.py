import torch

from shardwise.train.timing import StepClock


def test_time_after_the_last_gradient_counts_as_waiting() -> None:
    now = [0.0]
    layer = torch.nn.Linear(4, 4)
    clock = StepClock(layer.parameters(), clock=lambda: now[0])
    clock.start()
    now[0] = 1.0  # the forward and backward took a second: gradients are ready at 1.0
    layer(torch.randn(2, 4)).sum().backward()
    now[0] = 1.5  # stands in for DDP waiting on a slower rank's buckets
    clock.backward_done()
    now[0] = 2.0  # the optimizer step
    assert clock.stop() == (1.5, 0.5)


def test_a_step_without_gradient_hooks_firing_has_no_wait() -> None:
    now = [0.0]
    clock = StepClock([], clock=lambda: now[0])
    clock.start()
    now[0] = 3.0
    clock.backward_done()
    assert clock.stop() == (3.0, 0.0)
