"""A parameter server's whole job in an asynchronous run: build its shard, serve, leave.

    serve_parameters(config, env, run)   # on the world's last --ps ranks, instead of training

The server builds the same seeded model as the workers and keeps only its share of the
parameters (`assign_shards`, the same split the workers make), with the loop's optimizer and
learning-rate schedule over them, so one worker at --max-staleness 0 trains exactly as one
process would.
"""

from __future__ import annotations

from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.optim import build_optimizer
from shardwise.parallel.sync.exchange import Channel, Inbox, assign_shards
from shardwise.parallel.sync.param_server import ParameterServer
from shardwise.parallel.sync.ps_links import AsyncRun
from shardwise.train.build import load_corpus, seeded_model, with_step_budget
from shardwise.train.lr_schedule import warmup_cosine


def serve_parameters(config: TrainConfig, env: DistEnv, exchange: AsyncRun) -> dict:
    """Serve this rank's shard until every worker has been told to stop; no summary (empty)."""
    assert exchange.is_server, "a parameter server's rank only"
    corpus = load_corpus(config)
    config = with_step_budget(config, corpus, len(exchange.workers))
    model = seeded_model(config, corpus.vocab_size)
    params = [param for param in model.parameters() if param.requires_grad]
    shards = assign_shards([param.numel() for param in params], len(exchange.servers))
    positions = shards[exchange.servers.index(exchange.rank)]
    shard = [params[i].detach().clone() for i in positions]
    optimizer = build_optimizer(shard, config)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    server = ParameterServer(
        shard,
        optimizer,
        scheduler,
        exchange.workers,
        config.max_steps,
        config.max_staleness,
        config.clip_norm,
        positions,
        len(params),
    )
    channel = Channel(exchange.links, exchange.timeout_s)
    server.serve(channel, Inbox(channel, exchange.workers, sum(t.numel() for t in shard)))
    for worker, why in sorted(server.lost.items()):
        print(
            f"shardwise: parameter server {exchange.rank} lost worker {worker} ({why})", flush=True
        )
    return {}
