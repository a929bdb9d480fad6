"""The job through Accelerate, written as its documentation shows; started by benchmarks/peers.py.

    torchrun --nproc-per-node 2 accelerate_loop.py --tokens 800000 --dump-every 80000 --out DIR

On CPU, `Accelerator(cpu=True)` under torchrun gives one process per rank;
`accelerate launch --cpu --num_processes 2` runs a single process instead, silently.
"""

import itertools

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from job import Job, Sequences, initial_model, job_sequences, pad_to_longest, state_hash
from recording import Recorder, limit_threads
from torch.utils.data import DataLoader


def main() -> None:
    job = Job.from_argv()
    limit_threads()
    accelerator = Accelerator(cpu=True)
    train, _ = job_sequences()
    model = initial_model()
    start = state_hash(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr)
    loader = DataLoader(
        Sequences(train), batch_size=job.batch_size, shuffle=True, collate_fn=pad_to_longest
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    recorder = Recorder(job, lambda: accelerator.unwrap_model(model).state_dict(), start)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for inputs, targets in loader:
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            if recorder.step_done(targets):
                recorder.finish()
                return


if __name__ == "__main__":
    main()
