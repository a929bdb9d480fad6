"""From a TrainConfig to the run's parts: corpus, sampler, model, layout, cut, step budget.

    corpus = load_corpus(config)
    plan = pipeline_cut(config, corpus)              # None without --pp; else the cut that trains
    model = seeded_model(config, corpus.vocab_size)

The preflight, `--dry-run` and every worker build through these functions alone, so what the
launcher checks and prints is what the workers train: the same corpus, the same seeded model,
and the same cut, profiled on the same sample batch and remembered (partition/store.py) so that a
dry run's cut is the run's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from shardwise.config import TrainConfig
from shardwise.config.parallelism import parallelism_from
from shardwise.data.batch import Batch, collate
from shardwise.data.cache import default_cache_dir
from shardwise.data.cost import cost_model_for
from shardwise.data.loader import make_loader
from shardwise.data.prepare import PreparedCorpus, prepare_corpus
from shardwise.data.sampler import BatchRequest, FixedBatchSampler, SamplerPosition
from shardwise.data.token_sampler import TokenBudgetSampler
from shardwise.data.vocabulary import MOST_INFERRED_VOCAB, MOST_VOCAB, check_token_ids
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.handoff import LAUNCHER_PID_ENV
from shardwise.models import BUILTIN_MODELS, build_model
from shardwise.models.contract import ModelContract, contract_for
from shardwise.parallel.faithful import check_faithful_chain
from shardwise.parallel.layer_split import LayerSplit
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelize import layer_split_for
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.stages import model_pieces, stage_starts
from shardwise.parallel.tensor_parallel import PARTS
from shardwise.partition import PipelineCut, cut_stages, shared_cut
from shardwise.partition.store import cut_key, remember_cuts, remembered_cuts
from shardwise.techniques import piece_costs


def load_corpus(config: TrainConfig) -> PreparedCorpus:
    """The run's train and held-out sequences, through the tokenisation cache when enabled.

    Its vocabulary is --vocab-size, or inferred from the ids: up to 65,536 for a built-in
    model; a model of your own is checked against its own output size once built.
    """
    builtin = config.model in BUILTIN_MODELS
    return prepare_corpus(
        config.data,
        config.max_len,
        config.long_sequences,
        config.eval_fraction,
        config.seed,
        cache_dir=default_cache_dir() if config.corpus_cache else None,
        vocab_size=config.vocab_size,
        infer_up_to=MOST_INFERRED_VOCAB if builtin else MOST_VOCAB,
    )


def seeded_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """The model every rank builds alike: the run's seed first, then the factory."""
    torch.manual_seed(config.seed)
    with warnings_shown_once():
        return build_model(config.model, vocab_size)


def warnings_shown_once() -> contextlib.AbstractContextManager:
    """Around building the model: its warnings pass in one process of the run, not in each.

        with warnings_shown_once():
            model = build_model(config.model, vocab_size)

    Our launcher builds the model to probe it before any worker starts, and shows what building
    it warns (torch's nested-tensor note for an nn.TransformerEncoder, say); the workers it
    started (SHARDWISE_LAUNCHER_PID set) build it again in silence. Under the user's torchrun,
    which probes nothing, rank 0 shows them.
    """
    if os.environ.get(LAUNCHER_PID_ENV) or os.environ.get("RANK", "0") != "0":
        return warnings.catch_warnings(action="ignore")
    return contextlib.nullcontext()


def model_call(config: TrainConfig, model: nn.Module) -> ModelContract:
    """How the run calls `model`: the built-ins' plain call, or a user model's probed one.

    contract = model_call(config, seeded_model(config, corpus.vocab_size))
    """
    contract = contract_for(
        model, config.model, max_len=config.max_len, **config.contract_settings()
    )
    if config.pp > 1 and not contract.is_plain:
        raise ShardwiseError(
            f"--pp {config.pp}: pipeline stages pass [batch, time] activations, but model "
            f"{config.model!r} is called otherwise ({contract.describe()}); train it without "
            "--pp, or give it forward(tokens [batch, time]) -> logits"
        )
    return contract


