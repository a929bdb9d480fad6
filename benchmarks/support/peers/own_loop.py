"""The job through shardwise's own-loop API with its token-balanced loader; started by peers.py.

torchrun --nproc-per-node 2 own_loop.py --tokens 800000 --dump-every 80000 --out DIR
"""

import itertools

import torch
from job import Job, defaults, initial_model, job_sequences, state_hash
from recording import Recorder, limit_threads

import shardwise


def main() -> None:
    job = Job.from_argv()
    limit_threads()
    session = shardwise.setup(device="cpu")
    train, _ = job_sequences()
    model = initial_model()
    start = state_hash(model)
    model = session.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr)
    loader = session.loader(train, tokens_per_batch=defaults().tokens_per_batch)
    recorder = Recorder(job, lambda: model.part.state_dict(), start)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            logits = model(batch.tokens)
            loss = session.loss(logits, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if recorder.step_done(batch.targets):
                recorder.finish()
                session.close()
                return


if __name__ == "__main__":
    main()
