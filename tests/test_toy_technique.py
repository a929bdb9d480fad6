"""A technique is one module and one registration line: a toy one, installed from a folder of its
own, reaches the CLI, TOML, --dry-run, `setup()`, the resume rules and summary.json with no file
of shardwise touched.

The toy module is registered the way a package of a user's registers one: an entry point in the
`shardwise.techniques` group (a dist-info folder beside the module, on PYTHONPATH). Everything
runs in one subprocess per step, since the registry is read once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import write_corpus

pytestmark = pytest.mark.timeout(300)

TOY = '''
"""A toy technique: scales the model's output logits by a constant (1.0 changes nothing)."""

from dataclasses import dataclass
from typing import Literal
import os

from shardwise.techniques import Cost, Setting, Technique


@dataclass(frozen=True)
class Scaled:
    scale: float

    def describe(self) -> str:
        return f"toy: logits scaled by {self.scale}"


def check(config):
    if config.toy == "on" and config.toy_scale > 2 and config.pp > 1:
        raise ValueError(f"--toy-scale {config.toy_scale} above 2 does not work with --pp")


def entry(config, layout):
    return Scaled(config.toy_scale) if config.toy == "on" else None


def apply(part, scaled, layout):
    with open(os.environ["TOY_LOG"], "a") as log:
        log.write(f"applied {scaled.scale} on rank {layout.rank}\\n")
    part.register_forward_hook(lambda module, args, out: out * scaled.scale)
    return part


def cost(scaled, footprint):
    return Cost(memory={"buffers": 4096})


def warm(scaled, layout):
    with open(os.environ["TOY_LOG"], "a") as log:
        log.write(f"warmed {scaled.scale} on rank {layout.rank}\\n")


def refuses_resume(saved, saved_world_size, layout):
    if os.environ.get("TOY_REFUSES"):  # as a technique whose saved state fits one layout only
        scale = saved.toy_scale
        return f"its toy state of scale {scale} over {saved_world_size} rank(s) is refused"
    return None


TECHNIQUE = Technique(
    name="toy",
    title="A toy technique",
    settings=(
        Setting("toy", Literal["off", "on"], "off", "Turn the toy on."),
        Setting(
            "toy_scale", float, 1.0, "What the toy scales the logits by.", {"gt": 0},
            read_when=lambda config: config.toy == "on",
            ignored_by=lambda config: "--toy off",
            purpose="the toy's scale",
            fix="drop it, or add --toy on",
            resume="the toy's scale changes what the model computes",
        ),
    ),
    check=check,
    entry=entry,
    apply=apply,
    cost=cost,
    warm=warm,
    refuses_resume=refuses_resume,
)
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which the toy technique is installed, and its log file."""
    folder = tmp_path_factory.mktemp("toy_pkg")
    (folder / "toy_technique.py").write_text(textwrap.dedent(TOY))
    info = folder / "toy_technique-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-technique\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[shardwise.techniques]\ntoy = toy_technique:TECHNIQUE\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    env["TOY_LOG"] = str(folder / "toy.log")
    return env


def shardwise(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "shardwise", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_its_settings_are_flags_under_its_own_heading(toy: dict[str, str]) -> None:
    text = shardwise(toy, "train", "--help").stdout
    heading = text.index("A toy technique:")
    assert "--toy {off,on}" in text[heading:] and "--toy-scale FLOAT" in text[heading:]
    assert "What the toy scales the logits by. (default: 1.0)" in " ".join(text.split())


def test_toml_dry_run_and_the_rules_come_from_its_declaration(
    toy: dict[str, str], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = tmp_path / "run.toml"
    config.write_text('toy = "on"\ntoy_scale = 1.5\n')
    common = ("--data", str(corpus), "--nproc", "1")
    out = shardwise(toy, "train", "--dry-run", "--config", str(config), *common).stdout
    assert "toy: logits scaled by 1.5" in out
    unread = shardwise(toy, "train", "--dry-run", "--toy-scale", "3", *common, check=False)
    assert unread.returncode == 2
    assert unread.stderr.strip().endswith(
        "--toy-scale 3.0 has no effect with --toy off (it is the toy's scale); drop it, or add "
        "--toy on"
    ), unread.stderr
    refused = shardwise(
        toy, "train", "--dry-run", *common, "--toy", "on", "--toy-scale", "3", "--pp", "2",
        check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--toy-scale 3.0 above 2 does not work with --pp" in refused.stderr


def test_a_run_applies_it_records_it_and_a_resume_keeps_it(
    toy: dict[str, str], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    common = ("--data", str(corpus), "--nproc", "1", "--model", "gru", "--max-len", "32")
    common += ("--tokens-per-batch", "256", "--run-dir", str(run), "--sample-bytes", "0")
    Path(toy["TOY_LOG"]).unlink(missing_ok=True)
    shardwise(toy, "train", *common, "--max-steps", "2", "--toy", "on", "--toy-scale", "1.5")
    # Warmed before the memory baseline, then applied to the model.
    assert Path(toy["TOY_LOG"]).read_text() == "warmed 1.5 on rank 0\napplied 1.5 on rank 0\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parallelism"]["toy"] == {"scale": 1.5}
    assert 'toy = "on"' in (run / "config.toml").read_text()

    changed = shardwise(
        toy, "train", *common, "--resume", "--max-steps", "3", "--toy-scale", "2", check=False
    )
    assert changed.returncode == 2
    assert "toy_scale was 1.5, now 2.0: the toy's scale changes what the model computes" in (
        changed.stderr
    )
    refusing = {**toy, "TOY_REFUSES": "1"}
    refused = shardwise(refusing, "train", *common, "--resume", "--max-steps", "3", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "its toy state of scale 1.5 over 1 rank(s) is refused" in refused.stderr
    shardwise(toy, "train", *common, "--resume", "--max-steps", "3")  # the same scale goes on
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_the_own_loop_takes_its_settings(toy: dict[str, str]) -> None:
    script = textwrap.dedent(
        """
        import torch, shardwise
        from shardwise.session import SESSION_KEYS
        assert "toy_scale" in SESSION_KEYS
        session = shardwise.setup(toy="on", toy_scale=2.0)
        lm = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
        model = session.prepare(lm)
        print(session.parallelism.entry("toy"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=toy, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Scaled(scale=2.0)" in done.stdout
