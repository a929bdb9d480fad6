"""Hostile: modules lying in the directory where `shardwise` is typed are never imported instead
of the library, while `--model my_module:factory` from that directory still works."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Each planted module leaves a file behind if anything ever imports it. rich and tensorboard are
# imported by a real run's rank 0; safetensors, one of our own dependencies, already by a dry run.
PLANTED = {
    name: f"from pathlib import Path\nPath(__file__).with_name('{name}-was-imported').touch()\n"
    for name in ("rich", "tensorboard", "safetensors")
}
USER_MODEL = """
    from pathlib import Path

    import my_sibling  # a module next to it: must resolve while this one runs
    from shardwise.models import build_model

    Path(__file__).with_name("my_model-was-imported").touch()

    def make(vocab_size):
        return build_model(my_sibling.KIND, vocab_size)
"""


def shardwise_command(style: str) -> list[str]:
    """`shardwise` as users start it: the installed script, or `python -m shardwise`."""
    if style == "-m":
        return [sys.executable, "-m", "shardwise"]
    script = shutil.which("shardwise", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the `shardwise` console script is not installed next to this Python")
    return [script]


@pytest.fixture
def workdir(tmp_path: Path, corpus: Path) -> Path:
    """A working directory holding decoys, the user's own model module, and the corpus."""
    for name, source in PLANTED.items():
        (tmp_path / f"{name}.py").write_text(source)
    (tmp_path / "my_model.py").write_text(textwrap.dedent(USER_MODEL))
    (tmp_path / "my_sibling.py").write_text("KIND = 'gru'\n")
    return tmp_path


def shardwise_train(style: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*shardwise_command(style), "train", "--data", str(workdir / "corpus.txt"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


def decoys_imported(workdir: Path) -> list[str]:
    return [name for name in PLANTED if (workdir / f"{name}-was-imported").exists()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["script", "-m"])
def test_a_dry_run_imports_nothing_from_the_working_directory(style: str, workdir: Path) -> None:
    result = shardwise_train(style, workdir, "--dry-run", "--pp", "2", "--model", "transformer")
    assert decoys_imported(workdir) == [], result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("style", ["script", "-m"])
def test_a_real_run_imports_the_library_but_the_users_model_from_the_working_directory(
    style: str, workdir: Path
) -> None:
    # Two spawned workers, TensorBoard on and the progress display: rank 0 imports rich and
    # tensorboard, and every worker imports my_model, all with the launcher's sys.path.
    result = shardwise_train(
        style,
        workdir,
        *("--model", "my_model:make", "--nproc", "2", "--max-steps", "2", "--max-len", "64"),
        *("--batch-size", "4", "--batching", "fixed", "--sample-bytes", "0", "--tensorboard"),
        *("--run-dir", str(workdir / "run")),
    )
    assert decoys_imported(workdir) == [], result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "my_model-was-imported").exists()
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 2)
    assert any((workdir / "run" / "tensorboard").iterdir())  # the real TensorBoard wrote


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process in `workdir`, forgetting afterwards whatever it imported from there."""
    monkeypatch.chdir(workdir)
    for name in ("my_model", "my_sibling", "colorsys"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return workdir


def test_a_factory_module_in_the_working_directory_is_found_and_the_path_restored(
    in_workdir: Path,
) -> None:
    from shardwise.models import build_model

    path_before = list(sys.path)
    model = build_model("my_model:make", vocab_size=40)
    assert type(model).__name__ == "RecurrentLM"
    assert sys.modules["my_sibling"].__file__ == str(in_workdir / "my_sibling.py")
    assert sys.path == path_before


def test_an_installed_module_wins_over_a_file_of_the_same_name(in_workdir: Path) -> None:
    from shardwise.models import import_user_module

    (in_workdir / "colorsys.py").write_text(PLANTED["rich"].replace("rich", "colorsys"))
    assert not import_user_module("colorsys").__file__.startswith(str(in_workdir))
    assert not (in_workdir / "colorsys-was-imported").exists()


def test_a_missing_import_inside_the_users_module_names_that_import(in_workdir: Path) -> None:
    from shardwise.errors import ShardwiseError
    from shardwise.models import check_model_spec

    (in_workdir / "my_sibling.py").write_text("import no_such_dependency\n")
    with pytest.raises(ShardwiseError, match="No module named 'no_such_dependency'"):
        check_model_spec("my_model:make")
    assert "my_model" not in sys.modules  # a half-imported module is not left behind