def user_model_call(config: TrainConfig, corpus: PreparedCorpus) -> ModelContract | None:
    """A user model's probed call, its vocabulary checked against the data's ids, before
    workers start (None for the built-ins, whose vocabulary is the run's)."""
    if config.model in BUILTIN_MODELS:
        return None
    contract = model_call(config, seeded_model(config, corpus.vocab_size))
    assert contract.vocab_size is not None  # a probed contract knows its logits' size
    check_token_ids(
        corpus,
        contract.vocab_size,
        who=f"model {config.model!r} gives {contract.vocab_size} logits",
        fix=f"make its factory build {corpus.largest_id + 1} or more (it is given vocab_size=)",
    )
    return contract


def sequence_lengths(corpus: PreparedCorpus) -> np.ndarray:
    """Each training sequence's length, what the samplers plan with."""
    return np.fromiter((len(seq) for seq in corpus.train), dtype=np.int64)


def pipeline_cut(
    config: TrainConfig, corpus: PreparedCorpus, env: DistEnv | None = None
) -> PipelineCut | None:
    """The pipeline cut this run trains with (None for one stage), the same wherever built.

    plan = pipeline_cut(config, corpus)        # in the launcher (preflight, --dry-run)
    plan = pipeline_cut(config, corpus, env)   # in the workers: rank 0's plan on every rank

    Given --split-points it keeps them; otherwise the first profile of this model on this
    sample decides and is remembered, so the dry run and the run cut alike.
    """
    if config.pp == 1:
        return None
    model = seeded_model(config, corpus.vocab_size)
    check_pipeline_split(config, corpus.vocab_size, model)
    sample = profile_sample(config, corpus)
    count = stage_count(config)
    # The techniques in effect that change what pieces hold and take (recompute's blocks).
    degrees = Layout(pp=config.pp, tp=config.tp)
    adjust, adjusted = piece_costs(parallelism_from(config, degrees).entries.values())
    key = cut_key(
        model,
        sample,
        stages=count,
        microbatches=config.microbatches,
        schedule=config.schedule,
        adjusted=adjusted,
    )
    cuts = config.split_points or remembered_cuts(key)

    def make() -> PipelineCut:
        return cut_stages(
            model,
            count,
            sample,
            microbatches=config.microbatches,
            schedule=config.schedule,
            cuts=cuts,
            adjust=adjust,
        )

    plan = make() if env is None else shared_cut(env, make)
    if cuts is None and (env is None or env.is_main):
        remember_cuts(key, plan.cuts)
    return plan


def stage_count(config: TrainConfig) -> int:
    """Stages the model is cut into: its schedule's stages a rank times --pp."""
    return pipeline_schedule(config.schedule).stage_count(config.pp)


def profile_sample(config: TrainConfig, corpus: PreparedCorpus) -> torch.Tensor:
    """The batch a plan profiles: the first `batch_size` training sequences, padded."""
    return collate(corpus.train[: config.fixed_batch_size], step_tokens=1).tokens


def check_pipeline_split(
    config: TrainConfig, vocab_size: int, model: nn.Module | None = None
) -> None:
    """Enough cuttable pieces for --pp stages, split points that name real cut places, and
    pieces that, chained, compute what the model's forward does (`model`: the seeded one)."""
    model = model if model is not None else seeded_model(config, vocab_size)
    pieces = model_pieces(model)
    if stage_count(config) > len(pieces):
        raise ShardwiseError(
            f"--pp {config.pp}: model {config.model!r} has only {len(pieces)} pieces that can "
            f"start a stage ({', '.join(p.name for p in pieces)}); use --pp {len(pieces)} or less"
        )
    if config.split_points is not None:
        stage_starts(model, pieces, config.split_points, stage_count(config))
    check_faithful_chain(model, vocab_size)


def tensor_parallel_split(
    config: TrainConfig, vocab_size: int, contract: ModelContract | None = None
) -> LayerSplit | None:
    """What --tp splits, planned on the seeded model as every worker plans it (None for tp 1).

    split = tensor_parallel_split(config, corpus.vocab_size, contract)
    print(split.describe())   # "widen: column-wise, feeding narrow", ...

    `contract`: the model's call when already probed (default: probed here). Refused
    (ShardwiseError) when nothing would be split: the ranks would repeat the same work.
    """
    if config.tp == 1:
        return None
    model = seeded_model(config, vocab_size)
    return layer_split_for(model, config.tp, PARTS, contract or model_call(config, model))


