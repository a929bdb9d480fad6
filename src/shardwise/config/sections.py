"""How `shardwise train --help` groups the config's fields."""

from __future__ import annotations

# The sections of TrainConfig, in order (the comments in the class body): `shardwise train
# --help` groups its flags under these titles. tests/test_cli.py checks that every field is in
# exactly one section, so a new field cannot go missing from the help.
SECTIONS: dict[str, tuple[str, ...]] = {
    "What to train on": (
        "data",
        "model",
        "max_len",
        "long_sequences",
        "eval_fraction",
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
        "node_rank",
        "rdzv_endpoint",
        "dp",
        "pp",
        "tp",
        "microbatches",
        "schedule",
        "split_points",
        "sync",
        "sync_every",
        "sync_warmup_steps",
        "outer_lr",
        "outer_momentum",
        "outer_bf16",
        "grad_compression",
        "powersgd_rank",
        "powersgd_warmup_steps",
        "bucket_mb",
        "timeout_s",
    ),
    "Optimisation": (
        "max_steps",
        "batch_size",
        "grad_accum",
        "precision",
        "clip_norm",
        "lr",
        "weight_decay",
        "warmup_steps",
        "min_lr_ratio",
        "seed",
    ),
    "Run directory, checkpoints, reporting": (
        "run_dir",
        "checkpoint_every",
        "resume",
        "overwrite",
        "log_every",
        "num_workers",
        "tensorboard",
        "sample_bytes",
    ),
}
