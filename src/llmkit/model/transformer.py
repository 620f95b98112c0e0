"""The one decoder-only Transformer.

Read top to bottom: token embedding -> (learned or sinusoidal positions) ->
(embedding norm) -> blocks of [attention (RoPE or ALiBi, QK-norm, causal or
prefix mask), feed-forward (dense or Mixture-of-Experts)] with the configured
normalisation placement -> final norm -> output head (-> logit soft-cap); ``hidden_states`` stops
before the head, for the reward and value heads of alignment. Every architectural variant is a field of
:class:`ModelConfig` that selects a small function or module here; there are no
subclasses. Training, full-sequence scoring and incremental decoding share one
code path: attention takes an optional :class:`KVCache`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.config import GATED_ACTIVATIONS, RECOMPUTE, ModelConfig, Recompute
from llmkit.model.kv_cache import KVCache
from llmkit.model.moe import MixtureOfExperts

IGNORE_INDEX = -100  # a target position that counts for nothing (PyTorch's cross-entropy default)


class RMSNorm(nn.Module):
    """Root-mean-square norm without centring (Zhang & Sennrich 2019), as in LLaMA."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused kernel (which accumulates in float32) needs a contiguous input and a weight of the
        # input's dtype; otherwise a composite path runs, up to 30x slower in the bfloat16 backward
        # (QK-norm's queries are strided views of the fused qkv projection).
        return F.rms_norm(x.contiguous(), (x.shape[-1],), self.weight.to(x.dtype), self.eps)


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


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, for rows (batch, length) of consecutive documents."""
    index = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


@dataclass(frozen=True)
class DocumentSpans:
    """Packed rows as ``(row, start, end)`` spans of consecutive documents: attention runs causally inside
    each span alone, so memory grows with the longest document, never with row length squared (a dense
    block-diagonal mask is batch × length² and sends scaled_dot_product_attention to its unfused path)."""

    spans: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, document_ids: torch.Tensor) -> "DocumentSpans":
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        spans = []
        for row, row_starts in enumerate(starts.tolist()):
            edges = [index for index, start in enumerate(row_starts) if start] + [len(row_starts)]
            spans += [(row, begin, end) for begin, end in zip(edges, edges[1:])]
        return cls(tuple(spans))


def sinusoidal_table(config: ModelConfig, length: int, device=None) -> torch.Tensor:
    """Vaswani et al. 2017 §3.5: sin on even and cos on odd dimensions, wavelengths 2π .. 10000·2π."""
    positions = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, config.n_embd, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / config.n_embd)
    )
    table = torch.zeros(length, config.n_embd, device=device)
    table[:, 0::2] = torch.sin(positions * frequency)
    table[:, 1::2] = torch.cos(positions * frequency)
    return table


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al. 2022: head h of H gets slope 2^(-8h/H); for H not a power of two, the slopes of the
    next lower power of two followed by every other slope of twice that many heads (their reference code)."""

    def powers(count: int) -> list[float]:
        return [2 ** (-8 * (head + 1) / count) for head in range(count)]

    lower = 2 ** math.floor(math.log2(n_head))
    slopes = powers(lower) + powers(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One fused projection for q, k and v: one matmul instead of three. With grouped-query attention
        # (Ainslie et al. 2023) k and v have n_kv_head heads each, shared by n_head / n_kv_head queries.
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # QK-norm (Dehghani et al. 2023; OLMo 2, modded-nanogpt): bounded attention logits, so larger
        # learning rates do not blow up the softmax.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.recompute_core = False  # set by Transformer.activation_checkpointing = "selective"
        # Set by an inference engine to a faster attention for one new token per row (its CPU kernel,
        # llmkit.infer.cpu_kernels.decode_attention): called as decode_attention(q, k, v, mask) with q (batch,
        # kv_heads, group, head_dim) and a boolean mask or None, in place of scaled_dot_product_attention.
        self.decode_attention = None

    def forward(
        self, x, rope, cache: KVCache | None, mask: "torch.Tensor | DocumentSpans | None", is_causal: bool
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
            if length == 1 and (mask is None or mask.shape[-3] == 1):
                # Decoding one token: the query heads that share a key/value head (grouped-query attention) become
                # that head's query rows, so the cached keys and values are read in place, not repeated.
                q = q.reshape(batch, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)
                boolean_mask = mask is None or mask.dtype == torch.bool
                if self.decode_attention is not None and not self.training and boolean_mask:
                    y = self.decode_attention(q, k, v, mask)
                else:
                    y = self._attend(q, k, v, mask, False)
                return self.out(y.reshape(batch, length, -1))
        if self.recompute_core and self.training:
            # Selective recomputation (Korthikanti et al. 2022 §4.1): the core's s²-sized scores, softmax and
            # dropout mask are the bulk of a layer's activations (5·a·s/h of 34 + 5·a·s/h bytes per s·b·h) but a
            # few percent of its FLOPs, so they are recomputed in the backward pass from the kept q, k and v
            # (dropout redraws the same mask: the checkpoint restores the RNG state).
            y = torch.utils.checkpoint.checkpoint(self._core, q, k, v, mask, is_causal, use_reentrant=False)
        else:
            y = self._core(q, k, v, mask, is_causal)
        return self.out(y)

    def _core(self, q, k, v, mask: "torch.Tensor | DocumentSpans | None", is_causal: bool) -> torch.Tensor:
        """The attention core, q, k, v (batch, heads, length, head_dim) -> (batch, length, heads · head_dim):
        QKᵀ, softmax, dropout and the product with V. Grouped keys and values are repeated in here, so
        selective recomputation keeps them unrepeated; on the CPU without a mask the flash kernel reads them
        grouped (``enable_gqa``), and no repeated copy is made at all."""
        batch, length = q.shape[0], q.shape[2]
        grouped = self.n_kv_head != self.n_head
        if grouped and (isinstance(mask, torch.Tensor) or q.device.type != "cpu"):
            # Unrepeated heads are measured on the CPU's flash kernel without a mask only; CUDA's memory-efficient
            # kernel (float32, masks) takes no grouped heads and would fall back to the unfused path.
            repeats = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            grouped = False
        if isinstance(mask, DocumentSpans):
            # Spans in (row, start) order, concatenated: (1, heads, batch * length, head_dim), rows one after another.
            y = torch.cat(
                [
                    self._attend(
                        q[row : row + 1, :, start:end],
                        k[row : row + 1, :, start:end],
                        v[row : row + 1, :, start:end],
                        None,
                        True,
                        grouped,
                    )
                    for row, start, end in mask.spans
                ],
                dim=2,
            )
            y = y.view(self.n_head, batch, length, self.head_dim).transpose(0, 1)
        else:
            y = self._attend(q, k, v, mask, is_causal, grouped)
        return y.transpose(1, 2).reshape(batch, length, -1)

    def _attend(self, q, k, v, mask, is_causal: bool, grouped: bool = False) -> torch.Tensor:
        """Scaled dot-product attention; ``grouped``: k and v have fewer heads than q (each shared by a group)."""
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # The CPU flash-attention kernel's bfloat16 backward is ~2.5x slower than its float32 one
            # (benchmarks/train_speed.py); the projections around it keep their bfloat16 speed. Autocast is
            # switched off only where it is on: a compiled graph with an autocast region is never cached.
            with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else contextlib.nullcontext():
                return F.scaled_dot_product_attention(
                    q.float(),
                    k.float(),
                    v.float(),
                    attn_mask=mask,
                    is_causal=is_causal,
                    dropout_p=dropout,
                    enable_gqa=grouped,
                ).to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, enable_gqa=grouped
        )


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        gated = config.activation in GATED_ACTIVATIONS
        # Gated units (Shazeer 2020): gate and up projections fused into one matmul, split after.
        self.up = nn.Linear(config.n_embd, (2 if gated else 1) * config.ffn_hidden, bias=config.bias)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        elif self.activation == "geglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.gelu(gate) * up
        elif self.activation == "gelu_tanh":  # GPT-2's approximation; keeps logits equal to theirs
            hidden = F.gelu(hidden, approximate="tanh")
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        elif self.activation == "relu2":  # squared ReLU (So et al. 2021, Primer; modded-nanogpt)
            hidden = F.relu(hidden).square()
        else:
            hidden = F.relu(hidden)
        return self.down(hidden)


def make_feed_forward(config: ModelConfig) -> nn.Module:
    if config.moe_experts:
        return MixtureOfExperts(
            config.n_embd, config.moe_experts, config.moe_top_k, config.moe_capacity_factor, lambda: FeedForward(config)
        )
    return FeedForward(config)


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    """DeepNet (Wang et al. 2022, table 1, decoder-only): residual scale alpha = (2N)^(1/4) and
    init scale beta = (8N)^(-1/4) for N layers."""
    return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25


def experts_of(feed_forward: nn.Module) -> list[FeedForward]:
    """The dense feed-forward itself, or every expert of a mixture."""
    return list(feed_forward.experts) if isinstance(feed_forward, MixtureOfExperts) else [feed_forward]


def feed_forward_linears(feed_forward: nn.Module) -> list[nn.Linear]:
    return [linear for expert in experts_of(feed_forward) for linear in (expert.up, expert.down)]


def residual_projections(block: "Block") -> list[nn.Linear]:
    """The projections that write into the residual stream: attention output and feed-forward down."""
    return [block.attention.out] + [expert.down for expert in experts_of(block.feed_forward)]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.placement = config.norm_placement
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer_index)
        self.feed_forward_norm = make_norm(config)
        self.feed_forward = make_feed_forward(config)
        # Sandwich-LN (Ding et al. 2021, CogView) also normalises each sub-layer's output.
        sandwich = config.norm_placement == "sandwich"
        self.attention_output_norm = make_norm(config) if sandwich else None
        self.feed_forward_output_norm = make_norm(config) if sandwich else None
        self.residual_scale = deepnorm_constants(config.n_layer)[0] if config.norm_placement == "deepnorm" else 1.0
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache, mask, is_causal):
        if self.placement == "pre":
            # Pre-LN (GPT-2, Xiong et al. 2020): the residual stream stays an identity path, which
            # trains stably without a long warmup.
            x = x + self.dropout(self.attention(self.attention_norm(x), rope, cache, mask, is_causal))
            return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        if self.placement == "sandwich":
            x = x + self.dropout(
                self.attention_output_norm(self.attention(self.attention_norm(x), rope, cache, mask, is_causal))
            )
            return x + self.dropout(self.feed_forward_output_norm(self.feed_forward(self.feed_forward_norm(x))))
        # Post-LN (Vaswani et al. 2017, GPT-1): normalise after each residual addition. DeepNorm
        # up-weights the residual by alpha > 1 so deep post-LN stacks keep their updates bounded.
        x = self.attention_norm(self.residual_scale * x + self.dropout(self.attention(x, rope, cache, mask, is_causal)))
        return self.feed_forward_norm(self.residual_scale * x + self.dropout(self.feed_forward(x)))


