"""The typed training configuration: every field, its help text and its rules.

    config = TrainConfig(max_steps=50, pp=2)
    config.layout(4).dp  # 2

Every field carries its own help text: the CLI builds its flags from these fields, so the TOML
keys, the flags and `shardwise train --help` can never drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomli_w
from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from shardwise.config.data_settings import DataSettings
from shardwise.config.rules import (
    check_elastic_rules,
    check_no_effect_rules,
    forget_old_batch_size,
    parse_endpoint,
    split_node_range,
    unread_settings,
)
from shardwise.memory.sizes import parse_size
from shardwise.techniques import Setting, registered, settings

if TYPE_CHECKING:
    from shardwise.parallel.mesh import Layout

# Measured at equal tokens (benchmarks/recipes.py, README "Defaults, and the measurements"):
# recurrent models gain from a higher peak rate, the Transformer loses.
RECURRENT_LR = 8e-3
OTHER_LR = 3e-3
DEFAULT_BATCH_SIZE = 16  # --batching fixed's sequences per rank when --batch-size is not given
# Validation context of a run's recorded settings (TrainConfig.from_record).
_RECORDED = "recorded"
# Settings that name files: relative to the working directory, so recorded absolute.
_PATHS = ("data", "job_secret_file")


# allow_inf_nan: no float setting means anything as NaN or inf (--lr inf, --timeout-s nan).
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _technique_field(setting: Setting) -> tuple[Any, Any]:
    extra = {"metavar": setting.metavar} if setting.metavar else None
    field = Field(
        setting.default, description=setting.help, json_schema_extra=extra, **setting.limits
    )
    return setting.type, field


# The registered techniques' settings (techniques/), as fields: flags, TOML keys and help come
# from their declarations like every other field's.
TechniqueSettings = create_model(
    "TechniqueSettings",
    __config__=_STRICT,
    **{name: _technique_field(setting) for name, setting in settings().items()},
)


class TrainConfig(TechniqueSettings, DataSettings):  # type: ignore[misc,valid-type]
    """Everything one training run needs; the resolved copy is saved as RUN_DIR/config.toml."""

    model_config = _STRICT

    # Where and how wide.
    nproc: int | None = Field(
        None,
        ge=1,
        description="Worker processes on this machine. Default: every GPU; on CPU the ranks "
        "--dp x --pp x --tp need, else 2.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when a GPU is present."
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="Machines taking part (multi-node runs): N, or MIN:MAX, an elastic range: "
        "after losing machines the rest restart from the newest checkpoint on as few as MIN, "
        "with the same global batch (each rank accumulates more).",
        json_schema_extra={"metavar": "N|MIN:MAX"},
    )
    min_nodes: int | None = Field(
        None, ge=1, description="Fewest machines the run goes on with; --nnodes MIN:MAX sets it."
    )
    node_rank: int | None = Field(
        None, ge=0, description="This machine's rank; implies static rendezvous at the endpoint."
    )
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of the rendezvous. Default: a free local port."
    )
    dp: int | None = Field(
        None, ge=1, description="Data-parallel replicas. Default: world size / (pp x tp)."
    )
    pp: int = Field(1, ge=1, description="Pipeline stages: the model is cut into this many parts.")
    tp: int = Field(1, ge=1, description="Tensor-parallel shards of each large layer.")
    timeout_s: float = Field(
        300.0,
        ge=1,  # below a second not even the rendezvous completes
        le=86_400,  # timedelta and the communication libraries overflow long before inf
        description="Seconds before a missing or hung peer becomes an error (1 to 86400).",
    )
    heartbeat_timeout_s: float = Field(
        15.0,
        ge=0,
        description="Seconds a rank may miss its heartbeat before it counts as hung and the "
        "group is restarted or stopped, however long a step takes (0: off).",
    )
    job_secret_file: str | None = Field(
        None,
        description="File (yours, mode 600) holding the secret every node's processes sign the "
        "job's store with; several nodes need it or SHARDWISE_JOB_SECRET. One node: made afresh.",
    )
    memory_budget: int | None = Field(
        None,
        gt=0,
        description="Memory each rank may use at its peak, e.g. 6GiB, 512MB or bytes: a run "
        "predicted over it is refused before any worker starts, naming changes that fit. "
        "Default: on a GPU the device's memory; on CPU this machine's (its cgroup's limit, else "
        "MemTotal), shared by its ranks.",
        json_schema_extra={"metavar": "SIZE"},
    )
    # Optimisation.
    max_steps: int = Field(300, ge=1, description="Optimizer steps to train for.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Train this many tokens (next-token targets over all ranks, padding not "
        "counted) instead of --max-steps; the LR schedule spans them.",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Train this many passes over the training data (fractions allowed) instead "
        "of --max-steps; the LR schedule spans them.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per rank per micro-step, --batching fixed only (default 16); "
        "token batching sizes its batches by --tokens-per-batch.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-steps accumulated per optimizer step.")
    clip_norm: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this value (0: no clipping)."
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient norm is NaN or inf, before the optimizer "
        "applies it: stop ends the run with an error naming the step and ranks; skip drops its "
        "gradients (the step count, LR schedule and data still advance) and counts it in "
        "metrics.jsonl and summary.json. Under fp16 an inf gradient with a finite loss is the "
        "loss scaler's to skip.",
    )
    on_divergence: Literal["stop", "warn"] = Field(
        "stop",
        description="A loss that stays a spike (3x its running level) for 5 metrics rows in a "
        "row and ends above a uniform guess's (log vocabulary): stop ends the run with an error "
        "naming the step; warn only says so once per spike, as every spike does.",
    )
    lr: float = Field(
        RECURRENT_LR,
        gt=0,
        description="Peak learning rate (AdamW); the default depends on the model (see README, "
        "'Defaults').",
        # The field's default is never used: _default_lr_for_the_model picks one per model.
        json_schema_extra={
            "help_default": f"{RECURRENT_LR} for lstm and gru, {OTHER_LR} for transformer and "
            "models of your own"
        },
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a share of --lr.")
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,  # what every seeded generator accepts (numpy's legacy seed is 32-bit)
        description="Seeds weights, data order and sampling (0 to 4294967295).",
    )

    # Run directory, checkpoints, reporting.
    run_dir: Path | None = Field(None, description="Run directory. Default: runs/<timestamp>.")
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="Save a checkpoint every N steps (0: only at the end). A group restarted "
        "after a failure (--max-restarts) continues from the newest one, so this bounds the "
        "steps a failure costs; without one it trains again from the start.",
    )
    checkpoint_async: bool = Field(
        True,
        description="Write checkpoints in the background: a save copies the state to CPU "
        "memory and training goes on while a thread writes and seals it (the run's last save, "
        "and one on SIGTERM, is waited for). Until sealed it is a .partial dir nothing resumes "
        "from. --no-checkpoint-async: every save writes before the next step.",
    )
    keep_checkpoints: int = Field(
        0,
        ge=0,
        description="Keep the K newest checkpoints, deleting older ones once a newer one is "
        "sealed (0: keep all). Never deleted: the newest, the one --resume named, and any of a "
        "higher step left by an earlier run in the same dir.",
    )
    resume: Path | None = Field(
        None, description="Resume from a checkpoint directory, or the latest one in a run dir."
    )
    overwrite: bool = Field(
        False,
        description="Start afresh in a --run-dir that already holds a run: first delete only "
        "what shardwise wrote there (checkpoints/, tensorboard/, metrics.jsonl, summary.json, "
        "report.md, config.toml, model.safetensors and its loss, throughput and rank_step_time "
        ".png plots); your other files stay. Without it such a dir is refused, unless --resume "
        "continues the run in it.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times the elastic agent restarts the worker group after a worker fails; "
        "the restarted workers resume from the run's newest verified checkpoint by themselves, "
        "and summary.json records each restart. A user error is never retried. One process on "
        "one machine trains without the agent and is not restarted.",
    )
    preempt_grace_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="On SIGTERM or Ctrl-C every rank finishes its step and saves a checkpoint; "
        "workers still running this many seconds later are killed. Keep it below your "
        "scheduler's grace period (SLURM KillWait, Kubernetes terminationGracePeriodSeconds).",
    )
    log_every: int = Field(10, ge=1, description="Steps between metrics rows.")
    num_workers: int = Field(0, ge=0, description="Data-loading worker processes per rank.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files if installed.")
    sample_bytes: int = Field(
        200, ge=0, description="Bytes of text to sample from the model at the end."
    )

    @model_validator(mode="before")
    @classmethod
    def _parse_technique_settings(cls, values: object) -> object:
        """A technique's own reading of a flag's text or a TOML value (Setting.parse)."""
        if not isinstance(values, dict):
            return values
        parsed = dict(values)
        for name, setting in settings().items():
            if setting.parse is not None and name in parsed:
                parsed[name] = setting.parse(parsed[name])
        return parsed

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        return None if value is None else parse_size(value)

    @model_validator(mode="before")
    @classmethod
    def _default_lr_for_the_model(cls, values: object) -> object:
        if isinstance(values, dict) and values.get("lr") is None:
            recurrent = values.get("model", "lstm") in ("lstm", "gru")
            return {**values, "lr": RECURRENT_LR if recurrent else OTHER_LR}
        return values

    @model_validator(mode="before")
    @classmethod
    def _forget_old_batch_size(cls, values: object) -> object:
        return forget_old_batch_size(values)  # older config.toml files: see its comment

    @model_validator(mode="before")
    @classmethod
    def _split_node_range(cls, values: object) -> object:
        if isinstance(values, dict) and isinstance(values.get("nnodes"), str):
            return {**values, **split_node_range(values["nnodes"], values.get("min_nodes"))}
        return values

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> TrainConfig:
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("a multi-node run needs rdzv_endpoint HOST:PORT on every node")
        if self.rdzv_endpoint is not None:
            parse_endpoint(self.rdzv_endpoint)
        if self.packing and (self.model != "transformer" or self.batching == "fixed"):
            raise ValueError(
                "packing needs --model transformer and --batching tokens (RNNs skip padding "
                "through packed sequences instead)"
            )
        if self.packing and self.model_parallel > 1:
            raise ValueError("packing does not run through --pp or --tp stages yet; drop it")
        check_elastic_rules(self)
        for technique in registered():
            technique.check(self)
        if not (info.context or {}).get(_RECORDED):
            check_no_effect_rules(self)
        return self

    @classmethod
    def from_record(cls, values: dict) -> TrainConfig:
        """A run's recorded settings (its checkpoint's), checked but for settings it ignored.

        saved = TrainConfig.from_record(state.config)

        Settings the run never read are refused when given (rules.check_no_effect_rules),
        but an older version recorded them, and its checkpoints must still resume.
        """
        return cls.model_validate(values, context={_RECORDED: True})

    def layout(self, world_size: int) -> Layout:
        """The degrees of this run over `world_size` ranks (dp defaulted), checked.

        config.layout(4).dp   # 2 with --pp 2
        """
        from shardwise.parallel.mesh import Layout  # torch: not for `--help` and config files

        layout = Layout.for_world(world_size, dp=self.dp, pp=self.pp, tp=self.tp)
        for technique in registered():  # e.g. a sharding degree over the data ranks
            if technique.layout is not None:
                layout = technique.layout(self, layout)
        return layout

    def contract_settings(self) -> dict[str, Any]:
        """What a model contract is probed with (models/contract.py `contract_for`)."""
        return {
            "vocab_size": self.vocab_size,
            "input_layout": self.input_layout,
            "output": self.model_output,
        }

    @property
    def fixed_batch_size(self) -> int:
        """Sequences per rank per micro-step under --batching fixed."""
        return self.batch_size or DEFAULT_BATCH_SIZE

    @property
    def packs_rows(self) -> bool:
        """Whether token batches pack several sequences per row."""
        default = (
            self.model == "transformer" and self.batching == "tokens" and self.model_parallel == 1
        )
        return default if self.packing is None else self.packing

    @property
    def elastic(self) -> bool:
        """Whether the run may go on with fewer than --nnodes machines (--nnodes MIN:MAX)."""
        return self.min_nodes is not None and self.min_nodes < self.nnodes

    @property
    def model_parallel(self) -> int:
        """Ranks that share one model replica (pp x tp)."""
        return self.pp * self.tp

    def settings(self) -> dict[str, Any]:
        """What makes this run what it is, as JSON values: the keys config.toml records.

            TrainConfig(model="gru").settings()["model"]   # "gru"; no "run_dir", "resume"

        Left out: unset optional values; the orders about where the run lives and how it
        starts (--run-dir, --resume, --overwrite), so a run's config.toml given as --config
        starts a new run rather than being refused as one that already holds a run, and never
        deletes one unasked; a --max-steps derived from a token or epoch budget
        (train/build.py); and the settings of other modes, which this run never reads.
        """
        derived = {"max_steps"} if self.max_tokens or self.epochs else set()
        left_out = {"overwrite", "run_dir", "resume", *derived, *unread_settings(self)}
        return self.model_dump(mode="json", exclude_none=True, exclude=left_out)

    def to_toml(self) -> str:
        """The resolved configuration as TOML: `settings()`, with its paths made absolute so
        that the file reruns the same run from any working directory."""
        values = self.settings()
        for name in _PATHS:
            if name in values:
                values[name] = str(Path(values[name]).absolute())
        return tomli_w.dumps(values)
