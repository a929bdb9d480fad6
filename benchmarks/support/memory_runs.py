"""What the memory benchmarks share: models of a chosen size as factories `shardwise train` can
import, one run of the real command, and what its summary says about memory per rank.

    models = write_models(Path(work), transformer={"dim": 256, "num_layers": 4})
    run = run_case(Case("dp2", "bench_models:transformer", "--nproc 2"), data, work)
    run.above_baseline, run.errors, run.step_s

Every case is the real `shardwise train` in a fresh process tree: the launcher predicts (and
refuses a run over its budget), each rank measures its own peak from its start, and rank 0's
summary.json holds both per rank (memory/record.py). A case's run dir is removed afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MODELS_MODULE = "bench_models"

USER_STYLE = '''
class RNNModel(nn.Module):
    """pytorch/examples' word_language_model, as written there: time-major input, a `hidden`
    argument, (log-probabilities [T*B, V], hidden) out, no layer_names()."""

    def __init__(self, ntoken, ninp, nhid, nlayers):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken = ntoken

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.encoder(input), hidden)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden


def user_style(vocab_size=256):
    return RNNModel(vocab_size, {ninp}, {nhid}, {nlayers})
'''


def write_models(
    work: Path, transformer: dict, lstm: dict, user: dict | None = None, **more: dict
) -> Path:
    """A module `bench_models` in `work` with factories `transformer`, `lstm` (the built-in
    classes at these sizes), `user_style`, and a TransformerLM factory per keyword of `more`;
    returns `work`, to put on PYTHONPATH."""
    user = user or {"ninp": 128, "nhid": 256, "nlayers": 2}
    text = textwrap.dedent(
        f"""
        import torch.nn.functional as F
        from torch import nn

        from shardwise.models import RecurrentLM, TransformerLM


        def transformer(vocab_size=256):
            return TransformerLM(vocab_size=vocab_size, **{transformer!r})


        def lstm(vocab_size=256):
            return RecurrentLM(vocab_size=vocab_size, cell="lstm", **{lstm!r})
        """
    ) + textwrap.dedent(USER_STYLE).replace("{ninp}", str(user["ninp"])).replace(
        "{nhid}", str(user["nhid"])
    ).replace("{nlayers}", str(user["nlayers"]))
    for name, sizes in more.items():
        text += f"\n\ndef {name}(vocab_size=256):\n"
        text += f"    return TransformerLM(vocab_size=vocab_size, **{sizes!r})\n"
    (work / f"{MODELS_MODULE}.py").write_text(text, encoding="utf-8")
    return work


@dataclass(frozen=True)
class Case:
    """One `shardwise train` run: a name, the model's factory, and its flags."""

    name: str
    model: str
    flags: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """What one case's summary says about memory and time."""

    ranks: list[dict]  # summary.json's memory ranks
    step_s: float  # median step time of the slowest rank, the first step left out
    reached: list[int]  # per rank: the first step whose peak is 98% of the run's
    rose: list[int]  # per rank: the step whose peak rose the most
    launcher: list[int] | None = None  # --dry-run's predicted total per rank, when asked

    @property
    def above_baseline(self) -> int:
        """The largest rank's measured peak above its own start baseline."""
        return max(rank["peak_bytes"] - rank["baseline_bytes"] for rank in self.ranks)

    @property
    def errors(self) -> list[float]:
        """Per rank: (predicted - measured) / measured of what training added to the baseline."""
        return [rank["error_above_baseline"] for rank in self.ranks]

    @property
    def total_errors(self) -> list[float]:
        """Per rank: the same on the whole peak, the baseline being the rank's own measured one."""
        return [rank["error"] for rank in self.ranks]

    @property
    def launcher_errors(self) -> list[float]:
        """Per rank: the launcher's prediction (its own baseline estimate) against the peak."""
        assert self.launcher is not None
        return [
            (predicted - rank["peak_bytes"]) / rank["peak_bytes"]
            for predicted, rank in zip(self.launcher, self.ranks, strict=True)
        ]


def environment(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(work), str(SRC), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONPATH": path} | (extra or {})


def run_case(case: Case, data: Path, work: Path, dry_run: bool = False) -> Run:
    """Train `case` once (and, with `dry_run`, ask the launcher's prediction first)."""
    run_dir = work / f"run-{case.name}"
    flags = [
        "--model",
        case.model,
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--log-every",
        "1",
        "--sample-bytes",
        "0",
        "--no-tensorboard",
        "--max-restarts",
        "0",
        "--eval-fraction",
        "0.02",
        "--eval-tokens",
        "256",
        *case.flags.split(),
    ]
    env = environment(work, case.env)
    launcher = _launcher_prediction(flags, env, work) if dry_run else None
    done = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *flags],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case.name} failed: {done.stderr.strip()[-1500:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    slowest = [max(row["rank_step_time_s"]) for row in rows[1:]] or [
        max(rows[0]["rank_step_time_s"])
    ]
    ranks = summary["memory"]["ranks"]
    reached = [reached_at(rows, rank, ranks[rank]["baseline_bytes"]) for rank in range(len(ranks))]
    rose = [rose_most_at(rows, rank) for rank in range(len(ranks))]
    return Run(ranks, statistics.median(slowest), reached, rose, launcher)


def _launcher_prediction(flags: list[str], env: dict[str, str], work: Path) -> list[int]:
    """Each rank's predicted total as `--dry-run` prints it (MiB, one decimal)."""
    done = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *flags, "--dry-run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    found = re.findall(r"^\s+rank (\d+): ([\d.]+) (MiB|GiB) =", done.stdout, re.MULTILINE)
    scale = {"MiB": 2**20, "GiB": 2**30}
    return [round(float(size) * scale[unit]) for _, size, unit in found]


def reached_at(rows: list[dict], rank: int, baseline: int, share: float = 0.98) -> int:
    """The first step whose metrics row (one a step) shows `rank`'s peak memory above its
    `baseline` at `share` of the run's: where the run's peak happened."""
    peaks = [row["rank_rss_bytes"][rank] - baseline for row in rows]
    return next(
        row["step"] for row, peak in zip(rows, peaks, strict=True) if peak >= share * peaks[-1]
    )


def rose_most_at(rows: list[dict], rank: int) -> int:
    """The step whose metrics row (one a step) shows `rank`'s peak memory risen the most since
    the row before (the first row: since its start)."""
    peaks = [0, *(row["rank_rss_bytes"][rank] for row in rows)]
    rises = [after - before for before, after in itertools.pairwise(peaks)]
    rises[0] = 0 if len(rows) > 1 else rises[0]  # the first row holds the whole start
    return rows[max(range(len(rises)), key=rises.__getitem__)]["step"]
