"""The model contract: how users' models take tokens and give logits, found by one probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.models.contract import PLAIN, ModelContract, contract_for, model_contract
from user_models import OddNames, mask_in_forward, time_major_lstm, time_major_transformer

VOCAB = 40


def _tokens(rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def test_time_major_model_with_hidden_and_flat_log_probs_is_called_as_written() -> None:
    torch.manual_seed(0)
    model = time_major_lstm(VOCAB).eval()
    contract = model_contract(model, "user:lstm", vocab_size=VOCAB)

    assert (contract.time_major, contract.extra_args, contract.output) == (True, 1, 0)
    assert contract.flat and contract.log_probs and contract.vocab_size == VOCAB
    tokens = _tokens()
    by_hand = model(tokens.t(), None)[0].view(tokens.shape[1], tokens.shape[0], VOCAB)
    torch.testing.assert_close(contract(model, tokens), by_hand.transpose(0, 1))
    assert contract.describe() == (
        f"model call: forward(tokens, None), time-major; log-probabilities of {VOCAB} as "
        "[time x batch, vocab] in element 0 of a tuple"
    )


def test_a_time_major_transformer_is_described_with_the_layout_the_probe_found() -> None:
    torch.manual_seed(0)
    model = time_major_transformer(VOCAB).eval()
    contract = model_contract(model, "wlm:transformer", vocab_size=VOCAB)
    assert contract.time_major and not contract.flat and contract.log_probs
    tokens = _tokens()
    torch.testing.assert_close(contract(model, tokens), model(tokens.t()).transpose(0, 1))
    assert contract.describe() == (
        f"model call: forward(tokens), time-major; log-probabilities of {VOCAB} as "
        "[time, batch, vocab] in the output"
    )


@pytest.mark.parametrize("factory", [mask_in_forward, OddNames])
def test_batch_first_models_returning_logits_are_plain(factory: type) -> None:
    model = factory(VOCAB)
    contract = model_contract(model, "user:m", vocab_size=VOCAB)
    assert contract.is_plain and contract.vocab_size == VOCAB and not contract.log_probs


def test_built_ins_are_probed_to_the_plain_call() -> None:
    contract = contract_for(build_model("transformer", 300), "transformer")
    assert contract.is_plain and contract.vocab_size == 300 and contract.keywords == PLAIN.keywords
    assert contract == ModelContract(vocab_size=300)  # what shardwise used to assume for it
    recurrent = contract_for(build_model("gru", 300), "gru", max_len=64)
    assert recurrent.is_plain and recurrent.vocab_size == 300 and not recurrent.log_probs
    assert recurrent.keywords == {"lengths"}  # what its forward takes: no packed rows


@pytest.mark.parametrize("vocab", [2, 9])
def test_a_vocabulary_below_the_probes_ids_is_probed_within_it(vocab: int) -> None:
    # JSONL data with few ids builds models with a small token table and no --vocab-size.
    for model in (build_model("lstm", vocab), OddNames(vocab)):
        assert contract_for(model, "m").vocab_size == vocab


class _Dict(nn.Module):
    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys
        self.inner = OddNames(VOCAB)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.inner(tokens)
        return {key: logits * (i + 1) for i, key in enumerate(self.keys)} | {"aux": logits.sum()}


def test_dict_outputs_take_logits_first_and_ask_when_ambiguous() -> None:
    assert model_contract(_Dict(("hidden", "logits")), "d", vocab_size=VOCAB).output == "logits"
    assert model_contract(_Dict(("scores",)), "d", vocab_size=VOCAB).output == "scores"
    with pytest.raises(ShardwiseError, match="--model-output"):
        model_contract(_Dict(("a", "b")), "d", vocab_size=VOCAB)
    chosen = model_contract(_Dict(("a", "b")), "d", vocab_size=VOCAB, output="b")
    assert chosen.output == "b"
    with pytest.raises(ShardwiseError, match="has no 'c'"):
        model_contract(_Dict(("a", "b")), "d", vocab_size=VOCAB, output="c")


class _Bidirectional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def test_a_model_that_sees_the_future_is_refused() -> None:
    with pytest.raises(ShardwiseError, match="sees the future"):
        model_contract(_Bidirectional(), "bi", vocab_size=VOCAB)


class _MixesRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        # Read batch-first, rows meet in the mean; read time-major, in the running sum.
        return self.head(x + x.mean(dim=0, keepdim=True) + x.cumsum(dim=1))


def test_rows_that_mix_either_way_need_a_declared_layout() -> None:
    with pytest.raises(ShardwiseError, match="--input-layout"):
        model_contract(_MixesRows(), "mix", vocab_size=VOCAB)
    declared = model_contract(_MixesRows(), "mix", vocab_size=VOCAB, input_layout="batch-first")
    assert not declared.time_major


class _Swapped(nn.Module):
    """A batch-first model declared time-major by mistake still gets the declared call."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, VOCAB).float()


def test_a_declared_layout_is_trusted() -> None:
    assert model_contract(_Swapped(), "s", vocab_size=VOCAB, input_layout="time-major").time_major


class _NeedsKeyword(nn.Module):
    def forward(self, tokens: torch.Tensor, *, state: torch.Tensor) -> torch.Tensor:
        return tokens


class _Raises(nn.Module):
    def forward(self, tokens: torch.Tensor, hidden: tuple) -> torch.Tensor:
        return tokens + hidden[0]


class _NoLogits(nn.Module):
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens.sum(), tokens.float().mean(dim=1)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_NeedsKeyword(), "keyword argument 'state'.*give it a default"),
        (_Raises(), r"forward\(tokens, None\) .* raised TypeError"),
        (_NoLogits(), "no tensor shaped like logits"),
    ],
)
def test_what_cannot_be_called_is_one_line_naming_the_fix(model: nn.Module, message: str) -> None:
    with pytest.raises(ShardwiseError, match=message) as caught:
        model_contract(model, "user:m", vocab_size=VOCAB)
    assert "\n" not in str(caught.value)


def test_probing_leaves_training_mode_as_it_was() -> None:
    model = time_major_lstm(VOCAB).train()
    model.encoder.eval()
    model_contract(model, "m", vocab_size=VOCAB)
    assert model.training and model.rnn.training and not model.encoder.training


def test_a_model_too_short_for_max_len_is_refused_before_training() -> None:
    model = mask_in_forward(VOCAB)  # its position table holds 128 positions
    contract_for(model, "user:m", vocab_size=VOCAB, max_len=128)
    with pytest.raises(ShardwiseError, match=r"--max-len 129 tokens .*lower --max-len"):
        contract_for(model, "user:m", vocab_size=VOCAB, max_len=129)


def test_a_stop_during_the_probe_is_a_stop_not_a_verdict_on_the_model() -> None:
    # SIGTERM's handler raises Preempted wherever the launcher is, the model's probe included,
    # which tries each reading of the batch and takes a failure for "not this one".
    from shardwise.handoff import Preempted
    from shardwise.models import build_model
    from shardwise.models.contract import model_contract

    model = build_model("gru", vocab_size=16)
    calls = {"n": 0}

    def stop_on_the_third_call(module: nn.Module, args: tuple) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # inside the layout probe
            raise Preempted(None, None, "SIGTERM")

    model.register_forward_pre_hook(stop_on_the_third_call)
    with pytest.raises(Preempted):
        model_contract(model, "gru", vocab_size=16)
