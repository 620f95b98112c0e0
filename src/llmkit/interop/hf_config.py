"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for the Llama, Qwen3 and GPT-2 architectures.

Export writes every field the architecture reads, so nothing falls back to a Hugging Face default that
differs from llmkit's (GPT-2's dropout of 0.1, Llama's untied head, ...). Import reads the fields back
and refuses, naming the key, every option llmkit does not compute (RoPE scaling, sliding windows,
per-layer attention scaling, ...), so an imported checkpoint computes what the source model computes.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import MismatchError
from llmkit.interop.layouts import (
    GATED_ACTIVATIONS,
    GATED_ACTIVATIONS_IN,
    GPT2,
    GPT2_ACTIVATIONS,
    GPT2_ACTIVATIONS_IN,
    MODEL_TYPES,
    QWEN3,
)
from llmkit.model.config import ModelConfig


def hf_config(config: ModelConfig, architecture: str, token_ids: dict, dtype: str) -> dict:
    """``config.json`` of ``architecture`` for ``config``; ``token_ids`` has bos/eos/pad ids (or None)."""
    common = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "dtype": dtype,
        "use_cache": True,
    }
    if architecture == GPT2:
        return {
            **common,
            "n_positions": config.context_length,
            "n_ctx": config.context_length,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.ffn_hidden,
            "activation_function": GPT2_ACTIVATIONS[config.activation],
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    llama = {
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": GATED_ACTIVATIONS[config.activation],
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
        # transformers 5 reads rope_parameters; 4.x and llama.cpp's converter read rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
    }
    if architecture == QWEN3:
        return {**llama, "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return {**llama, "mlp_bias": config.bias, "pretraining_tp": 1}


class _Reader:
    """Typed access to a Hugging Face config that names the file and key in every refusal."""

    def __init__(self, values: dict, path: Path):
        self.values, self.path = values, path

    def get(self, key: str, default=None):
        value = self.values.get(key)
        return default if value is None else value

    def need(self, key: str):
        if self.values.get(key) is None:
            raise MismatchError(f"{self.path}: '{key}' is missing")
        return self.values[key]

    def refuse(self, key: str, value, reason: str) -> MismatchError:
        return MismatchError(f"{self.path}: '{key}' = {value!r} is not supported: {reason}")

    def expect(self, key: str, allowed: tuple, default, reason: str) -> None:
        value = self.get(key, default)
        if value not in allowed:
            raise self.refuse(key, value, reason)


def architecture_of(values: dict, path: Path) -> str:
    """The one supported architecture a Hugging Face config declares."""
    architectures = values.get("architectures") or []
    model_type = values.get("model_type")
    supported = [name for name in architectures if name in MODEL_TYPES]
    if len(architectures) == 1 and supported:
        return supported[0]
    if not architectures and model_type in MODEL_TYPES.values():
        return next(name for name, kind in MODEL_TYPES.items() if kind == model_type)
    raise MismatchError(
        f"{path}: architectures={architectures} (model_type={model_type!r}) is not supported; "
        f"llmkit imports {', '.join(MODEL_TYPES)}"
    )


def model_config_from_hf(values: dict, path: Path) -> tuple[ModelConfig, str]:
    """The llmkit config that computes what the Hugging Face config at ``path`` computes."""
    architecture = architecture_of(values, path)
    reader = _Reader(values, path)
    if architecture == GPT2:
        return _gpt2_config(reader), architecture
    return _llama_config(reader, architecture), architecture


def _gpt2_config(reader: _Reader) -> ModelConfig:
    activation = reader.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS_IN:
        raise reader.refuse("activation_function", activation, f"llmkit computes {', '.join(GPT2_ACTIVATIONS_IN)}")
    reader.expect("scale_attn_weights", (True,), True, "llmkit always scales attention scores by 1/sqrt(head size)")
    reader.expect("scale_attn_by_inverse_layer_idx", (False,), False, "llmkit does not scale attention by layer")
    reader.expect("add_cross_attention", (False,), False, "llmkit is decoder-only")
    n_embd = reader.need("n_embd")
    # llmkit has one dropout; the largest of GPT-2's three is the closest single value for fine-tuning.
    dropout = max(reader.get(key, 0.1) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
    return ModelConfig(
        vocab_size=reader.need("vocab_size"),
        context_length=reader.get("n_positions") or reader.need("n_ctx"),
        n_layer=reader.need("n_layer"),
        n_head=reader.need("n_head"),
        n_embd=n_embd,
        ffn_hidden=reader.get("n_inner", 4 * n_embd),
        norm="layernorm",
        norm_placement="pre",
        norm_eps=reader.get("layer_norm_epsilon", 1e-5),
        position="learned",
        activation=GPT2_ACTIVATIONS_IN[activation],
        bias=True,
        tie_embeddings=reader.get("tie_word_embeddings", True),
        dropout=dropout,
        init_std=reader.get("initializer_range", 0.02),
    )


def _rope_theta(reader: _Reader) -> float:
    reader.expect("rope_scaling", (None,), None, "llmkit computes plain RoPE without scaling")
    parameters = reader.get("rope_parameters", {})
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise reader.refuse("rope_parameters.rope_type", rope_type, "llmkit computes plain RoPE ('default')")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise reader.refuse(
            "rope_parameters.partial_rotary_factor",
            parameters["partial_rotary_factor"],
            "llmkit rotates the whole head",
        )
    return float(parameters.get("rope_theta", reader.get("rope_theta", 10000.0)))


def _llama_config(reader: _Reader, architecture: str) -> ModelConfig:
    hidden_act = reader.get("hidden_act", "silu")
    if hidden_act not in GATED_ACTIVATIONS_IN:
        raise reader.refuse("hidden_act", hidden_act, "llmkit's gated units are silu (SwiGLU) and gelu (GeGLU)")
    n_embd, n_head = reader.need("hidden_size"), reader.need("num_attention_heads")
    head_dim = reader.get("head_dim", n_embd // n_head)
    if head_dim * n_head != n_embd:
        raise reader.refuse(
            "head_dim", head_dim, f"llmkit's heads are hidden_size / num_attention_heads = {n_embd / n_head:g} wide"
        )
    bias = reader.get("attention_bias", False)
    if architecture == QWEN3:
        reader.expect(
            "attention_bias",
            (False,),
            False,
            "llmkit has one bias flag for attention and feed-forward, and Qwen3's feed-forward has no biases",
        )
        reader.expect("use_sliding_window", (False,), False, "llmkit attends to the whole context")
        layer_types = set(reader.get("layer_types", ["full_attention"]))
        if layer_types != {"full_attention"}:
            raise reader.refuse(
                "layer_types", sorted(layer_types), "llmkit attends to the whole context in every layer"
            )
    else:
        reader.expect("mlp_bias", (bias,), False, f"llmkit has one bias flag, and attention_bias is {bias}")
    return ModelConfig(
        vocab_size=reader.need("vocab_size"),
        context_length=reader.get("max_position_embeddings", 2048),
        n_layer=reader.need("num_hidden_layers"),
        n_head=n_head,
        n_kv_head=reader.get("num_key_value_heads", n_head),
        n_embd=n_embd,
        ffn_hidden=reader.need("intermediate_size"),
        norm="rmsnorm",
        norm_placement="pre",
        norm_eps=reader.get("rms_norm_eps", 1e-6),
        position="rope",
        rope_theta=_rope_theta(reader),
        activation=GATED_ACTIVATIONS_IN[hidden_act],
        qk_norm=architecture == QWEN3,
        bias=bias,
        tie_embeddings=reader.get("tie_word_embeddings", False),
        dropout=reader.get("attention_dropout", 0.0),
        init_std=reader.get("initializer_range", 0.02),
    )
