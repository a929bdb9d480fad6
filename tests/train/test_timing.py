import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.train.timing import SLOW_RANK_ENV, StepClock, testing_slowdown


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


def test_a_straggler_sleeps_before_the_step_by_the_previous_steps_own_compute() -> None:
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    layer = torch.nn.Linear(4, 4)
    clock = StepClock(layer.parameters(), clock=lambda: now[0], slowdown=2.0, sleep=sleep)
    clock.start()
    assert slept == []  # nothing to go by on the first step
    now[0] += 1.0
    clock.backward_done()
    assert clock.stop() == (1.0, 0.0)
    clock.start()
    assert slept == [1.0]  # (2 - 1) x the first step's second
    assert now[0] == 2.0  # the sleep delayed the rank before any of its gradients were ready
    now[0] += 1.0  # this step's own forward and backward
    layer(torch.randn(2, 4)).sum().backward()
    clock.backward_done()
    assert clock.stop() == (2.0, 0.0)  # the injected second counts as this slow rank's compute
    clock.start()
    assert slept == [1.0, 1.0]  # still 1 x the real compute: the slowdown does not compound


def test_the_slow_rank_setting_picks_one_rank_and_refuses_nonsense() -> None:
    env = {SLOW_RANK_ENV: "1:2.5", "RANK": "1"}
    assert testing_slowdown(env) == 2.5
    assert testing_slowdown({**env, "RANK": "0"}) == 1.0
    assert testing_slowdown({"RANK": "1"}) == 1.0
    for bad in ("2", "a:2", "1:0.5", "1:nan", "-1:2"):
        with pytest.raises(ShardwiseError, match=SLOW_RANK_ENV):
            testing_slowdown({SLOW_RANK_ENV: bad})