def build_sampler(
    config: TrainConfig,
    lengths: np.ndarray,
    world_size: int,
    rank: int,
    start: SamplerPosition | None = None,
) -> FixedBatchSampler | TokenBudgetSampler:
    """The sampler `config.batching` names, over sequences of `lengths`, for one data rank."""
    if config.batching == "fixed":
        return FixedBatchSampler(
            lengths,
            config.fixed_batch_size,
            world_size,
            rank,
            config.grad_accum,
            config.seed,
            start,
        )
    return TokenBudgetSampler(
        lengths,
        config.tokens_per_batch,
        world_size,
        rank,
        config.grad_accum,
        config.seed,
        start,
        cost_model=cost_model_for(config.model),
        packing=config.packs_rows,
        sort_window=config.sort_window,
    )


def stream_identity(config: TrainConfig) -> dict[str, object]:
    """What defines the order of the data stream; a resumed run must keep it to stay exact."""
    identity: dict[str, object] = {"batching": config.batching, "seed": config.seed}
    if config.batching == "tokens":
        identity["sort_window"] = config.sort_window
    return identity


def step_groups(
    config: TrainConfig,
    corpus: PreparedCorpus,
    replicas: int,
    replica: int,
    device: torch.device,
    start: SamplerPosition | None = None,
) -> Iterator[list[Batch]]:
    """Each optimizer step's micro-batches for data replica `replica`, from `start` on.

    steps = step_groups(config, corpus, replicas=2, replica=0, device=env.device)
    next(steps)   # config.grad_accum batches, on the device the loader was given
    """
    sampler = build_sampler(config, sequence_lengths(corpus), replicas, replica, start=start)
    batches = iter(
        make_loader(corpus.train, sampler, device, config.num_workers, packing=config.packs_rows)
    )
    # Not a generator function: the sampler is built now, so its errors come before training.
    return ([next(batches) for _ in range(config.grad_accum)] for _ in itertools.count())


# Where a step's plan is an endless stream: stop counting rather than plan forever.
_MOST_STEPS = 10_000_000


def with_step_budget(config: TrainConfig, corpus: PreparedCorpus, world_size: int) -> TrainConfig:
    """`config` with `max_steps` set by `max_tokens` or `epochs` (unchanged when neither), for
    a job of `world_size` training ranks.

        config = with_step_budget(config, corpus, world_size=2)
        config.max_steps       # e.g. 204 for --max-tokens 800000 on the embedded corpus

    Every rank's sampler plans every step alike without communicating, so the step at which
    the budget is spent is known before training: the run takes exactly that many steps, and
    the learning-rate schedule spans the tokens or epochs asked for. Tokens are next-token
    targets over every rank (padding never counts); the step that reaches the budget is the
    last. An epoch is one pass over the training sequences; fractions are allowed.
    """
    if config.max_tokens is None and config.epochs is None:
        return config
    lengths = sequence_lengths(corpus)
    sampler = build_sampler(config, lengths, config.layout(world_size).dp, rank=0)
    # A fixed-batch epoch skips its tail of fewer than one global batch (see FixedBatchSampler).
    tail = sampler.global_batch if isinstance(sampler, FixedBatchSampler) else 1
    steps = _steps_within(
        _step_starts(sampler, config.grad_accum),
        len(lengths),
        tail,
        config.max_tokens,
        config.epochs,
    )
    return config.model_copy(update={"max_steps": steps})


def _step_starts(
    requests: Iterable[BatchRequest], grad_accum: int
) -> Iterator[tuple[tuple[int, int], int]]:
    """(position where the step starts, its tokens), step after step, from rank 0's requests."""
    start = (0, 0)
    for index, request in enumerate(requests):
        if index % grad_accum == 0:  # a step's micro-batches share its facts
            yield start, request.step_tokens
            start = request.position


def _steps_within(
    steps: Iterator[tuple[tuple[int, int], int]],
    samples: int,
    tail: int,
    max_tokens: int | None,
    epochs: float | None,
) -> int:
    count = tokens = 0
    for (epoch, offset), step_tokens in steps:
        if samples - offset < tail:  # no room left in this epoch: the step begins the next
            epoch, offset = epoch + 1, 0
        if epochs is not None and epoch + offset / samples >= epochs:
            break
        count += 1
        tokens += step_tokens
        if (max_tokens is not None and tokens >= max_tokens) or count == _MOST_STEPS:
            break
    return max(count, 1)
