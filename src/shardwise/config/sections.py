"""How `shardwise train --help` groups the config's fields: the config's own sections, then one
per technique, under the title it declares (techniques/).

    >>> list(SECTIONS)[:2]
    ['What to train on', 'Where and how wide']
"""

from __future__ import annotations

from shardwise.techniques import sections as technique_sections

# The sections of TrainConfig's own fields, in order (the comments in the class body).
# tests/test_cli.py checks that every field is in exactly one section, so a new field cannot go
# missing from the help.
_OWN: dict[str, tuple[str, ...]] = {
    "What to train on": (
        "data",
        "model",
        "vocab_size",
        "input_layout",
        "model_output",
        "max_len",
        "long_sequences",
        "eval_fraction",
        "eval_every",
        "eval_tokens",
        "batching",
        "tokens_per_batch",
        "packing",
        "sort_window",
        "corpus_cache",
    ),
    "Where and how wide": (
        "nproc",
        "device",
        "nnodes",
        "min_nodes",
        "node_rank",
        "rdzv_endpoint",
        "dp",
        "pp",
        "tp",
        "timeout_s",
        "heartbeat_timeout_s",
        "job_secret_file",
        "memory_budget",
    ),
    "Optimisation": (
        "max_steps",
        "max_tokens",
        "epochs",
        "batch_size",
        "grad_accum",
        "clip_norm",
        "on_nonfinite",
        "on_divergence",
        "lr",
        "weight_decay",
        "warmup_steps",
        "min_lr_ratio",
        "seed",
    ),
    "Run directory, checkpoints, reporting": (
        "run_dir",
        "checkpoint_every",
        "checkpoint_async",
        "keep_checkpoints",
        "resume",
        "overwrite",
        "max_restarts",
        "preempt_grace_s",
        "log_every",
        "num_workers",
        "tensorboard",
        "sample_bytes",
    ),
}

_WIDTH = 2  # the techniques' sections follow "Where and how wide"
SECTIONS: dict[str, tuple[str, ...]] = {
    **dict(list(_OWN.items())[:_WIDTH]),
    **technique_sections(),
    **dict(list(_OWN.items())[_WIDTH:]),
}
