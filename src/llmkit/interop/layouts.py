"""Which Hugging Face architecture an llmkit model is, and the config and tensor names of each.

llmkit has one Transformer whose variants are config fields; Hugging Face has one class per
architecture. Three of theirs compute exactly what some llmkit configs compute:

* ``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU (or GeGLU: ``hidden_act`` "gelu"), grouped-query
  attention, biases on every projection or on none (``attention_bias`` = ``mlp_bias``).
* ``Qwen3ForCausalLM``: the Llama layout plus QK-norm (an RMSNorm over each head's queries and keys
  before RoPE, weights shared across heads: the same as llmkit's ``qk_norm``), without biases.
* ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU (exact or tanh), ReLU or squared ReLU,
  multi-head attention, biases (a model without biases is exported with zero biases, which computes
  the same function).

A config outside these is refused with a :class:`MismatchError` naming the field and value that has
no equivalent, rather than exported into a model that would compute something else. Both directions
share one table per architecture (:func:`tensor_table`), so export and import cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import MismatchError
from llmkit.model.config import ModelConfig

LLAMA, QWEN3, GPT2 = "LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", GPT2: "gpt2"}
# llmkit activation -> GPT-2's activation_function. The tanh GELU goes out as PyTorch's own tanh
# approximation, the very function llmkit calls, so logits agree to the last bit.
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}
# Hugging Face activation names that compute one of llmkit's (gelu_new and gelu_fast are the tanh
# formula written out, gelu_python the erf one).
GPT2_ACTIVATIONS_IN = {
    **{hf: ours for ours, hf in GPT2_ACTIVATIONS.items()},
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python": "gelu",
}
# Llama's MLP is down(act(gate) * up): silu is SwiGLU, exact gelu is GeGLU.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
GATED_ACTIVATIONS_IN = {hf: ours for ours, hf in GATED_ACTIVATIONS.items()}


def refuse(field: str, value, reason: str) -> MismatchError:
    return MismatchError(f"model config field '{field}' = {value!r} has no Hugging Face equivalent: {reason}")


def _require(config: ModelConfig, field: str, allowed: tuple, layout: str) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise refuse(field, value, f"the {layout} layout needs {' or '.join(map(repr, allowed))}")


def hf_architecture(config: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what ``config`` computes."""
    for field, allowed in (
        ("norm_placement", ("pre",)),
        ("embedding_norm", (False,)),
        ("logit_softcap", (None,)),
        ("moe_experts", (0,)),
    ):
        _require(config, field, allowed, "Llama or GPT-2")
    if config.position == "rope":
        _require(config, "norm", ("rmsnorm",), "Llama")
        _require(config, "activation", tuple(GATED_ACTIVATIONS), "Llama")
        if config.qk_norm:
            # Qwen3 puts biases on the attention projections only; llmkit's one flag covers all.
            _require(config, "bias", (False,), "Qwen3 (Llama with QK-norm)")
            return QWEN3
        return LLAMA
    if config.position == "learned":
        _require(config, "norm", ("layernorm",), "GPT-2")
        _require(config, "activation", tuple(GPT2_ACTIVATIONS), "GPT-2")
        _require(config, "qk_norm", (False,), "GPT-2")
        _require(config, "n_kv_head", (config.n_head,), "GPT-2 (multi-head attention only)")
        return GPT2
    raise refuse("position", config.position, "exportable layouts use 'rope' (Llama) or 'learned' (GPT-2)")


@dataclass(frozen=True)
class TensorEntry:
    """One llmkit tensor and the Hugging Face tensor(s) holding it: several when llmkit fuses them
    (qkv; gate and up), split along the first axis in the order given; ``transpose`` for GPT-2's
    Conv1D, which stores (in, out) where ``nn.Linear`` stores (out, in)."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    transpose: bool = False


def tensor_table(config: ModelConfig, architecture: str) -> list[TensorEntry]:
    """Every tensor of the llmkit model with ``config``, mapped to ``architecture``'s names. GPT-2's
    biases are listed even when llmkit has none (export writes zeros; import always has them)."""
    if architecture == GPT2:
        return _gpt2_table(config)
    head, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    entries = [
        TensorEntry("token_embedding.weight", ("model.embed_tokens.weight",)),
        TensorEntry("final_norm.weight", ("model.norm.weight",)),
    ]
    for index in range(config.n_layer):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        kinds = ("weight", "bias") if config.bias else ("weight",)
        for kind in kinds:
            entries += [
                TensorEntry(
                    f"{ours}attention.qkv.{kind}",
                    tuple(f"{theirs}self_attn.{name}_proj.{kind}" for name in "qkv"),
                    (head, kv, kv),
                ),
                TensorEntry(f"{ours}attention.out.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)),
                # FeedForward.forward chunks its fused projection as (gate, up).
                TensorEntry(
                    f"{ours}feed_forward.up.{kind}",
                    (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}"),
                    (config.ffn_hidden, config.ffn_hidden),
                ),
                TensorEntry(f"{ours}feed_forward.down.{kind}", (f"{theirs}mlp.down_proj.{kind}",)),
            ]
        entries += [
            TensorEntry(f"{ours}attention_norm.weight", (f"{theirs}input_layernorm.weight",)),
            TensorEntry(f"{ours}feed_forward_norm.weight", (f"{theirs}post_attention_layernorm.weight",)),
        ]
        if config.qk_norm:
            entries += [
                TensorEntry(f"{ours}attention.{name}_norm.weight", (f"{theirs}self_attn.{name}_norm.weight",))
                for name in "qk"
            ]
    if not config.tie_embeddings:
        entries.append(TensorEntry("lm_head.weight", ("lm_head.weight",)))
    return entries


def _gpt2_table(config: ModelConfig) -> list[TensorEntry]:
    entries = [
        TensorEntry("token_embedding.weight", ("transformer.wte.weight",)),
        TensorEntry("position_embedding.weight", ("transformer.wpe.weight",)),
        TensorEntry("final_norm.weight", ("transformer.ln_f.weight",)),
        TensorEntry("final_norm.bias", ("transformer.ln_f.bias",)),
    ]
    pairs = {
        "attention_norm": "ln_1",
        "attention.qkv": "attn.c_attn",
        "attention.out": "attn.c_proj",
        "feed_forward_norm": "ln_2",
        "feed_forward.up": "mlp.c_fc",
        "feed_forward.down": "mlp.c_proj",
    }
    for index in range(config.n_layer):
        for ours, theirs in pairs.items():
            ours, theirs = f"blocks.{index}.{ours}", f"transformer.h.{index}.{theirs}"
            entries += [
                TensorEntry(f"{ours}.weight", (f"{theirs}.weight",), transpose="norm" not in ours),
                TensorEntry(f"{ours}.bias", (f"{theirs}.bias",)),
            ]
    if not config.tie_embeddings:
        entries.append(TensorEntry("lm_head.weight", ("lm_head.weight",)))
    return entries