class _CrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy of float32 logits (positions, vocab) against targets (all counted), with its
    gradient, softmax minus one-hot, worked out in the forward pass from one fused softmax. PyTorch's
    cross-entropy runs a log-softmax forward and a backward that each read and write the whole block again: on
    SmolLM2's 49k vocabulary the pair took 3-5x the softmax's time (635 positions: 26-66 ms against 12-14 ms)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits, dim=-1)
        rows = torch.arange(len(targets), device=targets.device)
        chosen = probabilities[rows, targets]
        losses = -chosen.log()
        # A probability below float32's smallest normal number has lost digits (or is 0, an infinite loss):
        # those rows' losses come from the log-sum-exp instead, exact at any size.
        underflow = chosen < torch.finfo(probabilities.dtype).tiny
        if underflow.any():
            far = logits[underflow]
            losses[underflow] = torch.logsumexp(far, dim=-1) - far.gather(-1, targets[underflow, None]).squeeze(-1)
        probabilities[rows, targets] -= 1
        ctx.save_for_backward(probabilities)
        return losses

    @staticmethod
    def backward(ctx, incoming: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return incoming.unsqueeze(-1) * gradient, None


class _FrozenHeadLosses(torch.autograd.Function):
    """Per-position losses of an output head without trainable weights, with their gradient with respect to the
    hidden states worked out in the forward pass. Position i's loss depends on hidden row i alone, so row i of
    the summed losses' gradient is d loss_i / d hidden_i, and the backward pass only scales rows by the incoming
    gradient. Against recomputing each chunk's logits in the backward pass (:meth:`Transformer._by_chunks`),
    one head product fewer, and still no logits kept."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, losses_of) -> torch.Tensor:
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            (losses,) = losses_of(leaf, targets)
            (gradient,) = torch.autograd.grad(losses.sum(), leaf)
        ctx.save_for_backward(gradient)
        return losses.detach()

    @staticmethod
    def backward(ctx, incoming: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return incoming.unsqueeze(-1) * gradient, None, None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = (
            nn.Embedding(config.context_length, config.n_embd) if config.position == "learned" else None
        )
        self.embedding_norm = make_norm(config) if config.embedding_norm else None
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, index) for index in range(config.n_layer))
        # Post-LN blocks already end in a norm; pre-LN and sandwich-LN need one before the head (GPT-2).
        self.final_norm = make_norm(config) if config.norm_placement in ("pre", "sandwich") else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Press & Wolf 2017: one matrix for input and output embeddings.
            self.lm_head.weight = self.token_embedding.weight
        self.activation_checkpointing = "none"
        # Tables derived from the config, so not saved with the weights (persistent=False).
        if config.position == "rope":
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if config.position == "sinusoidal":
            self.register_buffer("sinusoids", torch.empty(0), persistent=False)
        if config.position == "alibi":
            self.register_buffer("alibi", torch.empty(0), persistent=False)
        self.aux_loss = torch.zeros(())  # MoE load balancing, weighted; set by every forward
        self.expert_utilisation: torch.Tensor | None = None  # (n_layer, experts) routed-token fractions
        self.reset_parameters()

    @property
    def activation_checkpointing(self) -> Recompute:
        """What the backward pass recomputes while training: ``none``; ``selective``, each block's attention
        core (:meth:`Attention._core`); or ``full``, whole blocks (Chen et al. 2016)."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: Recompute) -> None:
        if mode not in RECOMPUTE:
            raise ValueError(f"activation_checkpointing={mode!r}: must be one of {', '.join(RECOMPUTE)}")
        self._activation_checkpointing = mode
        for module in self.modules():  # a pipeline stage's blocks too, whichever container holds them
            if isinstance(module, Attention):
                module.recompute_core = mode == "selective"

    def run_block(self, block: Block, x: torch.Tensor, rope, cache, mask, is_causal: bool) -> torch.Tensor:
        """One block, recomputed whole in the backward pass under full activation checkpointing: the
        :meth:`hidden_states` loop's step, and a pipeline stage's."""
        if self.activation_checkpointing == "full" and self.training:
            # Recompute activations in the backward pass instead of storing them (Chen et al. 2016).
            return torch.utils.checkpoint.checkpoint(block, x, rope, cache, mask, is_causal, use_reentrant=False)
        return block(x, rope, cache, mask, is_causal)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std) everywhere, with the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth
        (zero with ``zero_init_projections``, as modded-nanogpt does: every block starts as the identity).
        DeepNorm instead scales the value, output and feed-forward weights by beta (Wang et al. 2022)."""
        config, std = self.config, self.config.init_std
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
            if config.norm_placement == "deepnorm":
                beta = deepnorm_constants(config.n_layer)[1]
                with torch.no_grad():
                    block.attention.qkv.weight[(config.n_head + config.n_kv_head) * config.head_dim :] *= beta
                    for linear in [block.attention.out, *feed_forward_linears(block.feed_forward)]:
                        linear.weight *= beta
                continue
            for projection in residual_projections(block):
                if config.zero_init_projections:
                    nn.init.zeros_(projection.weight)
                else:
                    nn.init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        self.reset_position_tables(self.token_embedding.weight.device)

    def reset_position_tables(self, device) -> None:
        """(Re)compute the position tables that are not weights: after construction on another device
        (checkpoint loading builds the model on the meta device)."""
        if self.config.position == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.config, self.config.context_length, device=device)
        if self.config.position == "sinusoidal":
            self.sinusoids = sinusoidal_table(self.config, self.config.context_length, device=device)
        if self.config.position == "alibi":
            self.alibi = alibi_slopes(self.config.n_head).to(device)

    def new_cache(self, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        capacity = capacity or self.config.context_length
        weight = self.token_embedding.weight
        return KVCache(self.config, batch_size, capacity, dtype or weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        prefix_lengths: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, length, vocab) for ``input_ids`` (batch, length): the output head on
        :meth:`hidden_states` (same arguments). With ``targets`` (batch, length), the per-position
        cross-entropy of :meth:`token_losses` instead, without ever holding every position's logits
        (through ``forward``, so DDP and FSDP see the call)."""
        hidden = self.hidden_states(input_ids, cache, prefix_lengths, document_ids)
        return self.output_logits(hidden) if targets is None else self.token_losses(hidden, targets)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states (..., n_embd) -> logits (..., vocab)."""
        logits = self.lm_head(hidden)
        if self.config.logit_softcap is not None:
            # Gemma 2 (Team et al. 2024): a smooth bound on the logits that keeps early training stable.
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def token_losses(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
        """Next-token cross-entropy per position (batch, length) of the head on ``hidden``, 0 where the
        target is :data:`IGNORE_INDEX`, computed ``chunk_tokens`` positions at a time (:meth:`_by_chunks`)."""
        # Only the positions with a target go through the head: the others' loss and gradient are 0. In SFT
        # the prompt tokens (38 % of the Alpaca rows) then cost no head work: 7-10 % of SmolLM2's step, whose
        # head has a 49k vocabulary.
        trainable = any(parameter.requires_grad for parameter in self.lm_head.parameters())
        frozen_head = not trainable and hidden.requires_grad and torch.is_grad_enabled()  # LoRA's
        (losses,) = self._at_positions(
            self._chunk_losses, hidden, targets, targets != IGNORE_INDEX, chunk_tokens, frozen_head
        )
        return losses

    def _chunk_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
        # float32: bf16 logits lose too much precision for a softmax over the vocabulary.
        return (_CrossEntropy.apply(self.output_logits(hidden).float(), targets),)

    def token_logprobs(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float = 1.0,
        chunk_tokens: int = 2048,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(token), entropy of the whole distribution) per position (batch, length) of the head on
        ``hidden`` at ``temperature``, by chunks as :meth:`token_losses`: what policy-gradient losses need.
        With ``positions`` (bool, shaped as ``tokens``) only those go through the head, the others are 0."""
        per_chunk = functools.partial(self._chunk_logprobs, temperature=temperature)
        if positions is None:
            return tuple(self._by_chunks(per_chunk, hidden, tokens, chunk_tokens))
        return tuple(self._at_positions(per_chunk, hidden, tokens, positions, chunk_tokens))

    def _chunk_logprobs(
        self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_distribution = F.log_softmax(self.output_logits(hidden).float() / temperature, dim=-1)
        entropy = -(log_distribution.exp() * log_distribution).sum(dim=-1)
        return log_distribution.gather(-1, tokens[:, None]).squeeze(-1), entropy

    def _at_positions(
        self,
        per_chunk,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        chunk_tokens: int,
        frozen_head: bool = False,
    ) -> list:
        """:meth:`_by_chunks` on the positions where ``positions`` is True only, 0 at the others: a prompt,
        padding or a tool's result needs no head (a 49k-vocabulary product and softmax per position)."""
        selected = positions.flatten().nonzero().squeeze(1)
        parts = self._by_chunks(
            per_chunk, hidden.flatten(0, -2)[selected], tokens.flatten()[selected], chunk_tokens, frozen_head
        )
        return [
            hidden.new_zeros(tokens.numel(), dtype=part.dtype).index_put((selected,), part).view_as(tokens)
            for part in parts
        ]

    def _by_chunks(
        self, per_chunk, hidden: torch.Tensor, tokens: torch.Tensor, chunk_tokens: int, frozen_head: bool = False
    ) -> list:
        """``per_chunk(hidden, tokens)`` (a tuple of per-position tensors) over ``chunk_tokens`` positions at a
        time, each shaped as ``tokens``. With more than one chunk, each chunk's logits are recomputed in the
        backward pass instead of kept (the idea of Liger Kernel's fused linear cross-entropy): memory holds
        chunk × vocab logits, not batch × length × vocab, which for a 49k vocabulary outweighs every activation of
        a small model (14 GiB of log-probabilities for SmolLM2's GRPO batch). With ``frozen_head`` (``per_chunk``
        gives one tensor, and the head has nothing to train: LoRA), each chunk's gradient with respect to its
        hidden states is worked out in the forward pass instead (:class:`_FrozenHeadLosses`), one head product
        fewer."""

        flat_hidden, flat_tokens = hidden.flatten(0, -2), tokens.flatten()
        one_chunk = flat_tokens.numel() <= chunk_tokens

        def run(hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if frozen_head:
                return (_FrozenHeadLosses.apply(hidden, tokens, per_chunk),)
            if one_chunk:
                # Nothing to save by recomputing: the head's backward runs while every activation of the body is
                # still held, so recomputed logits would be held then too, at the same peak.
                return per_chunk(hidden, tokens)
            return torch.utils.checkpoint.checkpoint(per_chunk, hidden, tokens, use_reentrant=False)

        pieces = [
            run(flat_hidden[start : start + chunk_tokens], flat_tokens[start : start + chunk_tokens])
            for start in range(0, max(flat_tokens.numel(), 1), chunk_tokens)  # no positions: one empty chunk
        ]
        return [torch.cat(parts).view_as(tokens) for parts in zip(*pieces)]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        prefix_lengths: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's outputs after the final norm (batch, length, n_embd): what the output head
        reads, and what reward and value heads read instead (Ouyang et al. 2022 §3.5).

        With a ``cache``, ``input_ids`` continue the sequences already in it: each row's keys and values
        are appended after that row's cached ones (rows may sit at different positions) and attention
        covers everything the row has cached so far. ``prefix_lengths`` (batch,) makes a
        prefix decoder (Raffel et al. 2020 §3.2.1): the first ``prefix_lengths[b]`` tokens of row b
        attend to each other in both directions, the rest causally. ``document_ids`` (batch, length) packs
        several documents into a row: a token attends only to earlier tokens of its own document, and
        positions restart at 0 where a document starts, so each document computes what it would alone.
        """
        length = input_ids.shape[1]
        if prefix_lengths is not None and cache is not None:
            raise ValueError("prefix_lengths is for whole sequences, not for incremental decoding with a cache")
        if document_ids is not None and (cache is not None or prefix_lengths is not None):
            raise ValueError("document_ids is for whole causal sequences, without a cache or prefix_lengths")
        start, end = cache.begin(length) if cache is not None else (0, length)
        if end > self.config.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds context_length={self.config.context_length}")
        positions = self._positions(start, length)
        mask, is_causal = self._attention_mask(
            positions, start if isinstance(start, int) else None, end, prefix_lengths, document_ids
        )
        if document_ids is not None:
            positions = document_positions(document_ids)

        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        if self.config.position == "sinusoidal":
            x = x + self.sinusoids[positions].to(x.dtype)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.embedding_dropout(x)
        rope = None
        if self.config.position == "rope":
            # (length,) positions broadcast over batch and heads; per-row positions (cached rows apart) get a head axis.
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if positions.dim() == 2:
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        for block in self.blocks:
            x = self.run_block(block, x, rope, cache, mask, is_causal)
        if cache is not None:
            cache.advance(length)
        self._collect_expert_statistics(x)
        return self.final_norm(x)

    def _collect_expert_statistics(self, like: torch.Tensor) -> None:
        if not self.config.moe_experts:
            self.aux_loss = like.new_zeros((), dtype=torch.float32)
            return
        layers = [block.feed_forward for block in self.blocks]
        self.aux_loss = self.config.moe_aux_loss_weight * torch.stack([layer.aux_loss for layer in layers]).sum()
        self.expert_utilisation = torch.stack([layer.utilisation for layer in layers])

    def _positions(self, start: int | torch.Tensor, length: int) -> torch.Tensor:
        """Positions of ``length`` tokens from ``start``: (length,), or (batch, length) from (batch, 1) row starts."""
        return start + torch.arange(length, device=self.token_embedding.weight.device)

    def _attention_mask(
        self,
        positions: torch.Tensor,
        start: int | None,
        end: int,
        prefix_lengths: torch.Tensor | None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for scaled_dot_product_attention over keys 0..end-1, for queries at
        ``positions`` (length,), or per row (batch, length) when cached rows sit at different positions
        (``start`` None): a boolean mask of allowed keys, or a float bias when ALiBi adds its distance
        penalty; ``(None, True)`` / ``(None, False)`` for the plain causal cases. ``document_ids`` (batch, end)
        keeps each query to the keys of its own document (block-diagonal causal attention): as
        :class:`DocumentSpans`, attended span by span, except under ALiBi, whose bias needs the dense mask."""
        alibi = self.config.position == "alibi"
        if not alibi and prefix_lengths is None and document_ids is None and start is not None:
            if start == 0:
                return None, True
            if positions.shape[-1] == 1:
                return None, False  # one new token attends to everything cached
        key_positions = self._positions(0, end)
        query_positions = positions.unsqueeze(-1)  # ([batch,] length, 1)
        allowed = key_positions <= query_positions  # ([batch,] length, end)
        if prefix_lengths is not None:
            prefix = prefix_lengths.to(positions.device).view(-1, 1, 1)
            allowed = allowed | ((key_positions < prefix) & (query_positions < prefix))
        if document_ids is not None:
            if not alibi and prefix_lengths is None:
                spans = DocumentSpans.of(document_ids)
                if len(spans.spans) == len(document_ids):
                    # One document a row: plain causal attention, every row in one call (4 rows of SmolLM2's 256
                    # tokens, forward and backward: 20.5 ms span by span, 17.5-19 ms in one call).
                    return None, True
                return spans, False
            allowed = allowed & (document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2))
        allowed = allowed.unsqueeze(-3)  # a head axis
        if not alibi:
            return allowed, False
        # ALiBi (Press et al. 2022): no position embedding; each head penalises attention linearly in the
        # distance between query and key positions (symmetric, so prefix tokens look both ways alike).
        distance = (query_positions - key_positions).abs().float().unsqueeze(-3)  # ([batch,] 1, length, end)
        bias = -self.alibi.view(-1, 1, 1) * distance
        return bias.masked_fill(~allowed, float("-inf")), False

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
        if self.config.moe_experts:
            # A token passes through top_k experts, not all of them.
            per_expert = sum(p.numel() for p in experts_of(self.blocks[0].feed_forward)[0].parameters())
            weights -= self.config.n_layer * (self.config.moe_experts - self.config.moe_top_k) * per_expert
        return 6 * weights + 12 * self.config.n_layer * self.config.n_embd * length
