"""A small GPT-style language model (as nanoGPT writes it): token and learned position embeddings, pre-LayerNorm
blocks of causal self-attention (`scaled_dot_product_attention`) and a GELU MLP, a final LayerNorm, and an output
layer whose weight is the token embedding's (tied). It takes one sequence of token ids [T] (int64, T at most
`block_size`) and returns next-token logits [T, vocab_size]; the cross-entropy loss then takes targets [T], the
inputs shifted by one. Export it with

    python -m hytrain_export python/examples/gpt.py:gpt --input-shape 32 --input-dtype int64 --out gpt-export

(`--model-kwargs '{"vocab_size": 50304, "block_size": 256, ...}'` for another size; `--input-shape` is the context
length the package is compiled for) and train the folder with `hytrain train --model gpt-export ...` on token data.
Copy it and change what you like: the export traces whatever forward does with tensors.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Tied: one tensor under two state_dict names (hytrain trains it once and saves it under both).
        self.lm_head.weight = self.wte.weight
        # GPT-2's initialisation: small normal weights, residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: [B, T] token ids (T <= block_size) -> logits [B, T, vocab_size].
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"a sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(
    vocab_size: int = 64,
    block_size: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    dropout: float = 0.0,
) -> GPT:
    """The model; the defaults are the test suite's small size."""
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
