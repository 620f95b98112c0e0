"""The one decoder-only Transformer.

Read top to bottom: token embedding -> (learned positions) -> blocks of
[attention, feed-forward] with the configured normalisation placement ->
final norm -> output head. Every architectural variant is a field of
:class:`ModelConfig` that selects a small function or module here; there are no
subclasses. Training, full-sequence scoring and incremental decoding share one
code path: attention takes an optional :class:`KVCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm without centring (Zhang & Sennrich 2019), as in LLaMA."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles (Su et al. 2021) for positions 0..length-1, shape (length, head_dim)."""
    half = config.head_dim // 2
    inverse_frequency = 1.0 / (config.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2): the "rotate half" layout that Hugging Face LLaMA uses,
    so exported weights need no permutation. x: (B, heads, T, head_dim); cos/sin broadcast to it."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Pre-allocated keys and values of every layer for a batch of sequences decoded in lock-step.

    ``length`` is how many positions are filled. ``padding`` (batch, capacity), when set, marks the
    positions that hold real tokens; left-padded prompts of different lengths use it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device):
        shape = (config.n_layer, batch_size, config.n_kv_head, capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self.padding: torch.Tensor | None = None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One fused projection for q, k and v: one matmul instead of three. With grouped-query attention
        # (Ainslie et al. 2023) k and v have n_kv_head heads each, shared by n_head / n_kv_head queries.
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope, cache: KVCache | None, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if self.n_kv_head != self.n_head:
            repeats = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # The CPU flash-attention kernel's bfloat16 backward is ~2.5x slower than its float32 one
            # (benchmarks/train_speed.py); the projections around it keep their bfloat16 speed.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                                   dropout_p=self.dropout if self.training else 0.0).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        gated = config.activation == "swiglu"
        # SwiGLU (Shazeer 2020): gate and up projections fused into one matmul, split after.
        self.up = nn.Linear(config.n_embd, (2 if gated else 1) * config.ffn_hidden, bias=config.bias)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        elif self.activation == "gelu_tanh":  # GPT-2's approximation; keeps logits equal to theirs
            hidden = F.gelu(hidden, approximate="tanh")
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        else:
            hidden = F.relu(hidden)
        return self.down(hidden)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer_index)
        self.feed_forward_norm = make_norm(config)
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache, mask, is_causal):
        if self.pre_norm:
            # Pre-LN (GPT-2, Xiong et al. 2020): the residual stream stays an identity path, which
            # trains stably without a long warmup.
            x = x + self.dropout(self.attention(self.attention_norm(x), rope, cache, mask, is_causal))
            return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        # Post-LN (Vaswani et al. 2017, GPT-1): normalise after each residual addition.
        x = self.attention_norm(x + self.dropout(self.attention(x, rope, cache, mask, is_causal)))
        return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.context_length, config.n_embd) if config.position == "learned" else None
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, index) for index in range(config.n_layer))
        # Post-LN blocks already end in a norm; pre-LN needs one before the head (GPT-2).
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Press & Wolf 2017: one matrix for input and output embeddings.
            self.lm_head.weight = self.token_embedding.weight
        self.gradient_checkpointing = False
        if config.position == "rope":
            # Derived from the config, so not saved with the weights (persistent=False).
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std) everywhere, with the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attention.out, block.feed_forward.down):
                nn.init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        self.reset_rope(self.token_embedding.weight.device)

    def reset_rope(self, device) -> None:
        if self.config.position == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.config, self.config.context_length, device=device)

    def new_cache(self, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        capacity = capacity or self.config.context_length
        weight = self.token_embedding.weight
        return KVCache(self.config, batch_size, capacity, dtype or weight.dtype, weight.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, length, vocab) for ``input_ids`` (batch, length).

        With a ``cache``, ``input_ids`` continue the sequences already in it: their keys and values are
        appended and attention covers everything cached so far.
        """
        batch, length = input_ids.shape
        start = cache.length if cache is not None else 0
        end = start + length
        if end > self.config.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds context_length={self.config.context_length}")
        positions = self._positions(batch, start, end, cache)
        mask, is_causal = self._attention_mask(length, start, end, cache)

        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x)
        rope = None
        if self.config.position == "rope":
            # (length,) positions broadcast over batch and heads; per-row positions (padding) get a head axis.
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if positions.dim() == 2:
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                # Recompute activations in the backward pass instead of storing them (Chen et al. 2016).
                x = torch.utils.checkpoint.checkpoint(block, x, rope, cache, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, rope, cache, mask, is_causal)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.final_norm(x))

    def _positions(self, batch: int, start: int, end: int, cache: KVCache | None) -> torch.Tensor:
        device = self.token_embedding.weight.device
        if cache is None or cache.padding is None:
            return torch.arange(start, end, device=device)
        # Left padding: a row's first real token is position 0.
        filled = cache.padding[:, :end].long().cumsum(dim=1) - 1
        return filled[:, start:end].clamp(min=0)

    @staticmethod
    def _attention_mask(length: int, start: int, end: int, cache: KVCache | None) -> tuple[torch.Tensor | None, bool]:
        if cache is None or (cache.padding is None and start == 0):
            return None, True
        if cache.padding is None and length == 1:
            return None, False  # one new token attends to everything cached
        device = cache.keys.device
        query_positions = torch.arange(start, end, device=device).unsqueeze(1)
        key_positions = torch.arange(end, device=device).unsqueeze(0)
        mask = (key_positions <= query_positions).unsqueeze(0)  # (1, length, end)
        if cache.padding is not None:
            mask = mask & cache.padding[:, None, :end]
            # A padding query would otherwise see no key at all and produce NaN; let it see itself.
            mask = mask | (key_positions == query_positions).unsqueeze(0)
        return mask.unsqueeze(1), False

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head is counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel()
            if self.position_embedding is not None:
                total -= self.position_embedding.weight.numel()
        return total

    def flops_per_token(self, sequence_length: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights plus 12 * layers * width * T for attention scores
        (Kaplan et al. 2020; PaLM appendix B). N excludes the embeddings, which cost no matmul."""
        length = sequence_length or self.config.context_length
        weights = self.num_parameters(exclude_embeddings=True)
        if self.config.tie_embeddings:
            weights += self.lm_head.weight.numel()  # the head is a matmul even when tied
        return 6 * weights + 12 * self.config.n_layer * self.config.n_embd * length
