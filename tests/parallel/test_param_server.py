"""The parameter server's rules, driven through a scripted channel (no processes)."""

from __future__ import annotations

import pytest
import torch

from shardwise.parallel.sync.exchange import (
    BYE,
    HELLO,
    LOST,
    PUSH,
    Header,
    Message,
    assign_shards,
)
from shardwise.parallel.sync.param_server import ParameterServer

pytestmark = pytest.mark.timeout(30)


class ScriptedChannel:
    """Delivers scripted worker messages in order (an inbox) and records the server's replies.

    A worker in `dead` fails every reply sent to it, as a broken link does.
    """

    def __init__(
        self, messages: list[tuple[int, Header, torch.Tensor | None]], dead: set[int] = frozenset()
    ) -> None:
        self.messages = list(messages)
        self.replies: list[tuple[int, Header, torch.Tensor]] = []
        self.dead = dead

    def get(self) -> Message:
        worker, header, payload = self.messages.pop(0)
        return Message(worker, header, payload, why="link closed" if header.kind == LOST else "")

    def send(self, peer: int, header: Header, payload: torch.Tensor | None = None) -> None:
        assert payload is not None
        if peer in self.dead:
            raise RuntimeError("Connection closed by peer")
        self.replies.append((peer, header, payload.clone()))


def sgd_server(workers: list[int], max_steps: int, max_staleness: int) -> ParameterServer:
    shard = [torch.zeros(2)]
    optimizer = torch.optim.SGD(shard, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ParameterServer(shard, optimizer, scheduler, workers, max_steps, max_staleness)


def hello(worker: int) -> tuple[int, Header, None]:
    return worker, Header(HELLO), None


def bye(worker: int) -> tuple[int, Header, None]:
    return worker, Header(BYE), None


def push(worker: int, version: int, value: float) -> tuple[int, Header, torch.Tensor]:
    return worker, Header(PUSH, version), torch.full((2,), value)


def test_one_worker_gets_every_update_back_at_once() -> None:
    channel = ScriptedChannel([hello(0), push(0, 0, 1.0), push(0, 1, 2.0), bye(0)])
    server = sgd_server([0], max_steps=2, max_staleness=0)
    server.serve(channel, channel)
    params = [reply[2].tolist() for reply in channel.replies]
    assert params == [[0.0, 0.0], [-1.0, -1.0], [-3.0, -3.0]]
    assert [reply[1].kind for reply in channel.replies] == [0, 0, 1]  # the last one: stop


def test_without_staleness_every_step_averages_one_push_of_each_worker() -> None:
    rounds = [push(0, 0, 1.0), push(1, 0, 3.0), push(0, 1, 2.0), push(1, 1, 2.0)]
    channel = ScriptedChannel([hello(0), hello(1), *rounds, bye(0), bye(1)])
    server = sgd_server([0, 1], max_steps=2, max_staleness=0)
    server.serve(channel, channel)
    # Worker 0's first push is answered only after worker 1 pushed too (synchronous rounds),
    # and both get the parameters after the step on the mean of their gradients.
    assert [peer for peer, _, _ in channel.replies] == [0, 1, 0, 1, 0, 1]
    params = [payload.tolist() for _, _, payload in channel.replies]
    assert params[2:] == [[-2.0, -2.0]] * 2 + [[-4.0, -4.0]] * 2
    assert [header.kind for _, header, _ in channel.replies] == [0, 0, 0, 0, 1, 1]


def test_a_fast_worker_fills_a_step_alone_and_stale_pushes_weigh_less() -> None:
    pushes = [push(0, 0, 1.0), push(0, 0, 1.0), push(1, 0, 2.0), push(0, 1, 1.0)]
    channel = ScriptedChannel([hello(0), hello(1), *pushes, bye(0), bye(1)])
    server = sgd_server([0, 1], max_steps=5, max_staleness=10)
    server.serve(channel, channel)
    # Step 1: worker 0's two pushes. Step 2: worker 1's push, one step old (weight 1/2), and
    # worker 0's fresh one: mean of 2 / 2 and 1 = 1.
    assert server.version == 2
    assert channel.replies[-1][2].tolist() == [-2.0, -2.0]
    assert server.staleness == {0: 3, 1: 1}


def test_pushes_past_the_budget_are_not_applied_and_everyone_is_stopped() -> None:
    channel = ScriptedChannel(
        [hello(0), hello(1), push(0, 0, 1.0), push(0, 0, 1.0), push(1, 0, 5.0), bye(0), bye(1)]
    )
    server = sgd_server([0, 1], max_steps=1, max_staleness=10)
    server.serve(channel, channel)
    assert server.version == 1  # worker 1's push came after the one step's budget
    final = [reply for reply in channel.replies if reply[1].kind == 1]
    assert {peer for peer, _, _ in final} == {0, 1}
    assert all(payload.tolist() == [-1.0, -1.0] for _, _, payload in final)


def test_a_lost_worker_no_longer_holds_back_the_others_whose_pushes_fill_the_steps() -> None:
    lost = (1, Header(LOST), None)
    script = [hello(0), hello(1), push(0, 0, 1.0), lost, push(0, 0, 1.0), push(0, 1, 3.0)]
    channel = ScriptedChannel([*script, push(0, 1, 3.0), bye(0)])
    server = sgd_server([0, 1], max_steps=2, max_staleness=0)
    server.serve(channel, channel)
    # At S = 0 worker 0 waits for worker 1 until its link breaks; then its own pushes alone
    # make each step (two pushes a step, as there are two workers), and it is stopped at 2.
    assert server.lost == {1: "link closed"}
    assert server.version == 2
    assert [peer for peer, _, _ in channel.replies] == [0, 1, 0, 0, 0, 0]
    assert channel.replies[-1][1].kind == 1 and channel.replies[-1][2].tolist() == [-4.0, -4.0]


def test_a_worker_whose_reply_fails_is_dropped_and_the_run_goes_on() -> None:
    pushes = [push(0, 0, 1.0), push(1, 0, 1.0), push(0, 1, 1.0), push(0, 1, 1.0)]
    lost = (1, Header(LOST), None)
    channel = ScriptedChannel([hello(0), hello(1), *pushes, bye(0), lost], dead={1})
    server = sgd_server([0, 1], max_steps=2, max_staleness=0)
    server.serve(channel, channel)
    assert set(server.lost) == {1} and "Connection closed" in server.lost[1]
    assert server.version == 2 and {peer for peer, _, _ in channel.replies} == {0}


def test_shards_are_whole_tensors_balanced_by_size() -> None:
    # Largest first, each to the lighter server: 100 | 60, 50 | 40 | 10.
    assert assign_shards([100, 10, 60, 50, 40], 2) == [[0, 4], [2, 3, 1]]
    assert assign_shards([5, 5, 5], 3) == [[0], [1], [2]]
