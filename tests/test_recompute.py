"""Activation recompute changes what is kept, never what is computed: bit-exact losses, gradients
and weights against no recompute, the same names, and fewer bytes held in backward."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import shardwise
from helpers import final_weights, quick_config
from parallel_cases import (
    CUTS,
    layout_for,
    parallelism,
    step_batches,
    tiny_model,
    whole_tensors,
)
from ranks import run_ranks
from shardwise.cli import main
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.loss import token_loss_sum
from shardwise.models import TransformerLM
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.recompute import (
    MATMULS,
    SELECTIVE_KEPT,
    Recompute,
    apply_recompute,
    block_names,
)
from shardwise.partition import PieceCost, profile_pieces
from shardwise.partition.cut import cut_from_costs
from shardwise.techniques import Footprint
from shardwise.techniques.recompute import RECOMPUTE
from user_models import MaskInBlocks, OddNames

pytestmark = pytest.mark.timeout(120)

MODELS: dict[str, Callable[[], nn.Module]] = {
    "lstm": lambda: tiny_model("lstm"),
    "gru": lambda: tiny_model("gru"),
    "transformer": lambda: tiny_model("transformer"),
    "transformer with dropout": lambda: TransformerLM(
        dim=16, num_layers=3, num_heads=2, dropout=0.2
    ),
    "user model": lambda: MaskInBlocks(dim=16, layers=3),
}
CASES = [(kind, "full") for kind in MODELS]
CASES += [(kind, "selective") for kind in MODELS if kind not in ("lstm", "gru")]


def logits(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    if isinstance(model, MaskInBlocks):
        return model(tokens)
    return model(tokens, lengths)  # a recurrent model packs its rows (their own kernels)


def adamw_steps(model: nn.Module) -> tuple[list[torch.Tensor], list[dict], dict]:
    """Each step's loss and gradients, and the weights after them, for 4 AdamW steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)  # dropout's masks
    losses, gradients = [], []
    for batch in step_batches():
        loss = token_loss_sum(logits(model, batch.tokens, batch.lengths), batch.targets)
        (loss / batch.step_tokens).backward()
        losses.append(loss.detach())
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return losses, gradients, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_recompute_trains_bit_identically_to_storing(kind: str, mode: str) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]()
    recomputing = apply_recompute(copy.deepcopy(model), Recompute(mode))
    want, got = adamw_steps(model), adamw_steps(recomputing)
    for step, (a, b) in enumerate(zip(want[0], got[0], strict=True)):
        assert torch.equal(a, b), f"loss of step {step}"
    for step, (a, b) in enumerate(zip(want[1], got[1], strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"gradient of {name} at step {step}"
    for name in want[2]:
        assert torch.equal(want[2][name], got[2][name]), name


def test_recompute_every_second_block_recomputes_blocks_1_and_3_alike() -> None:
    torch.manual_seed(0)
    model = TransformerLM(dim=16, num_layers=4, num_heads=2)
    recomputing = apply_recompute(copy.deepcopy(model), Recompute("full", every=2))
    hooked = [
        n for n in block_names(recomputing) if recomputing.get_submodule(n)._forward_pre_hooks
    ]
    assert hooked == ["blocks.1", "blocks.3"]
    want, got = adamw_steps(model), adamw_steps(recomputing)
    assert all(torch.equal(want[2][name], got[2][name]) for name in want[2])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_names_and_state_dict_keys_stay_the_model_s_own(mode: str) -> None:
    model = tiny_model("transformer")
    names = [name for name, _ in model.named_modules()]
    keys = list(model.state_dict())
    apply_recompute(model, Recompute(mode))
    assert [name for name, _ in model.named_modules()] == names
    assert list(model.state_dict()) == keys
    model.load_state_dict(tiny_model("transformer").state_dict())  # a checkpoint loads as is


def held_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes a forward leaves for its backward: what autograd saves, and what recompute keeps
    (each recomputed block's input)."""
    held: dict[int, int] = {}

    def hold(tensor: torch.Tensor) -> torch.Tensor:
        held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def hold_input(module: nn.Module, args: tuple) -> None:
        hold(args[0])

    hooks = [block.register_forward_pre_hook(hold_input) for block in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(hold, lambda tensor: tensor):
        out = model(tokens)
    for hook in hooks:
        hook.remove()
    out.sum().backward()  # what was held is enough to finish
    return sum(held.values())


def test_full_recompute_holds_at_least_half_fewer_bytes_on_a_long_sequence() -> None:
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=64, dim=64, num_layers=4, num_heads=4, max_len=1024)
    tokens = torch.randint(0, 64, (2, 1024))
    storing = held_bytes(model, tokens)
    recomputing = held_bytes(apply_recompute(model, Recompute("full")), tokens)
    assert recomputing * 2 <= storing, (recomputing, storing)


class MatmulBytes(TorchDispatchMode):
    """Bytes of the matmul outputs of what runs under it: what selective recompute keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in MATMULS:
            self.bytes += out.numel() * out.element_size()
        return out


def test_selective_keeps_about_the_share_its_cost_says() -> None:
    torch.manual_seed(0)
    block = TransformerLM(dim=64, num_layers=1, num_heads=4).blocks[0]
    x = torch.randn(4, 128, 64, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    with MatmulBytes() as matmuls:
        block(x)
    share = matmuls.bytes / sum(saved.values())
    assert 0.4 <= share <= 0.65 and abs(share - SELECTIVE_KEPT) < 0.15, share


def test_selective_refuses_a_block_that_writes_into_its_matmul_outputs(
    corpus: Path, tmp_path: Path
) -> None:
    # nn.GRU's CPU kernel adds into its matmul outputs through views PyTorch's selective
    # checkpointing does not watch: kept, its gradients would come out wrong without a word.
    model = apply_recompute(tiny_model("gru"), Recompute("selective"))
    batch = step_batches()[0]
    with pytest.raises(ShardwiseError, match=r"blocks\.0 changes a matmul output in place"):
        model(batch.tokens, batch.lengths)
    # A run's worker says so in one line (quick_config trains a GRU).
    with pytest.raises(ShardwiseError) as caught:
        shardwise.run(quick_config(corpus, tmp_path / "run", nproc=1, recompute="selective"))
    assert str(caught.value) == (
        "--recompute selective: blocks.0 changes a matmul output in place (aten::add_.Tensor), "
        "so it cannot be kept for the backward; use --recompute full"
    )


def test_a_model_without_named_blocks_is_refused_in_one_line() -> None:
    with pytest.raises(ShardwiseError) as caught:
        apply_recompute(OddNames(), Recompute("full"))
    message = str(caught.value)
    assert "OddNames names no blocks" in message and "layer_names()" in message
    assert "\n" not in message


def test_cost_full_holds_less_and_computes_more() -> None:
    footprint = Footprint(
        parts={"activations": 4_000 + 500},  # 4 blocks of 1,000 bytes, and the head's 500
        layout=None,
        activations_per_block=1_000,
        blocks=4,
        boundary_bytes=100,
    )
    full = RECOMPUTE.cost(Recompute("full"), footprint)
    # 4 inputs of 100 kept, one block's 1,000 made again: 4,500 -> 1,900.
    assert full.memory["activations"] == 1_900 - 4_500
    assert full.step_flops_factor == pytest.approx(1 / 3)
    half = RECOMPUTE.cost(Recompute("full", every=2), footprint)
    assert full.memory["activations"] < half.memory["activations"] < 0
    assert 0 < half.step_flops_factor < full.step_flops_factor
    selective = RECOMPUTE.cost(Recompute("selective"), footprint)
    assert full.memory["activations"] < selective.memory["activations"] < 0
    assert 0 < selective.step_flops_factor < full.step_flops_factor


def test_the_cut_planner_holds_less_and_takes_longer_under_recompute() -> None:
    def piece(name: str, activations: int) -> PieceCost:
        return PieceCost((name,), 0.01, 10, 40, activations, output_bytes=100)

    blocks = [piece(f"blocks.{i}", 1_000) for i in range(4)]
    costs = [piece("embed", 100), *blocks, piece("head", 500)]
    adjusted = Recompute("full").piece_costs(costs)
    assert [c.activation_bytes for c in adjusted] == [100, 100, 100, 100, 100, 500]
    recomputed = cut_from_costs(adjusted, 2, microbatches=4, starts=[0, 3, 6])
    plain = cut_from_costs(costs, 2, microbatches=4, starts=[0, 3, 6])
    for before, after in zip(plain.stages, recomputed.stages, strict=True):
        assert after.memory_bytes < before.memory_bytes
        assert after.time_s > before.time_s
    # A block's input is what the piece before it passes on, as the profile measures it.
    measured = profile_pieces(tiny_model("transformer"), torch.zeros(2, 8, dtype=torch.long), 1)
    assert [c.output_bytes for c in measured[:2]] == [2 * 8 * 16 * 4] * 2


def test_one_process_run_through_the_public_entry_matches_and_records_it(
    corpus: Path, tmp_path: Path
) -> None:
    runs = {}
    for mode in ("none", "full"):
        config = quick_config(corpus, tmp_path / mode, nproc=1, recompute=mode)
        runs[mode] = shardwise.run(config)
    assert runs["full"].final_train_loss == runs["none"].final_train_loss
    weights = {mode: final_weights(tmp_path / mode) for mode in runs}
    assert all(torch.equal(w, weights["none"][name]) for name, w in weights["full"].items())
    recorded = {
        mode: json.loads((tmp_path / mode / "summary.json").read_text())["parallelism"]
        for mode in runs
    }
    assert recorded["full"]["recompute"] == {"mode": "full", "every": 1}
    assert "recompute" not in recorded["none"]


def test_the_cli_dry_run_shows_it_and_refuses_every_without_full(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["train", "--data", str(corpus), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert main([*flags, "--recompute", "full", "--recompute-every", "2"]) == 0
    assert "recompute: full, every 2nd block (blocks 1, 3, ...)" in capsys.readouterr().out
    assert main([*flags, "--recompute-every", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--recompute-every 2 has no effect with --recompute none (the default)" in err


def test_a_resume_may_turn_it_on_or_off() -> None:
    from shardwise.train.resume import REFUSED  # the rules a resume is checked by

    assert not {"recompute", "recompute_every"} & REFUSED.keys()


def recompute_layouts(env: DistEnv) -> dict[Any, Any]:
    """Weights after 4 steps on a 2-stage pipeline, a 2-way tensor split and 2 DDP replicas,
    per mode, and the blocks of this rank's part that recompute."""
    results = {}
    for sizes in ({"pp": 2}, {"tp": 2}, {"dp": 2}):
        layout = layout_for(env, **sizes)
        for mode in ("none", "full", "selective"):
            setting = parallelism(
                layout, cuts=CUTS.get(layout.pp, []), microbatches=4, length_bucket=1
            )
            if mode != "none":
                setting = dataclasses.replace(setting, entries={"recompute": Recompute(mode)})
            model = parallelize(tiny_model("transformer"), setting, env)
            part = model.part
            hooked = [n for n in block_names(part) if part.get_submodule(n)._forward_pre_hooks]
            results[tuple(sizes), mode, "recomputed"] = hooked
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for batch in step_batches():
                model.forward_backward(batch.tokens, batch.targets, batch.step_tokens)
                optimizer.step()
                optimizer.zero_grad()
            results[tuple(sizes), mode] = whole_tensors(model.state_dict())
    return results


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_recompute_on_a_stage_on_split_blocks_and_under_ddp_equals_storing() -> None:
    stages = [["blocks.0"], ["blocks.1", "blocks.2"]]  # cut at blocks.1
    for index, rank in enumerate(run_ranks(recompute_layouts, 2, timeout_s=150)):
        for mode in ("full", "selective"):
            assert rank[("pp",), mode, "recomputed"] == stages[index]
            for whole in ("tp", "dp"):
                assert rank[(whole,), mode, "recomputed"] == ["blocks.0", "blocks.1", "blocks.2"]
        assert rank[("pp",), "none", "recomputed"] == []
        for key, state in rank.items():
            sizes, mode = key[:2]
            if mode == "none" or len(key) > 2:
                continue
            want = rank[sizes, "none"]
            assert state.keys() == want.keys()
            for name in want:
                assert torch.equal(state[name], want[name]), (sizes, mode, name)


def test_the_dry_run_s_pipeline_plan_counts_recompute(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def stage_mib(*flags: str) -> list[float]:
        command = ["train", "--data", str(corpus), "--run-dir", str(tmp_path / "run")]
        command += ["--model", "transformer", "--pp", "2", "--nproc", "2", "--dry-run"]
        command += ["--schedule", "gpipe"]  # every stage holds all 4 micro-batches
        assert main([*command, "--split-points", "blocks.1", *flags]) == 0
        table = re.findall(r"^\d+ +\S.* ([\d.]+) MiB$", capsys.readouterr().out, re.MULTILINE)
        return [float(mib) for mib in table]  # the plan's rows: stage, layers, ..., memory

    # Under 1F1B the last stage holds one micro-batch, and recompute, making one block's
    # activations again beside what it keeps, holds more there, as the plan would say.
    storing, recomputing = stage_mib(), stage_mib("--recompute", "full")
    assert len(storing) == len(recomputing) == 2
    assert all(r < s for r, s in zip(recomputing, storing, strict=True)), (storing, recomputing)
