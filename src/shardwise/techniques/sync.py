"""Synchronisation of data-parallel replicas: how they agree (`--sync`) and its settings.

    >>> [setting.name for setting in SYNC.settings][:3]
    ['sync', 'sync_every', 'sync_warmup_steps']

The strategies themselves live in parallel/sync/ (one module each); this declares what the run's
settings say about them: the flags, the combinations that cannot work, what a resume may
change, and what synchronisation costs a rank.
"""

from __future__ import annotations

from typing import Any, Literal

from shardwise.techniques.base import Beside, Cost, Footprint, Setting, Technique

# parallel/sync's SYNC_STRATEGIES by name (tests/test_techniques.py checks that they agree).
STRATEGIES = ("allreduce", "local-sgd", "diloco", "async")
LOCAL_STEPS = ("local-sgd", "diloco")


def _sync(config: Any) -> str:
    return f"--sync {config.sync}"


def _local_steps(config: Any) -> bool:
    return config.sync in LOCAL_STEPS


def _diloco(config: Any) -> bool:
    return config.sync == "diloco"


def _async(config: Any) -> bool:
    return config.sync == "async"


def _powersgd(config: Any) -> bool:
    return config.grad_compression == "powersgd"


def _compression(config: Any) -> str:
    return f"--grad-compression {config.grad_compression}"


def _whole_model_allreduce(config: Any) -> bool:
    return config.sync == "allreduce" and config.pp * config.tp == 1


_LOCAL = "drop it, or use --sync local-sgd or diloco"
_DILOCO = "drop it, or use --sync diloco"
_POWERSGD = "drop it, or add --grad-compression powersgd"
_OUTER = "the outer optimizer's settings are part of the run"

SETTINGS = (
    Setting(
        "sync",
        Literal[STRATEGIES],
        "allreduce",
        "How data-parallel replicas agree: allreduce averages gradients every step; "
        "local-sgd averages parameters every --sync-every steps; diloco feeds that average to "
        "an outer Nesterov SGD; async pushes gradients to --ps parameter servers without "
        "waiting for the other workers.",
        resume="the checkpoint holds another synchronisation strategy's state",
    ),
    Setting(
        "sync_every",
        int,
        8,
        "Optimizer steps between parameter exchanges (local-sgd, diloco).",
        {"ge": 1},
        _local_steps,
        _sync,
        "local-sgd's and diloco's steps between exchanges",
        _LOCAL,
        resume="replicas would meet at other steps, mid-period state would not fit",
    ),
    Setting(
        "sync_warmup_steps",
        int,
        0,
        "Steps of every-step gradient all-reduce before local steps begin "
        "(local-sgd, diloco: post-local SGD).",
        {"ge": 0},
        _local_steps,
        _sync,
        "local-sgd's and diloco's steps of all-reduce first",
        _LOCAL,
        resume="replicas would start their local steps at another step",
    ),
    Setting(
        "sync_groups",
        Literal["all", "node"],
        "all",
        "node: local-sgd and diloco average gradients every step among the "
        "replicas on one machine and meet across machines every --sync-every steps.",
        read_when=_local_steps,
        ignored_by=_sync,
        purpose="local-sgd's and diloco's meetings split by machine",
        fix=_LOCAL,
        resume="replicas would meet in other groups than the saved state's",
    ),
    Setting(
        "outer_lr",
        float,
        0.7,
        "DiLoCo's outer learning rate.",
        {"gt": 0},
        _diloco,
        _sync,
        "diloco's outer learning rate",
        _DILOCO,
        resume=_OUTER,
    ),
    Setting(
        "outer_momentum",
        float,
        0.9,
        "DiLoCo's outer Nesterov momentum (0: plain outer SGD).",
        {"ge": 0, "lt": 1},
        _diloco,
        _sync,
        "diloco's outer momentum",
        _DILOCO,
        resume=_OUTER,
    ),
    Setting(
        "outer_bf16",
        bool,
        False,
        "Send DiLoCo's averaged pseudo-gradient in bfloat16.",
        read_when=_diloco,
        ignored_by=_sync,
        purpose="diloco's outer exchange in bfloat16",
        fix=_DILOCO,
    ),
    Setting(
        "grad_compression",
        Literal["none", "bf16", "fp16", "powersgd"],
        "none",
        "Compress --sync allreduce's gradients through DDP comm hooks (whole-model replicas only).",
        resume="the gradients the replicas average would change, and PowerSGD's state",
    ),
    Setting(
        "powersgd_rank",
        int,
        4,
        "Rank of PowerSGD's low-rank gradient factors.",
        {"ge": 1},
        _powersgd,
        _compression,
        "PowerSGD's rank",
        _POWERSGD,
        resume="the checkpoint's PowerSGD factors have the saved rank",
    ),
    Setting(
        "powersgd_warmup_steps",
        int,
        10,
        "Uncompressed steps before PowerSGD starts (PyTorch needs at least 2).",
        {"ge": 2},
        _powersgd,
        _compression,
        "PowerSGD's uncompressed steps",
        _POWERSGD,
        resume="PowerSGD would start compressing at another step",
    ),
    Setting(
        "ps",
        int,
        0,
        "Parameter servers for --sync async: extra processes beside the --nproc "
        "workers, each holding a share of the parameters and their optimizer.",
        {"ge": 0},
        own_loop=False,  # the launcher starts the servers
    ),
    Setting(
        "max_staleness",
        int,
        32,
        "--sync async: how many updates a worker may run ahead of the slowest "
        "before it waits (0: synchronous rounds).",
        {"ge": 0},
        _async,
        _sync,
        "how far --sync async's workers may run ahead",
        "drop it, or use --sync async --ps 1",
        own_loop=False,
    ),
    Setting(
        "bucket_mb",
        float,
        25.0,
        "Megabytes of gradients per DDP all-reduce bucket.",
        {"gt": 0},
        _whole_model_allreduce,
        lambda c: _sync(c) if c.sync != "allreduce" else f"--pp {c.pp} --tp {c.tp}",
        "the size of DDP's gradient buckets, which only --sync allreduce over whole-model "
        "replicas uses",
    ),
)


