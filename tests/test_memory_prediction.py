"""The memory predictor: parts that add up, scale with the batch and the layout, take whatever a
registered technique's cost says, and are read at the worst planned batch, not the mean."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import shardwise.techniques as techniques
from shardwise.config import TrainConfig
from shardwise.memory.batches import NEAR_PEAK
from shardwise.memory.footprint import PARTS
from shardwise.memory.predict import MemoryPredictor
from shardwise.techniques import Cost, Technique
from shardwise.train.build import load_corpus

pytestmark = pytest.mark.timeout(120)

BASELINE = 100 * 2**20


def config_for(corpus: Path, **values: object) -> TrainConfig:
    """A small Transformer on `corpus`, padded batches of fixed size unless told otherwise."""
    settings: dict[str, object] = {
        "data": corpus,
        "model": "transformer",
        "max_len": 64,
        "max_steps": 20,
        "batching": "fixed",
        "batch_size": 4,
    }
    return TrainConfig(**(settings | values))


def predict(config: TrainConfig, world_size: int = 1):
    predictor = MemoryPredictor(config, load_corpus(config), BASELINE)
    return predictor.predict(config, config.layout(world_size))


def test_the_parts_add_up_to_each_ranks_total(corpus: Path) -> None:
    prediction = predict(config_for(corpus), world_size=2)
    assert len(prediction.ranks) == 2
    for rank in prediction.ranks:
        assert set(PARTS) <= set(rank.parts)
        assert rank.total == sum(rank.parts.values())
        assert rank.parts["baseline"] == BASELINE
        # AdamW's two moments, each the size of the parameters; gradients the same size.
        assert rank.parts["optimizer"] == 2 * rank.parts["parameters"] > 0
        assert rank.parts["gradients"] == rank.parts["parameters"]
        assert rank.parts["activations"] > 0
    assert "rank 1:" in prediction.describe()


def test_doubling_the_batch_raises_the_activations(corpus: Path) -> None:
    small = predict(config_for(corpus, batch_size=4)).ranks[0]
    large = predict(config_for(corpus, batch_size=8)).ranks[0]
    assert large.batch.shape.rows == 2 * small.batch.shape.rows
    ratio = large.parts["activations"] / small.parts["activations"]
    assert 1.8 < ratio <= 2.0  # rows scale what each row saves; the width is the longest's
    assert large.parts["parameters"] == small.parts["parameters"]


def test_two_pipeline_stages_hold_less_state_a_rank_than_two_replicas(corpus: Path) -> None:
    replicas = predict(config_for(corpus), world_size=2)
    stages = predict(config_for(corpus, pp=2, microbatches=2), world_size=2)
    whole = replicas.ranks[0].parts["parameters"]
    per_stage = [rank.parts["parameters"] for rank in stages.ranks]
    assert all(share < whole for share in per_stage)
    # The stages share out the model: together they hold it once, each its own stage's part.
    assert sum(per_stage) == pytest.approx(whole, rel=0.01)


def test_a_registered_techniques_cost_is_applied(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dataclasses.dataclass(frozen=True)
    class Always:
        def describe(self) -> str:
            return "fake: always on"

    def cost(entry: Always, footprint: techniques.Footprint) -> Cost:
        # It sees the parts its predecessors left: half the activations go, 3 MiB of buffers come.
        return Cost(
            memory={"buffers": 3 * 2**20, "activations": -footprint.parts["activations"] // 2}
        )

    fake = Technique(
        name="fake", title="A fake technique", entry=lambda config, layout: Always(), cost=cost
    )
    config = config_for(corpus)
    before = predict(config).ranks[0]
    monkeypatch.setattr(techniques, "BUILT_IN", (*techniques.BUILT_IN, fake))
    techniques.registered.cache_clear()
    try:
        after = predict(config).ranks[0]
    finally:
        monkeypatch.undo()
        techniques.registered.cache_clear()
    assert after.parts["buffers"] == before.parts["buffers"] + 3 * 2**20
    assert (
        after.parts["activations"] == before.parts["activations"] - before.parts["activations"] // 2
    )
    assert after.parts["parameters"] == before.parts["parameters"]


def heavy_tailed_corpus(path: Path, seed: int = 0) -> Path:
    """Mostly short token rows, a few very long ones: the mean batch is far from the worst."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.pareto(2.5, size=600) * 16 + 8, 8, 500).astype(int)
    lengths[rng.choice(600, size=3, replace=False)] = 500  # the tail's longest
    with path.open("w", encoding="utf-8") as out:
        for length in lengths:
            out.write(json.dumps({"tokens": rng.integers(0, 200, size=length).tolist()}) + "\n")
    return path


