"""One worker's whole job: data, model, run directory, training, and the report.

    env = init_distributed()
    summary = train(TrainConfig(max_steps=50), env)

This is the single training entry point: our own launcher calls it in each worker process, a
user's `torchrun -m shardwise train ...` reaches it through the CLI, and a single process calls it
directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from shardwise.config import TrainConfig
from shardwise.data.cache import default_cache_dir
from shardwise.data.prepare import PreparedCorpus, prepare_corpus
from shardwise.distributed import DistEnv, barrier, broadcast_object
from shardwise.models import build_model
from shardwise.report import format_summary, plot_metrics, write_report, write_summary
from shardwise.run_dir import hold_run_dir, rank_zero_holds_lock, resolve_run_dir
from shardwise.train.export import export_model
from shardwise.train.trainer import Trainer


def train(config: TrainConfig, env: DistEnv) -> dict:
    """Train as described by `config` on this rank; rank 0 writes the report and prints it."""
    torch.manual_seed(config.seed)
    corpus = load_corpus(config)
    model = build_model(config.model, corpus.vocab_size)
    run_dir = Path(str(broadcast_object(str(resolve_run_dir(config)), env)))
    # Usually the launching process holds the run dir; only when the rendezvous picked which
    # node is node 0 does rank 0 learn here that the run is its to hold.
    owns_it = env.is_main and rank_zero_holds_lock(config)
    with hold_run_dir(config, run_dir) if owns_it else contextlib.nullcontext():
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        barrier(env)
        trainer = Trainer(config, env, corpus, model, run_dir)
        result = trainer.fit()
        summary = result.summary
        if env.is_main:
            summary |= export_model(config, trainer.engine, result.checkpoint, run_dir)
            write_summary(run_dir, summary)
            write_report(run_dir, summary, plot_metrics(run_dir))
            print(format_summary(summary), flush=True)
    return summary


def load_corpus(config: TrainConfig) -> PreparedCorpus:
    """The run's train and held-out sequences, through the tokenisation cache when enabled."""
    return prepare_corpus(
        config.data,
        config.max_len,
        config.long_sequences,
        config.eval_fraction,
        config.seed,
        cache_dir=default_cache_dir() if config.corpus_cache else None,
    )
