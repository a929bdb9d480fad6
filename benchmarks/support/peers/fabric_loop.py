"""The job through Lightning Fabric, written as its documentation shows; started by peers.py.

python fabric_loop.py --tokens 800000 --dump-every 80000 --out DIR   # launches 2 ranks itself
"""

import itertools

import torch
import torch.nn.functional as F
from job import Job, Sequences, initial_model, job_sequences, pad_to_longest, state_hash
from lightning.fabric import Fabric
from recording import Recorder, limit_threads
from torch.utils.data import DataLoader


def main() -> None:
    job = Job.from_argv()
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    limit_threads()
    train, _ = job_sequences()
    model = initial_model()
    start = state_hash(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr)
    model, optimizer = fabric.setup(model, optimizer)
    loader = DataLoader(
        Sequences(train), batch_size=job.batch_size, shuffle=True, collate_fn=pad_to_longest
    )
    loader = fabric.setup_dataloaders(loader)  # a DistributedSampler; its epoch set per pass
    recorder = Recorder(job, lambda: model.module.state_dict(), start)
    for _ in itertools.count():
        for inputs, targets in loader:
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            if recorder.step_done(targets):
                recorder.finish()
                return


if __name__ == "__main__":
    main()
