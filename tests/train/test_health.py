"""Training health on one process: verdicts, stop and skip, spikes, and weights fit to save."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.train.health import (
    DIVERGED_ROWS,
    DivergedError,
    NonFiniteStepError,
    TrainingHealth,
    check_finite_weights,
    is_spike,
    judge_step,
    skip_step,
    spike_level,
    stop_message,
)

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
NAN, INF = math.nan, math.inf


def health(policy: str = "stop", **settings: object) -> TrainingHealth:
    return TrainingHealth(TrainConfig(on_nonfinite=policy, **settings), ENV, vocab_size=256)


def test_the_verdict_names_the_ranks_of_each_kind() -> None:
    verdict = judge_step({0: [2.0, 0.5], 1: [NAN, NAN], 2: [3.0, INF]}, fp16=False)
    assert (verdict.loss_ranks, verdict.grad_ranks) == ((1,), (1, 2))
    assert verdict.ours
    assert (
        verdict.describe(7) == "step 7: non-finite loss on rank 1 and gradient norm on ranks 1, 2"
    )
    assert judge_step({0: [2.0, 0.5], 1: [1.0, 0.0]}, fp16=False).finite


def test_under_fp16_an_inf_gradient_alone_is_the_scalers_but_a_nan_loss_is_ours() -> None:
    overflow = judge_step({0: [2.0, INF], 1: [2.1, INF]}, fp16=True)
    assert overflow.scalers_business and not overflow.ours
    assert judge_step({0: [2.0, INF], 1: [2.1, INF]}, fp16=False).ours  # no scaler there
    assert judge_step({0: [NAN, INF], 1: [2.1, INF]}, fp16=True).ours  # the forward overflowed


def test_the_stop_message_suggests_what_fits_the_run() -> None:
    verdict = judge_step({0: [NAN, NAN]}, fp16=True)
    plain = stop_message(verdict, 3, clip_norm=1.0, precision="fp32")
    assert plain.startswith("step 3: non-finite loss on rank 0 and gradient norm on rank 0;")
    assert "lower --lr" in plain and "--on-nonfinite skip" in plain
    assert "--clip-norm" not in plain and "bf16" not in plain
    tailored = stop_message(verdict, 3, clip_norm=0.0, precision="fp16")
    assert "set --clip-norm 1.0" in tailored and "--precision bf16" in tailored
    assert "\n" not in tailored


def test_stop_raises_before_anything_is_counted() -> None:
    checks = health("stop")
    assert checks.check_step(1, [torch.tensor(3.0)], torch.tensor(0.5))
    with pytest.raises(NonFiniteStepError, match=r"^step 2: non-finite loss on rank 0;"):
        checks.check_step(2, [torch.tensor(3.0), torch.tensor(NAN)], torch.tensor(0.5))
    assert checks.skipped == 0


def test_an_asynchronous_worker_judges_its_own_step_by_its_own_rank() -> None:
    env = DistEnv(rank=3, world_size=4, local_rank=3, local_world_size=4, device=ENV.device)
    checks = TrainingHealth(TrainConfig(), env, vocab_size=256, agree=False)  # no collective
    with pytest.raises(NonFiniteStepError, match=r"^step 9: non-finite gradient norm on rank 3;"):
        checks.check_step(9, [torch.tensor(2.0)], torch.tensor(INF))


def test_skip_counts_the_step_and_its_window(capsys: pytest.CaptureFixture) -> None:
    checks = health("skip")
    assert not checks.check_step(4, [torch.tensor(INF)], torch.tensor(NAN))
    assert checks.check_step(5, [torch.tensor(3.0)], torch.tensor(0.5))
    assert checks.skipped == 1
    assert "warning: step 4: non-finite loss on rank 0" in capsys.readouterr().err
    row = checks.close_window(3.0, 5)
    assert row == {"loss": 3.0, "loss_spike": False, "nonfinite_steps_skipped": 1}
    assert checks.close_window(2.9, 6)["nonfinite_steps_skipped"] == 0  # per window


def test_a_window_whose_every_step_was_skipped_has_no_loss() -> None:
    checks = health("skip")
    checks.check_step(1, [torch.tensor(NAN)], torch.tensor(NAN))
    assert checks.close_window(0.0, 1) == {
        "loss": None,
        "loss_spike": False,
        "nonfinite_steps_skipped": 1,
    }


def test_spikes_are_far_above_the_level_in_ratio_and_in_nats() -> None:
    assert is_spike(6.1, 2.0) and not is_spike(5.9, 2.0)  # three times the level
    assert not is_spike(0.09, 0.02)  # 4.5x, but a memorised corpus's noise: not a nat
    assert not is_spike(100.0, None)
    assert spike_level(None, 256) == pytest.approx(math.log(256))  # a uniform guess's loss
    assert spike_level(9e13, 256) == pytest.approx(math.log(256))  # capped by it
    assert spike_level(1.5, 256) == 1.5
    assert spike_level(1.5, None) == 1.5


def test_a_falling_loss_is_no_spike_and_a_jump_is_flagged_once(
    capsys: pytest.CaptureFixture,
) -> None:
    checks = health()
    losses = [5.4, 4.0, 3.0, 2.4, 2.1, 2.0, 2.0, 9.0, 9.5, 2.1]
    flags = [checks.close_window(loss, 10 * n)["loss_spike"] for n, loss in enumerate(losses)]
    assert flags == [False] * 7 + [True, True, False]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1  # one line when a spike begins, not one per row of it
    assert warnings[0].startswith("shardwise: warning: step 70: loss 9 is ")
    assert checks.level is not None and checks.level < 2.5  # the spike did not drag it up


def test_a_run_astronomical_from_its_first_row_is_flagged() -> None:
    # --lr 1e6 on a GRU: every row between 1e11 and 2e14, all finite (measured).
    checks = health()
    assert all(checks.close_window(loss, 5)["loss_spike"] for loss in (6.7e11, 1.1e13, 1.5e13))


def test_skip_step_leaves_weights_and_optimizer_untouched_and_counts_the_step() -> None:
    model, optimizer = _trained_once()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()
    strategy = SimpleNamespace(steps=0)
    strategy.after_step = lambda module, layout: setattr(strategy, "steps", strategy.steps + 1)
    parallel = SimpleNamespace(strategy=strategy, module=model)
    session = SimpleNamespace(precision=SimpleNamespace(scaler=None), layout=None)
    skip_step(session, optimizer, parallel)
    assert all(p.grad is None for p in model.parameters())
    for old, new in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(new, old, atol=0, rtol=0)
    assert strategy.steps == 1  # the sync strategy's period keeps pace with the steps


def test_skip_step_closes_the_fp16_scalers_step_and_lowers_its_scale() -> None:
    model, optimizer = _trained_once()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.full((2, 4), NAN)).sum()).backward()
    scaler.unscale_(optimizer)  # as clip_gradients does
    strategy = SimpleNamespace(after_step=lambda module, layout: None)
    parallel = SimpleNamespace(strategy=strategy, module=model)
    skip_step(
        SimpleNamespace(precision=SimpleNamespace(scaler=scaler), layout=None), optimizer, parallel
    )
    assert scaler.get_scale() == 512.0
    model(torch.ones(2, 4)).sum().backward()
    scaler.unscale_(optimizer)  # would raise had the skipped step been left open


def test_weights_with_nan_are_never_saved() -> None:
    model = torch.nn.Linear(4, 2)
    check_finite_weights(model.parameters(), ENV, step=3)
    with torch.no_grad():
        model.bias[1] = math.inf
    with pytest.raises(ShardwiseError, match=r"^step 3: 1 weight tensor\(s\) hold NaN or inf;"):
        check_finite_weights(model.parameters(), ENV, step=3)


def _trained_once() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A layer and its AdamW after one real step, so the optimizer holds momentum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_a_loss_that_explodes_and_stays_up_stops_the_run() -> None:
    checks = health()
    for step, loss in enumerate([5.0, 3.0, 2.5], start=1):
        checks.close_window(loss, step)
    for step in range(4, 4 + DIVERGED_ROWS - 1):
        checks.close_window(2e14, step)  # --lr 1e6: astronomical, row after row
    with pytest.raises(DivergedError, match=r"the loss diverged .* lower --lr"):
        checks.close_window(2e14, 4 + DIVERGED_ROWS)


def test_a_spike_the_run_recovers_from_does_not_stop_it_nor_does_warn() -> None:
    checks = health()
    losses = [5.0, 3.0, *[20.0] * (DIVERGED_ROWS - 1), 2.4, *[20.0] * (DIVERGED_ROWS - 1)]
    for step, loss in enumerate(losses, start=1):
        checks.close_window(loss, step)
    warned = health(on_divergence="warn")
    for step, loss in enumerate([5.0, 3.0, *[2e14] * (3 * DIVERGED_ROWS)], start=1):
        assert warned.close_window(loss, step)["loss_spike"] == (step > 2)
    below_a_guess = health()  # spikes, but still better than a uniform guess (log 256 = 5.5)
    for step, loss in enumerate([1.0, 0.5, *[4.0] * (3 * DIVERGED_ROWS)], start=1):
        below_a_guess.close_window(loss, step)
