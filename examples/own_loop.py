"""A plain single-device training loop made data parallel with shardwise (see README).

torchrun --nproc-per-node 2 examples/own_loop.py     # or: python examples/own_loop.py
"""

import torch
import torch.nn.functional as F
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


text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog " * 200))
windows = text[: len(text) // 33 * 33].view(-1, 33)
dataset = TensorDataset(windows[:, :-1], windows[:, 1:])

session = shardwise.setup()
model = session.prepare(CharLSTM())
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
loader = session.loader(dataset, batch_size=16, shuffle=True)
for epoch in range(3):
    for x, y in loader:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean_loss = session.mean(loss.detach())  # a collective: every rank calls it
    if session.is_main:
        print(f"epoch {epoch} loss {mean_loss:.3f}", flush=True)
session.close()
