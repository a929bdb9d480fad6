import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.parallel.sync.traffic import SyncTraffic
from shardwise.train.faults import (
    COLLECTIVE_DELAY_ENV,
    KILL_ENV,
    PAUSE_ENV,
    SLOW_RANK_ENV,
    Faults,
    read_faults,
)
from shardwise.train.timing import StepClock


def test_no_variable_asks_for_nothing_and_the_loop_gets_no_hooks() -> None:
    faults = read_faults({"RANK": "1"}, attempt=0)
    assert not faults
    hooks = faults.step_hooks(StepClock([]), SyncTraffic())
    assert hooks.before_forward == [] and hooks.after_step == []


def test_kill_and_pause_pick_one_rank_in_the_first_attempt_only() -> None:
    env = {KILL_ENV: "1:5", PAUSE_ENV: "1:3:90", "RANK": "1"}
    assert read_faults(env, 0) == Faults(kill_after=5, pause_after=(3, 90.0))
    assert not read_faults(env, 1)  # a restarted group is not hit again
    assert not read_faults({**env, "RANK": "0"}, 0)


def test_a_pause_sleeps_after_its_step_only() -> None:
    slept: list[float] = []
    hooks = Faults(pause_after=(3, 2.5)).step_hooks(StepClock([]), SyncTraffic(), slept.append)
    for step in range(1, 6):
        for hook in hooks.after_step:
            hook(step)
    assert slept == [2.5]


def test_the_slow_rank_setting_picks_one_rank_and_refuses_nonsense() -> None:
    env = {SLOW_RANK_ENV: "1:2.5", "RANK": "1"}
    assert read_faults(env, 0).slowdown == 2.5
    assert read_faults(env, 3).slowdown == 2.5  # a straggler stays one after a restart
    assert read_faults({**env, "RANK": "0"}, 0).slowdown == 1.0
    for bad in ("2", "a:2", "1:0.5", "1:nan", "-1:2"):
        with pytest.raises(ShardwiseError, match=SLOW_RANK_ENV):
            read_faults({SLOW_RANK_ENV: bad}, 0)
    for variable, bad in ((KILL_ENV, "1"), (PAUSE_ENV, "1:x:3"), (COLLECTIVE_DELAY_ENV, "0.1:0")):
        with pytest.raises(ShardwiseError, match=variable):
            read_faults({variable: bad}, 0)


def test_a_straggler_sleeps_before_the_step_by_the_previous_steps_own_compute() -> None:
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    layer = torch.nn.Linear(4, 4)
    clock = StepClock(layer.parameters(), clock=lambda: now[0])
    [straggle] = Faults(slowdown=2.0).step_hooks(clock, SyncTraffic(), sleep).before_forward

    def start() -> None:  # as the trainer does: the clock first, then the hooks
        clock.start()
        straggle()

    start()
    assert slept == []  # nothing to go by on the first step
    now[0] += 1.0
    clock.backward_done()
    assert clock.stop() == (1.0, 0.0)
    start()
    assert slept == [1.0]  # (2 - 1) x the first step's second
    assert now[0] == 2.0  # the sleep delayed the rank before any of its gradients were ready
    now[0] += 1.0  # this step's own forward and backward
    layer(torch.randn(2, 4)).sum().backward()
    clock.backward_done()
    assert clock.stop() == (2.0, 0.0)  # the injected second counts as this slow rank's compute
    start()
    assert slept == [1.0, 1.0]  # still 1 x the real compute: the slowdown does not compound


def test_a_slow_link_charges_each_step_its_exchanges_and_bytes_as_sync_time() -> None:
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    traffic = SyncTraffic(clock=lambda: now[0])
    faults = read_faults({COLLECTIVE_DELAY_ENV: "0.01:8"}, 0)  # 8 Mbit/s: 1 MB/s
    [link] = faults.step_hooks(StepClock([]), traffic, sleep).after_step
    traffic.count(4000)  # one all-reduce of 1000 fp32 values
    link(1)
    link(2)  # nothing sent since: nothing to pay
    traffic.count(2000, exchanges=3)  # PowerSGD's three
    link(3)
    assert slept == pytest.approx([0.014, 0.032])
    assert traffic.seconds == pytest.approx(0.046)  # blocked in exchanges: the run's sync time