def check(config: Any) -> None:
    """Refuse synchronisation settings that cannot work together (ValueError for pydantic)."""
    if config.grad_compression != "none" and config.sync != "allreduce":
        raise ValueError(
            f"--grad-compression {config.grad_compression} compresses --sync allreduce's "
            f"gradients; --sync {config.sync} sends parameters: drop --grad-compression"
        )
    if config.grad_compression != "none" and config.pp * config.tp > 1:
        raise ValueError(
            "--grad-compression works through DDP, which only whole-model replicas use; "
            "drop it, or use --pp 1 --tp 1"
        )
    if config.sync != "allreduce" and config.tp > 1:
        raise ValueError(
            f"--sync {config.sync} does not average tensor-parallel shards yet; use --tp 1 "
            "or --sync allreduce"
        )
    _check_async(config)
    if config.sync != "allreduce" and config.precision == "fp16":
        raise ValueError(
            f"--sync {config.sync} lets replicas step apart, so their fp16 loss scales would "
            "drift apart; use --precision bf16 or --sync allreduce"
        )
    if config.elastic:
        range_ = f"--nnodes {config.min_nodes}:{config.nnodes}"
        if config.sync != "allreduce":
            raise ValueError(
                f"{range_} does not work with --sync (only allreduce's state reshards onto fewer)"
            )
        if config.grad_compression == "powersgd":
            raise ValueError(
                f"{range_} does not work with --grad-compression (PowerSGD keeps one error "
                "feedback per replica)"
            )


_SERVER_STATE = "the servers hold the optimizer state, which checkpoints do not keep yet"


