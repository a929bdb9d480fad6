"""The own loop's token-budget loader: 2 ranks train as 1 process on the same batches, and an
epoch visits every sequence once with the same number of batches on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel_cases import tiny_model
from ranks import COLLECTIVE_TIMEOUT_S, run_ranks
from shardwise.config import TrainConfig
from shardwise.data.cost import rnn_cost
from shardwise.data.token_loader import TokenLoader
from shardwise.distributed import DistEnv
from shardwise.loss import token_loss_sum
from shardwise.session import Session

pytestmark = pytest.mark.timeout(120)

TOKENS = 96
EPOCHS = 2
# Plain SGD: unlike Adam, its step scales with the gradient, so a loss off by any factor shows.
SGD_LR = 0.5


def sequences() -> list[np.ndarray]:
    """Heavy-tailed lengths, as real text has: many short sequences, a few long."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(2 + rng.pareto(1.5, size=61) * 6, 40).astype(int)
    return [rng.integers(0, 256, size=n) for n in lengths]


def user_loop(env: DistEnv) -> tuple[dict[str, torch.Tensor], list[int], list[list[int]]]:
    """What README shows: session.loader(tokens_per_batch=...) and session.loss."""
    session = Session.from_config(
        env, TrainConfig(device="cpu", timeout_s=COLLECTIVE_TIMEOUT_S, model="gru")
    )
    model = session.prepare(tiny_model("gru"))
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    loader = session.loader(sequences(), tokens_per_batch=TOKENS)
    counts, seen = [], []
    for _ in range(EPOCHS):
        counts.append(len(loader))
        lengths = []
        for batch in loader:
            loss = session.loss(model(batch.tokens), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lengths += batch.lengths.tolist()
        seen.append(lengths)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return state, counts, seen


def one_process_on_the_same_batches() -> dict[str, torch.Tensor]:
    """Each step: both ranks' batches, in one process, each loss over the step's tokens."""
    model = tiny_model("gru")
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    loaders = [
        TokenLoader(
            sequences(),
            TOKENS,
            replicas=2,
            rank=r,
            seed=0,
            device=torch.device("cpu"),
            cost_model=rnn_cost,
        )
        for r in range(2)
    ]
    for _ in range(EPOCHS):
        for batches in zip(*loaders, strict=True):
            optimizer.zero_grad()
            for batch in batches:
                (token_loss_sum(model(batch.tokens), batch.targets) / batch.step_tokens).backward()
            optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def ranks() -> list:
    return run_ranks(user_loop, world=2)


def test_two_ranks_train_as_one_process_on_the_same_batches(ranks: list) -> None:
    reference = one_process_on_the_same_batches()
    for state, _, _ in ranks:
        for name, tensor in reference.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=2e-6, msg=name)


def test_every_epoch_visits_every_sequence_once_in_equal_batch_counts(ranks: list) -> None:
    counts = [rank_counts for _, rank_counts, _ in ranks]
    assert counts[0] == counts[1] and min(counts[0]) > 1
    targets = sorted(len(seq) - 1 for seq in sequences())
    for epoch in range(EPOCHS):
        seen = sorted(ranks[0][2][epoch] + ranks[1][2][epoch])
        assert seen == targets, f"epoch {epoch}"


def test_a_loader_wants_one_batch_size() -> None:
    session = Session.from_config(
        DistEnv(0, 1, 0, 1, torch.device("cpu")), TrainConfig(device="cpu")
    )
    with pytest.raises(Exception, match="batch_size or tokens_per_batch"):
        session.loader(sequences(), batch_size=4, tokens_per_batch=64)
