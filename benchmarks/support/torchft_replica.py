"""One torchft replica group of one process, for benchmarks/torchft_healing.py.

    python benchmarks/support/torchft_replica.py --replica 0 --lighthouse http://127.0.0.1:29510 \
        --steps 30 --out /tmp/replica0.pt [--path ddp]

Trains a small RecurrentLM on random tokens through torchft's Manager on its reconfigurable
gloo group. The gradients are averaged by the Manager's fault-tolerant allreduce, called on
each gradient after backward (--path allreduce) or from torchft's DDP wrapper's comm hook
(--path ddp); the optimizer steps only when the Manager commits the step. A peer that dies
drops out of the next quorum; a replica that (re)joins behind the others fetches the model and
optimizer state from a live peer over HTTP (torchft's default checkpoint transport).

After every step it prints one JSON line, {"event": "step", "step", "committed",
"participants", "t"}, which the benchmark reads to time the survivor and the heal.
It stops at the first step >= --steps that all --replicas took part in, so the replicas stop
together, then saves its parameters to --out, so the benchmark can compare them.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch.distributed import TCPStore
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo

from shardwise.models import RecurrentLM

VOCAB = 64
SEQ_LEN = 32
BATCH = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--lighthouse", required=True, help="the lighthouse's http address")
    parser.add_argument("--steps", type=int, default=30, help="train at least this many steps")
    parser.add_argument("--replicas", type=int, default=2, help="replica groups in the job")
    parser.add_argument("--sleep", type=float, default=0.1, help="seconds of 'work' per step")
    parser.add_argument("--timeout", type=float, default=5.0, help="collective timeout, s")
    parser.add_argument("--out", required=True, help="where to save the final parameters")
    parser.add_argument(
        "--path",
        choices=("ddp", "allreduce"),
        default="allreduce",
        help="ddp: torchft's DDP wrapper; allreduce: Manager.allreduce on each gradient",
    )
    return parser.parse_args()


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def random_batch(replica: int, step: int) -> torch.Tensor:
    # Each replica draws its own data, as data-parallel shards would; seeded so reruns match.
    generator = torch.Generator().manual_seed(1000 * replica + step)
    return torch.randint(VOCAB, (BATCH, SEQ_LEN + 1), generator=generator)


def build_manager(
    args: argparse.Namespace, model: torch.nn.Module, optim: torch.optim.Optimizer
) -> tuple[Manager, TCPStore]:
    """The Manager, and the store it connects to, which must live as long as it does."""
    # A replica group of one process still needs its own store: the Manager is not its master.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout)

    def load_state_dict(state: dict[str, object]) -> None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])

    def state_dict() -> dict[str, object]:
        return {"model": model.state_dict(), "optim": optim.state_dict()}

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=30),
        connect_timeout=timeout,
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{args.replica}",
        hostname="127.0.0.1",
    )
    return manager, store


def average_gradients(manager: Manager, model: torch.nn.Module) -> None:
    # Manager.allreduce swallows a failed collective and reports it, so should_commit says no.
    works = [manager.allreduce(p.grad) for p in model.parameters() if p.grad is not None]
    for work in works:
        work.wait()


def finished(args: argparse.Namespace, manager: Manager) -> bool:
    # Stop only in a step every replica took part in, so all of them stop at the same step
    # (their weights can be compared) and a survivor never leaves before its peer has healed.
    return manager.current_step() >= args.steps and manager.num_participants() == args.replicas


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)  # both replicas start from the same weights
    model = RecurrentLM(VOCAB, embed_dim=16, hidden_dim=32, num_layers=1, cell="lstm")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager, _store = build_manager(args, model, inner)
    forward = DistributedDataParallel(manager, model) if args.path == "ddp" else model
    emit("ready")
    while not finished(args, manager):
        tokens = random_batch(args.replica, manager.current_step())
        manager.start_quorum()  # runs in the background until the first allreduce
        inner.zero_grad()
        logits = forward(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if args.path == "allreduce":
            average_gradients(manager, model)
        time.sleep(args.sleep)
        committed = manager.should_commit()  # False: this step's all-reduce failed
        if committed:
            inner.step()
        emit(
            "step",
            step=manager.current_step(),
            committed=committed,
            participants=manager.num_participants(),
        )
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    emit("done", step=manager.current_step())
    manager.shutdown(wait=False)


if __name__ == "__main__":
    train(parse_args())
