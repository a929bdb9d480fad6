import itertools

import pytest
import torch

from shardwise.train.lr_schedule import lr_factor, warmup_cosine


def test_warmup_rises_linearly_then_cosine_reaches_the_floor() -> None:
    factors = [lr_factor(step, 4, 20, 0.1) for step in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_scheduler_state_restores_the_same_lr() -> None:
    def fresh() -> tuple:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, warmup_cosine(opt, 2, 10, 0.0)

    opt, sched = fresh()
    for _ in range(5):
        opt.step()
        sched.step()
    _, sched2 = fresh()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