def _check_async(config: Any) -> None:
    """Parameter servers serve --sync async, on one machine, whole models, without resume."""
    if config.sync != "async":
        if config.ps:
            raise ValueError(f"--ps {config.ps} serves --sync async: drop --ps, or add it")
        return
    if config.ps < 1:
        raise ValueError("--sync async needs parameter servers: add --ps 1 (or more)")
    if config.eval_every:  # its workers never meet mid-run
        raise ValueError(
            "--eval-every needs workers that meet between steps; --sync async evaluates "
            "once, at the end: drop --eval-every"
        )
    refusals = {
        "--pp": (config.pp > 1, "workers hold whole models"),
        "--nnodes": (config.nnodes > 1, "servers and workers run on one machine for now"),
        "--checkpoint-every": (config.checkpoint_every > 0, _SERVER_STATE),
        "--resume": (config.resume is not None, _SERVER_STATE),
    }
    for flag, (refused, reason) in refusals.items():
        if refused:
            raise ValueError(f"--sync async does not work with {flag} yet ({reason}); drop {flag}")


def entry(config: Any, layout: Any) -> Any:
    """The run's strategy object, with its settings."""
    from dataclasses import fields

    from shardwise.parallel.sync import SyncOptions, sync_strategy

    # SyncOptions' fields are these settings (and the run's timeout_s), by the same names.
    options = SyncOptions(**{f.name: getattr(config, f.name) for f in fields(SyncOptions)})
    return sync_strategy(config.sync, options)


def cost(strategy: Any, footprint: Footprint) -> Cost:
    """Per step: gradients travel twice (a ring all-reduce sends 2(n-1)/n of them); DDP's
    buckets are the gradients themselves (gradient_as_bucket_view), so plain all-reduce adds
    no memory; a compression hook adds its copy of a gradient (half of it in 16 bits, and
    PowerSGD's error feedback, the whole). The averaging strategies keep a flat copy to average
    and send parameters every H."""
    replicas = footprint.layout.replicas
    gradients = footprint.parts.get("gradients", 0)
    if replicas == 1:
        return Cost()
    ring = 2 * (replicas - 1) * gradients // replicas
    if strategy.name == "allreduce":
        compression = getattr(strategy.options, "grad_compression", "none")
        copy = {"none": 0, "powersgd": gradients}.get(compression, gradients // 2)
        return Cost(memory={"buffers": copy}, step_bytes=ring)
    every = max(getattr(strategy.options, "sync_every", 1), 1)
    return Cost(memory={"buffers": gradients}, step_bytes=ring // every)


def warm(strategy: Any, layout: Any) -> None:
    """The strategy's code, once on a toy before the memory baseline (its `warm_up`)."""
    strategy.warm_up(layout)


def beside(config: Any) -> Beside | None:
    """--sync async's parameter servers, started beside the workers (none otherwise). Every
    process joins their run (workers meet through their links), and a worker other than the
    first may leave it: the others train on."""
    if not _async(config) or not config.ps:
        return None
    servers = int(config.ps)
    doing = "holding the parameters and optimizer state (--sync async)"

    def join(device: str, timeout_s: float) -> tuple[Any, Any]:
        from shardwise.parallel.sync.ps_links import join_async_run

        return join_async_run(device, timeout_s, servers)

    def expendable(world_size: int) -> frozenset[int]:
        return frozenset(range(1, world_size - servers))

    return Beside(servers, "parameter server(s)", doing, join, expendable)


def refuses_resume(saved: Any, saved_world_size: int, layout: Any) -> str | None:
    """PowerSGD's error feedback is each replica's own, and runs on whole-model replicas only,
    so a checkpoint holding it resumes over as many replicas as wrote it."""
    if saved.grad_compression != "powersgd" or saved_world_size == layout.replicas:
        return None
    return (
        f"it holds PowerSGD's error feedback of {saved_world_size} data-parallel replicas, "
        f"this run has {layout.replicas} (each replica's own would be lost or missing); resume "
        f"with {saved_world_size} replicas, or start a new run"
    )


SYNC = Technique(
    name="sync",
    title="Synchronisation of data-parallel replicas",
    settings=SETTINGS,
    check=check,
    entry=entry,
    cost=cost,
    warm=warm,
    beside=beside,
    refuses_resume=refuses_resume,
)
