"""A GPT in one file, nanoGPT's architecture with the attention normalizer as a choice.

Token and position embeddings, pre-LayerNorm blocks (attention, then a 4x GELU MLP, each added to
the residual stream), a final LayerNorm, and an output head tied to the token embedding.
Initialisation follows nanoGPT: N(0, 0.02) everywhere, zero biases, and the projections into the
residual stream (``c_proj``) scaled by ``1 / sqrt(2 n_layer)``.

Generation decodes incrementally where the attention allows it (``normattn.nn.Attention``): the
constant-size beta state (docs/math.md, section 9) for causal beta without a window, a key/value
cache (of the last ``window`` positions with a sliding window) for the rest; a normalizer that depends
on the number of keys (``sigmoid``) re-runs the full forward for every token. Past ``block_size``
tokens the context slides, which moves every position embedding, so the state is rebuilt from the
last ``block_size`` tokens each step: the tokens are the ones a full forward over that context gives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nn import Attention
from .config import GPTConfig


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(
            config.n_embd,
            config.n_head,
            normalizer=config.normalizer,
            causal=True,
            bias=config.bias,
            dropout=config.dropout,
            attn_dropout=config.attention_dropout,
            num_kv_heads=config.n_kv_head,
            window=config.window,
            sinks=config.sinks,
            backend=config.backend,
            grad=config.grad,
        )
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def prefill(self, x: Tensor) -> tuple[Tensor, Any]:
        y, state = self.attn.prefill(self.ln_1(x))
        x = x + y
        return x + self.mlp(self.ln_2(x)), state

    def decode(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y_t, state = self.attn.decode(self.ln_1(x_t), state)
        x_t = x_t + y_t
        return x_t + self.mlp(self.ln_2(x_t)), state


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be set (the training data sets it)")
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings left out by default (the token ones are tied)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.transformer.wpe.weight.numel() if non_embedding else total

    def _embed(self, idx: Tensor, start: int = 0) -> Tensor:
        tokens = idx.shape[1]
        if start + tokens > self.config.block_size:
            raise ValueError(f"cannot run {start + tokens} positions, block_size is {self.config.block_size}")
        pos = torch.arange(start, start + tokens, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx (B, T)`` -> logits and the mean cross-entropy against ``targets`` (-1 is ignored).

        Without targets only the last position's logits are computed, ``(B, 1, V)``, as generation
        needs; with targets all of them, ``(B, T, V)``.
        """
        x = self._embed(idx)
        for block in self.transformer.h:
            x = block(x)
        if targets is None:
            return self._logits(x[:, [-1], :]), None
        logits = self._logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    # Generation.

    @property
    def decodes_incrementally(self) -> bool:
        return all(block.attn.decodes_incrementally for block in self.transformer.h)

    def prefill(self, idx: Tensor) -> tuple[Tensor, list[Any]]:
        """Run the prompt ``idx (B, T <= block_size)``: last-position logits ``(B, V)`` and the states."""
        x = self._embed(idx)
        states = []
        for block in self.transformer.h:
            x, state = block.prefill(x)
            states.append(state)
        return self._logits(x[:, -1, :]), states

    def decode(self, idx_t: Tensor, states: list[Any], position: int) -> tuple[Tensor, list[Any]]:
        """One token ``idx_t (B, 1)`` at ``position``: logits ``(B, V)`` and the updated states."""
        x = self._embed(idx_t, start=position)
        new_states = []
        for block, state in zip(self.transformer.h, states, strict=True):
            x, state = block.decode(x, state)
            new_states.append(state)
        return self._logits(x[:, -1, :]), new_states

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx (B, T >= 1)``.

        ``temperature == 0`` takes the most likely token. ``use_cache=False`` re-runs the full forward
        on the last ``block_size`` tokens for every new token (the reference the cached path matches);
        it is also what a model whose attention cannot decode incrementally does. Put the model in
        ``eval()`` mode first.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be (batch, tokens) with at least one token, got {tuple(idx.shape)}")
        block_size = self.config.block_size
        use_cache = use_cache and self.decodes_incrementally
        states: list[Any] | None = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -block_size:])[0][:, -1, :]
            elif states is None or idx.shape[1] > block_size:
                logits, states = self.prefill(idx[:, -block_size:])
            else:
                logits, states = self.decode(idx[:, -1:], states, position=idx.shape[1] - 1)
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Draw one token per row of ``logits (B, V)``: ``(B, 1)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
