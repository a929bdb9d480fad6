"""The environment `srun --ntasks-per-node=1` gives one task, for tests/test_slurm*.py.

Names as SLURM 22.05's srun sets them (read off a single-host cluster with two slurmd).
"""

from __future__ import annotations


def srun_env(
    nodes: int = 4, node_id: int = 2, nodelist: str = "", job_id: int = 29517, **extra: str
) -> dict[str, str]:
    """SLURM_* of node `node_id` in a one-task-per-node step of job `job_id` over `nodelist`."""
    nodelist = nodelist or f"node[01-{nodes:02d}]"
    env = {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NODEID": str(node_id),
        "SLURM_PROCID": str(node_id),
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": str(nodes),
        "SLURM_NPROCS": str(nodes),
        "SLURM_STEP_NUM_TASKS": str(nodes),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": f"1(x{nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"1(x{nodes})",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }
    env.update(extra)
    return env
