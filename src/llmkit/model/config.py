"""ModelConfig: every architectural choice of the one Transformer, plus named presets."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from llmkit.config import check
from llmkit.errors import ConfigError

Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post", "sandwich", "deepnorm"]
Position = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
Activation = Literal["gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu"]
GATED_ACTIVATIONS = ("swiglu", "geglu")
# Activation recomputation (Korthikanti et al. 2022): none, the attention core only (selective), or whole blocks.
Recompute = Literal["none", "selective", "full"]
RECOMPUTE: tuple[str, ...] = typing.get_args(Recompute)
# Configs written when recomputation was on or off (a YAML boolean) read as whole blocks or none.
RECOMPUTE_BOOLEANS = {True: "full", False: "none"}


@dataclass
class ModelConfig:
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size (set from the tokenizer when training)"})
    context_length: int = field(default=256, metadata={"help": "maximum sequence length"})
    n_layer: int = field(default=4, metadata={"help": "number of Transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention (query) heads"})
    n_kv_head: int | None = field(
        default=None, metadata={"help": "key/value heads: n_head = MHA, 1 = MQA, between = GQA (default n_head)"}
    )
    n_embd: int = field(default=256, metadata={"help": "model width"})
    ffn_hidden: int | None = field(
        default=None, metadata={"help": "feed-forward width (default 4*n_embd; 2/3 of that for SwiGLU)"}
    )
    ffn_multiple_of: int = field(
        default=1, metadata={"help": "round the default feed-forward width up to a multiple of this (LLaMA: 256)"}
    )
    norm: Norm = field(default="layernorm", metadata={"help": "normalisation layer"})
    norm_placement: NormPlacement = field(
        default="pre", metadata={"help": "pre-LN (GPT-2), post-LN (GPT-1), sandwich-LN (CogView) or DeepNorm (DeepNet)"}
    )
    embedding_norm: bool = field(
        default=False, metadata={"help": "normalise the embeddings before the first block (BLOOM)"}
    )
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the normalisation layers"})
    position: Position = field(default="learned", metadata={"help": "position encoding"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    activation: Activation = field(default="gelu", metadata={"help": "feed-forward activation"})
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalise queries and keys per head before attention"})
    logit_softcap: float | None = field(
        default=None, metadata={"help": "squash output logits to (-cap, cap) with cap*tanh(x/cap) (Gemma 2)"}
    )
    zero_init_projections: bool = field(
        default=False, metadata={"help": "initialise the projections into the residual stream at zero"}
    )
    moe_experts: int = field(
        default=0, metadata={"help": "Mixture-of-Experts feed-forward with this many experts (0 = dense)"}
    )
    moe_top_k: int = field(default=2, metadata={"help": "experts each token is routed to"})
    moe_capacity_factor: float = field(
        default=1.25, metadata={"help": "expert capacity = factor * tokens * top_k / experts; overflow is dropped"}
    )
    moe_aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing auxiliary loss"})
    bias: bool = field(default=True, metadata={"help": "biases in linear and norm layers"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the input embedding and the output head"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    init_std: float = field(default=0.02, metadata={"help": "standard deviation of the normal weight init"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "ffn_multiple_of"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.n_embd % self.n_head == 0, "n_embd", self.n_embd, f"must be divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check(
            self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
            "n_kv_head",
            self.n_kv_head,
            f"must divide n_head={self.n_head}",
        )
        if self.position == "rope":
            check(self.head_dim % 2 == 0, "n_embd", self.n_embd, "RoPE needs an even head size (n_embd / n_head)")
        if self.position == "sinusoidal":
            check(self.n_embd % 2 == 0, "n_embd", self.n_embd, "sinusoidal positions need an even width")
        if self.ffn_hidden is None:
            hidden = 4 * self.n_embd
            if self.activation in GATED_ACTIVATIONS:
                # A gated unit has three matrices instead of two; 2/3 keeps the parameter count (Shazeer 2020, LLaMA).
                hidden = int(2 * hidden / 3)
            self.ffn_hidden = self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)
        check(self.ffn_hidden > 0, "ffn_hidden", self.ffn_hidden, "must be positive")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be positive")
        check(self.init_std > 0, "init_std", self.init_std, "must be positive")
        check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be positive")
        check(
            self.logit_softcap is None or self.logit_softcap > 0,
            "logit_softcap",
            self.logit_softcap,
            "must be positive",
        )
        check(self.moe_experts >= 0, "moe_experts", self.moe_experts, "must be 0 (dense) or more")
        if self.moe_experts:
            check(
                1 <= self.moe_top_k <= self.moe_experts,
                "moe_top_k",
                self.moe_top_k,
                f"must be in 1..moe_experts={self.moe_experts}",
            )
            check(self.moe_capacity_factor > 0, "moe_capacity_factor", self.moe_capacity_factor, "must be positive")
            check(self.moe_aux_loss_weight >= 0, "moe_aux_loss_weight", self.moe_aux_loss_weight, "must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "ModelConfig":
        values = dataclasses.asdict(self)
        if "n_embd" in changes or "activation" in changes or "ffn_multiple_of" in changes:
            values["ffn_hidden"] = None  # derived: recompute unless given
        if "n_head" in changes and "n_kv_head" not in changes and values["n_kv_head"] == values["n_head"]:
            values["n_kv_head"] = None
        values.update(changes)
        return ModelConfig(**values)


def _gpt(n_layer: int, n_embd: int, n_head: int, vocab_size: int, context_length: int, **extra) -> dict:
    gpt = dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        context_length=context_length,
        norm="layernorm",
        position="learned",
        activation="gelu_tanh",
        bias=True,
        tie_embeddings=True,
    )
    return {**gpt, **extra}


def _llama(n_layer: int, n_embd: int, n_head: int) -> dict:
    return dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=32000,
        context_length=2048,
        norm="rmsnorm",
        norm_eps=1e-6,
        position="rope",
        activation="swiglu",
        ffn_multiple_of=256,
        bias=False,
        tie_embeddings=False,
    )


# Shapes from the papers: GPT-1 (Radford et al. 2018), GPT-2 (2019), GPT-3 Table 2.1 (Brown et al. 2020),
# LLaMA Table 2 (Touvron et al. 2023). GPT-3 XL and 13B list widths that their head counts do not divide
# (2048/24, 5140/40); we keep the 128-wide heads, which gives 16 heads and width 5120.
PRESETS: dict[str, dict] = {
    "gpt1": _gpt(12, 768, 12, vocab_size=40478, context_length=512, norm_placement="post"),
    "gpt2": _gpt(12, 768, 12, vocab_size=50257, context_length=1024),
    "gpt2-medium": _gpt(24, 1024, 16, vocab_size=50257, context_length=1024),
    "gpt2-large": _gpt(36, 1280, 20, vocab_size=50257, context_length=1024),
    "gpt2-xl": _gpt(48, 1600, 25, vocab_size=50257, context_length=1024),
    "gpt3-125m": _gpt(12, 768, 12, vocab_size=50257, context_length=2048),
    "gpt3-350m": _gpt(24, 1024, 16, vocab_size=50257, context_length=2048),
    "gpt3-760m": _gpt(24, 1536, 16, vocab_size=50257, context_length=2048),
    "gpt3-1.3b": _gpt(24, 2048, 16, vocab_size=50257, context_length=2048),
    "gpt3-2.7b": _gpt(32, 2560, 32, vocab_size=50257, context_length=2048),
    "gpt3-6.7b": _gpt(32, 4096, 32, vocab_size=50257, context_length=2048),
    "gpt3-13b": _gpt(40, 5120, 40, vocab_size=50257, context_length=2048),
    "gpt3-175b": _gpt(96, 12288, 96, vocab_size=50257, context_length=2048),
    # BLOOM (BigScience 2022, Table 3): ALiBi, LayerNorm on the embeddings, vocabulary 250,680 padded to
    # 250,880 in the released model; 176,247,271,424 parameters.
    "bloom-176b": _gpt(70, 14336, 112, vocab_size=250880, context_length=2048, position="alibi", embedding_norm=True),
    "llama-7b": _llama(32, 4096, 32),
    "llama-13b": _llama(40, 5120, 40),
    "llama-33b": _llama(60, 6656, 52),
    "llama-65b": _llama(80, 8192, 64),
    # nanoGPT's CPU "baby GPT" for Tiny Shakespeare (character level); nanoGPT's MLP uses exact GELU.
    "baby-gpt": {**_gpt(4, 128, 4, vocab_size=65, context_length=64), "activation": "gelu"},
    # Small modern (LLaMA-style) models that train in minutes on a laptop CPU.
    "cpu-tiny": dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_kv_head=2,
        vocab_size=8192,
        context_length=128,
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        ffn_multiple_of=64,
        bias=False,
        tie_embeddings=True,
    ),
    "cpu-small": dict(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_kv_head=4,
        vocab_size=8192,
        context_length=256,
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        ffn_multiple_of=64,
        bias=False,
        tie_embeddings=True,
    ),
    # The fast recipe's architecture, from the ablations (docs/ablations.md): RoPE, RMSNorm, SwiGLU, no
    # biases, at cpu-small's size. The speed comes from training it with Muon (docs/train.md).
    "cpu-fast": dict(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_kv_head=4,
        vocab_size=8192,
        context_length=256,
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        ffn_multiple_of=64,
        bias=False,
        tie_embeddings=False,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with ``overrides`` applied (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError("preset", name, f"unknown preset; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ModelConfig(**values)