@pytest.mark.parametrize(
    "batching",
    [{"batch_size": 8}, {"batching": "tokens", "batch_size": None, "tokens_per_batch": 128}],
    ids=["fixed", "tokens"],
)
def test_the_worst_planned_batch_is_the_one_predicted_not_the_mean(
    tmp_path: Path, batching: dict
) -> None:
    data = heavy_tailed_corpus(tmp_path / "tail.jsonl")
    config = config_for(data, max_len=512, max_steps=60, **batching)
    predictor = MemoryPredictor(config, load_corpus(config), BASELINE)
    prediction = predictor.predict(config, config.layout(1))
    worst = prediction.ranks[0].batch
    profile = predictor.profile(config)
    planned = predictor.planned(config, data_ranks=1)[0]
    saved = [profile.whole.bytes(batch.shape) for batch in planned]
    # What the host's kernel caches keep of the distinct shapes run by each batch (the same
    # widest shape later costs more than earlier, until the caches are full).
    seen: set = set()
    kept = []
    for batch in planned:
        seen.add(batch.shape)
        kept.append(profile.kernels.bytes(len(seen)))
    costs = np.array([held + kernels for held, kernels in zip(saved, kept, strict=True)])
    # The predicted batch is where the rank peaks: of the batches within 2% of the costliest,
    # the widest, at its first step...
    near = np.flatnonzero(costs >= (1 - NEAR_PEAK) * costs.max())
    chosen = near[np.argmax(np.array(saved)[near])]
    parts = prediction.ranks[0].parts
    assert profile.whole.bytes(worst.shape) + parts["kernels"] == costs[chosen]
    assert worst.step == planned[chosen].step
    assert costs[chosen] >= (1 - NEAR_PEAK) * costs.max()
    # ...far costlier than the mean planned batch: the tail decides, not the mean.
    assert parts["activations"] >= 2 * np.mean(saved)
    if config.batching == "fixed":  # the batch holding the longest row, padded to it
        widths = [batch.shape.width for batch in planned]
        assert worst.shape.width == max(widths) >= 4 * np.mean(widths)
    else:  # a row over the token budget gets a batch of its own: the most slots of the run
        assert worst.shape.slots == max(batch.shape.slots for batch in planned) > 128


def test_each_stage_holds_the_micro_batches_its_own_schedule_keeps_in_flight(
    corpus: Path,
) -> None:
    # 1F1B over 2 stages and 4 micro-batches: the first stage runs 2 forwards before its first
    # backward, the last one 1; GPipe runs all 4 on both. Same cuts, so the same stage layers.
    common = {"pp": 2, "microbatches": 4, "split_points": ["blocks.1"]}
    one_f_one_b = predict(config_for(corpus, **common), world_size=2).ranks
    gpipe = predict(config_for(corpus, schedule="gpipe", **common), world_size=2).ranks
    for rank, in_flight in ((0, 2), (1, 1)):
        ratio = gpipe[rank].parts["activations"] / one_f_one_b[rank].parts["activations"]
        assert ratio == pytest.approx(4 / in_flight, rel=0.01)
    # Receive buffers for every micro-batch, made before the step: the last stage's for the
    # activations it receives, whatever the schedule; the first keeps its outputs in flight too.
    assert one_f_one_b[1].parts["in_flight"] == gpipe[1].parts["in_flight"] > 0
    assert gpipe[0].parts["in_flight"] > one_f_one_b[0].parts["in_flight"] > 0


def test_a_tensor_split_divides_what_is_saved_between_its_split_layers(corpus: Path) -> None:
    whole = predict(config_for(corpus), world_size=2).ranks[0]
    split = predict(config_for(corpus, tp=2), world_size=2).ranks[0]
    assert split.parts["parameters"] == whole.parts["parameters"] // 2
    # Attention heads and the MLP's hidden layer halve; LayerNorms, residuals and the loss's
    # log-probabilities stay whole on every rank, so the activations fall, but by under half.
    ratio = split.parts["activations"] / whole.parts["activations"]
    assert 0.5 < ratio < 0.85


def test_what_a_call_saves_once_is_not_counted_once_a_row() -> None:
    # Under bf16 autocast a call saves its weights cast to 16 bits once, whatever its rows: a
    # curve per row alone would count them eight times for eight rows.
    import torch

    from shardwise.memory.activations import _whole_call, profile_activations
    from shardwise.memory.batches import BatchShape
    from shardwise.models import RecurrentLM
    from shardwise.models.contract import ModelContract
    from shardwise.precision import Precision

    model = RecurrentLM(vocab_size=64, embed_dim=32, hidden_dim=128, num_layers=1)
    autocast = Precision("bf16", torch.device("cpu")).autocast
    profile = profile_activations(model, ModelContract(), autocast, widest=32)
    assert profile.whole.once > 100_000  # the cast weights: (4*128) x (32+128) x 2 bytes
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.random.fork_rng(), autocast():
        tokens = torch.zeros(8, 32, dtype=torch.long)
        saved, _ = _whole_call(model, ModelContract(), tokens, weights, packed=False)
    assert profile.whole.bytes(BatchShape(rows=8, width=32)) == pytest.approx(saved.bytes, rel=0.05)


def test_a_backward_writing_a_workspace_holds_its_gradients_in_and_out() -> None:
    # The host's view of an LSTM: its backward writes the rest of the largest workspace while
    # it holds the gradient of its block's output and writes that of its input (a block's
    # boundary each). A model whose saved tensors are all written has no such part: its peak
    # is where the backward starts, with every saved tensor still held.
    from shardwise.memory.activations import ActivationProfile, Curve, PieceActivations
    from shardwise.memory.batches import BatchShape
    from shardwise.memory.footprint import base_footprint
    from shardwise.parallel.mesh import Layout
    from shardwise.parallel.parallelism import Parallelism
    from shardwise.parallel.sync import sync_strategy

    def profile(workspace: Curve) -> ActivationProfile:
        block = Curve(a=100.0)
        pieces = tuple(
            PieceActivations((name,), 1000, block, 16, workspace=workspace)
            for name in ("blocks.0", "blocks.1")
        )
        return ActivationProfile(block + block, pieces, 2000, workspace=workspace)

    shape, layout = BatchShape(rows=2, width=10), Layout()
    parallelism = Parallelism(layout, sync_strategy("allreduce"))
    written = base_footprint(profile(Curve()), layout, parallelism, shape, 0)
    assert written.parts["workspace"] == 0
    fused = base_footprint(profile(Curve(a=50.0)), layout, parallelism, shape, 0)
    assert fused.parts["workspace"] == 50 * 20 + 2 * 16 * 20
    assert fused.parts["activations"] == written.parts["activations"] == 2 * 100 * 20
