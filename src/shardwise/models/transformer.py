"""A small decoder-only Transformer language model, built from pieces a pipeline can cut between.

model = TransformerLM(dim=256, num_layers=4, num_heads=8)
logits = model(tokens)  # tokens [B, T] -> logits [B, T, 256]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.errors import ShardwiseError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused `qkv` projection and an output `proj`.

        attn = CausalSelfAttention(dim=128, num_heads=4)
        y = attn(x)  # x [B, T, 128] -> y [B, T, 128]

    The `qkv` output is laid out head by head (`[head][q|k|v][head_dim]`), and the head count
    is read from the tensor, not stored: a column-wise shard of `qkv` then holds whole heads,
    and the same forward runs on a tensor-parallel rank's share of them.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` [B, 1, T, T] (True: may attend) replaces the plain causal mask."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, -1, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, heads, T, head_dim]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.drop(self.proj(y.transpose(1, 2).reshape(batch, length, -1)))


class MLP(nn.Module):
    """The feed-forward half of a block: `fc1`, GELU, `fc2`.

    mlp = MLP(dim=128, hidden=512)
    y = mlp(x)  # x [B, T, 128] -> y [B, T, 128]
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """A pre-norm Transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.

    block = Block(dim=128, num_heads=4, mlp_ratio=4)
    y = block(x)  # same shape as x
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Token and learned position embeddings, pre-norm blocks, then LayerNorm and a linear head.

        model = TransformerLM(vocab_size=256, dim=128, num_layers=2, max_len=512)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    `lengths` is accepted for the same call as `RecurrentLM` and ignored: attention is causal,
    so trailing padding never reaches a real position. Rows that pack several sequences pass
    `positions` (restarting at 0 for each sequence) and `segment_ids` (equal within a sequence):
    attention then stays inside each sequence, so every packed sequence gets exactly the logits
    it would get alone. `layer_names()` lists the pieces a pipeline may place on stages, and
    `forward_layer()` runs one as a stage does: `embed` uses `pos` (`layer_uses`), as the two
    are summed, so they stay on one stage. `tp_styles()` is Megatron's split of the layers.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 1024,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ShardwiseError(
                f"dim={dim} does not split into num_heads={num_heads}; pick a divisor of dim"
            )
        if num_layers < 1:
            raise ShardwiseError(f"num_layers={num_layers}: a model needs at least 1 layer")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab_size))
        self._init_weights(num_layers)

    def _init_weights(self, num_layers: int) -> None:
        # GPT-2's scheme: small normal weights, and the projections that write into the
        # residual stream scaled down by depth so its variance does not grow with layers.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual_out in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * num_layers))

    def layer_names(self) -> list[str]:
        """The top-level pieces in forward order: `["embed", "pos", "blocks.0", ..., "head"]`.

        names = model.layer_names()
        stage0 = [model.get_submodule(n) for n in names[:3]]
        """
        return ["embed", "pos", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def layer_uses(self, name: str) -> tuple[str, ...]:
        """What `forward_layer(name, x)` calls besides the layer: `pos` and dropout for `embed`.

        >>> TransformerLM().layer_uses("embed"), TransformerLM().layer_uses("blocks.0")
        (('pos', 'drop'), ())
        """
        return ("pos", "drop") if name == "embed" else ()

    def forward_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s share of `forward` on unpacked rows, as a pipeline stage runs it.

        x = model.forward_layer("embed", tokens)   # token plus position embeddings
        x = model.forward_layer("blocks.0", x)     # causal over the whole row
        """
        if name == "embed":
            return self._embedded(x)
        return self.get_submodule(name)(x)

    def tp_styles(self) -> dict[str, dict[str, str | tuple[str, int]]]:
        """How tensor parallelism splits the model, by part (Megatron's scheme).

        >>> TransformerLM(num_layers=1, num_heads=4).tp_styles()["attn"]
        {'blocks.0.attn.qkv': ('column-wise', 4), 'blocks.0.attn.proj': 'row-wise'}

        `qkv` is laid out head by head, so its column shards hold whole heads when the head
        count divides over the ranks; the row-wise `proj` then reads each rank's heads.
        """
        attn: dict[str, str | tuple[str, int]] = {}
        mlp: dict[str, str | tuple[str, int]] = {}
        for i, block in enumerate(self.blocks):
            heads = block.attn.qkv.out_features // (3 * block.attn.head_dim)
            attn |= {f"blocks.{i}.attn.qkv": ("column-wise", heads)}
            attn |= {f"blocks.{i}.attn.proj": "row-wise"}
            mlp |= {f"blocks.{i}.mlp.fc1": "column-wise", f"blocks.{i}.mlp.fc2": "row-wise"}
        return {
            "embed": {"embed": "row-wise"},
            "attn": attn,
            "mlp": mlp,
            "head": {"head.1": "column-wise, output gathered"},
        }

    def forward(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, vocab_size]` for `tokens [B, T]`; `lengths` is ignored (see class).

        logits = model(batch.tokens, positions=batch.positions, segment_ids=batch.segment_ids)
        """
        x = self._embedded(tokens, positions)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)

    def _embedded(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        length = tokens.shape[1]
        # Positions never exceed the row, so checking the row's width needs no device sync.
        if length > self.max_len:
            raise ShardwiseError(
                f"sequence length {length} exceeds the model's max_len={self.max_len}; "
                "use shorter sequences or build the model with a larger max_len"
            )
        if positions is None:
            positions = torch.arange(length, device=tokens.device)
        return self.drop(self.embed(tokens) + self.pos(positions))


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T]: a token sees earlier tokens of its own segment.

    segment_mask(torch.tensor([[0, 0, 1]]))[0, 0].int()   # [[1, 0, 0], [1, 1, 0], [0, 0, 1]]

    Padding shares a segment id of its own, so every query sees at least itself and softmax
    never meets a row with nothing to attend to (which would give NaN).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]
