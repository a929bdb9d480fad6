"""The loop of own_loop.py cut into two pipeline stages with shardwise (see README).

torchrun --nproc-per-node 2 examples/own_loop_pp.py
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

import shardwise


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])

    def layer_names(self) -> list[str]:
        return ["embed", "lstm", "head"]


text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog " * 200))
windows = text[: len(text) // 33 * 33].view(-1, 33)
dataset = TensorDataset(windows[:, :-1], windows[:, 1:])

session = shardwise.setup(pp=2, microbatches=4)
model = session.prepare(CharLSTM())
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
loader = session.loader(dataset, batch_size=16, shuffle=True)
for epoch in range(3):
    for x, y in loader:
        optimizer.zero_grad()
        loss = session.forward_backward(model, x, y)
        optimizer.step()
    mean_loss = session.mean(loss.detach())  # a collective: every rank calls it
    if session.is_main:
        print(f"epoch {epoch} loss {mean_loss:.3f}", flush=True)
session.close()
