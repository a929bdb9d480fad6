"""SLURM's environment into settings: hostlists, the derived rendezvous, and user values winning.

The environments are what `srun` sets (tests/slurm_env.py); the multi-node run itself is in
tests/distributed/test_slurm_run.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.slurm import apply_slurm, expand_hostlist, rendezvous_port, slurm_settings
from slurm_env import srun_env

HOSTLISTS = {
    "node01": ["node01"],
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "node[01-02],gpu[8-10]": ["node01", "node02", "gpu8", "gpu9", "gpu10"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "n[01-3]": ["n01", "n02", "n03"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "a[1-2]b[3-4]": ["a1b3", "a1b4", "a2b3", "a2b4"],
    "r1n[1-2],r2n[3,5]": ["r1n1", "r1n2", "r2n3", "r2n5"],
    "host-1,host-2": ["host-1", "host-2"],
    "localhost,localhost": ["localhost", "localhost"],
    "10.0.0.[7-8]": ["10.0.0.7", "10.0.0.8"],
}


@pytest.mark.parametrize(("hostlist", "hosts"), HOSTLISTS.items())
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["n[3-1]", "n[a-b]", "n[1-2", "n1-2]", "n[]"])
def test_unreadable_hostlist_is_a_one_line_error(hostlist: str) -> None:
    with pytest.raises(ShardwiseError, match=r"--rdzv-endpoint") as caught:
        expand_hostlist(hostlist)
    assert "\n" not in str(caught.value)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM's scontrol is not installed")
def test_expand_hostlist_agrees_with_scontrol(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"  # scontrol needs a config, not a running controller
    conf.write_text("ClusterName=check\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for hostlist, hosts in HOSTLISTS.items():
        printed = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        assert printed == hosts == expand_hostlist(hostlist), hostlist


def test_rendezvous_port_is_the_same_on_every_node_and_below_ephemeral_ports() -> None:
    assert rendezvous_port(29517) == 29517
    assert rendezvous_port(1_234_567) == 24567
    assert all(20000 <= rendezvous_port(job) < 30000 for job in range(0, 50000, 7))


def test_srun_step_gives_nodes_rank_and_rendezvous() -> None:
    assert slurm_settings(srun_env(nodes=4, node_id=2)) == {
        "nnodes": 4,
        "node_rank": 2,
        "rdzv_endpoint": "node01:29517",
    }


def test_gpus_on_node_set_nproc() -> None:
    assert slurm_settings(srun_env(SLURM_GPUS_ON_NODE="4"))["nproc"] == 4
    assert slurm_settings(srun_env(SLURM_JOB_GPUS="0,1,2"))["nproc"] == 3


def test_one_node_step_takes_no_rendezvous() -> None:
    assert slurm_settings(srun_env(nodes=1, node_id=0)) == {}
    assert slurm_settings(srun_env(nodes=1, node_id=0, SLURM_GPUS_ON_NODE="2")) == {"nproc": 2}


def test_nothing_is_taken_outside_a_step_or_under_torchrun() -> None:
    batch_script = {k: v for k, v in srun_env().items() if "STEP" not in k}
    assert slurm_settings(batch_script) == {}
    assert slurm_settings({**srun_env(), "RANK": "0"}) == {}
    assert slurm_settings({}) == {}


def test_one_task_per_gpu_is_refused_with_the_fix() -> None:
    env = srun_env(nodes=2, node_id=0, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8")
    with pytest.raises(ShardwiseError, match=r"8 tasks on 2 node\(s\).*--ntasks-per-node=1"):
        slurm_settings(env)


def test_garbled_number_names_the_variable() -> None:
    with pytest.raises(ShardwiseError, match="SLURM_NODEID='x'"):
        slurm_settings(srun_env(SLURM_NODEID="x"))


def test_flags_and_config_file_win(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.toml"
    config.write_text('rdzv-endpoint = "head:1234"\n')
    env = srun_env(nodes=4, node_id=2, SLURM_GPUS_ON_NODE="4")
    merged = apply_slurm(env, {"nproc": 1, "max_steps": 3}, config)
    assert merged == {"nnodes": 4, "node_rank": 2, "nproc": 1, "max_steps": 3}
    assert capsys.readouterr().err == "SLURM: 4 nodes, this is node 2\n"


def test_own_node_count_takes_no_place_among_slurm_nodes(monkeypatch) -> None:
    monkeypatch.setattr("shardwise.slurm._cuda_visible", lambda: True)
    env = srun_env(nodes=4, node_id=2, SLURM_GPUS_ON_NODE="2")
    assert apply_slurm(env, {"nnodes": 1}) == {"nnodes": 1, "nproc": 2}
    assert apply_slurm(env, {"nnodes": 4})["node_rank"] == 2  # the same count: still taken


def test_gpus_slurm_names_but_torch_cannot_see_are_not_taken_nor_claimed(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shardwise.slurm._cuda_visible", lambda: False)
    env = srun_env(nodes=4, node_id=2, SLURM_GPUS_ON_NODE="4")
    assert "nproc" not in apply_slurm(env, {})
    line = capsys.readouterr().err
    assert "4 GPUs named but none used here" in line and "one worker each" not in line
    monkeypatch.setattr("shardwise.slurm._cuda_visible", lambda: True)
    assert "nproc" not in apply_slurm(env, {"device": "cpu"})


def test_says_what_it_took(capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_slurm(srun_env(nodes=4, node_id=2), {})["rdzv_endpoint"] == "node01:29517"
    assert capsys.readouterr().err == (
        "SLURM: 4 nodes, this is node 2, rendezvous at node01:29517\n"
    )
    assert apply_slurm({}, {"nproc": 2}) == {"nproc": 2}
    assert capsys.readouterr().err == ""


def test_cli_takes_slurm_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shardwise train --dry-run` in a step plans with SLURM's values; a refused step exits 2."""
    for key, value in srun_env(nodes=2, node_id=0).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "--dry-run", "--nproc", "2"]) == 0
    out, err = capsys.readouterr()
    assert "2 per node on 2 node(s)" in out
    assert err == "SLURM: 2 nodes, this is node 0, rendezvous at node01:29517\n"

    monkeypatch.setenv("SLURM_NTASKS", "4")  # srun -N2 --ntasks-per-node=2: a task per GPU
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert main(["train", "--dry-run"]) == 2
    assert "--ntasks-per-node=1" in capsys.readouterr().err
