"""One GGUF file (llama.cpp's format) -> an llmkit checkpoint, read with the ``gguf`` package.

Four llama.cpp architectures compute what some llmkit config computes: ``llama`` and ``qwen2`` (RoPE,
RMSNorm, SwiGLU, grouped-query attention; Qwen2's query/key/value biases become llmkit's biases with
zeros where Qwen2 has none, the same function), ``qwen3`` (the same with QK-norm) and ``gpt2``. The
metadata becomes the Hugging Face config of the matching layout and goes through the very mapping a
Hugging Face import uses (:func:`llmkit.interop.hf_config.model_config_from_hf`); before that, every
``{arch}.*`` key is checked against the list of keys whose meaning llmkit computes, and anything else
(RoPE scaling, sliding windows, partial rotary, a head size other than width / heads, experts, logit
scales, an unknown key) is refused naming the GGUF key. The tensors are dequantized with
``gguf.quants.dequantize``, renamed through the same two tables export uses (llmkit's
:func:`~llmkit.interop.layouts.tensor_table` and ``gguf``'s tensor name map), and the rows of ``llama``'s
query and key projections are put back in rotate-half order (:func:`~llmkit.interop.gguf.interleave_rotary_pairs`
inverted); ``qwen2``/``qwen3`` already rotate halves in llama.cpp and are not reordered.

The vocabulary (``tokenizer.ggml.model`` "gpt2": byte-level BPE) is rebuilt as a ``tokenizers``
``tokenizer.json``: the tokens at their ids, the merges, control tokens as special added tokens and
user-defined ones as plain added tokens, and llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre``
(:data:`PRE_TOKENIZERS`). From there on it is a Hugging Face import: llmkit's missing special tokens are
added after the vocabulary, the source's bos/eos/pad/unk tokens and chat template go into
``tokenizer_config.json``, and the checkpoint folder has the same files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.interop.gguf import interleave_rotary_pairs
from llmkit.interop.hf import CHECKPOINT_FILES, check_replaceable, llmkit_state, write_import
from llmkit.interop.hf_config import model_config_from_hf
from llmkit.interop.layouts import GPT2, LLAMA, QWEN3, tensor_table
from llmkit.interop.tokens import imported_tokenizer
from llmkit.model.config import ModelConfig
from llmkit.tokenizer import Tokenizer

MAGIC = b"GGUF"
# GGUF architecture -> the Hugging Face layout whose llmkit config and tensor table it shares.
ARCHITECTURES = {"llama": LLAMA, "qwen2": LLAMA, "qwen3": QWEN3, "gpt2": GPT2}
# Tensor types read (dequantized to float32): the float types and the legacy and K-quants of llama.cpp.
QUANT = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (
    QUANT.F32,
    QUANT.F16,
    QUANT.BF16,
    QUANT.Q4_0,
    QUANT.Q4_1,
    QUANT.Q5_0,
    QUANT.Q5_1,
    QUANT.Q8_0,
    QUANT.Q2_K,
    QUANT.Q3_K,
    QUANT.Q4_K,
    QUANT.Q5_K,
    QUANT.Q6_K,
)
LINEAR_BIASES = (
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_output.bias",
    "ffn_gate.bias",
    "ffn_up.bias",
    "ffn_down.bias",
)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), as Hugging Face pre-tokenizers. GPT-2's regex is
# the one ByteLevel(use_regex=True) applies; "smollm" and its group first isolate every digit.
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str):
    return lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, llama.cpp's ignore_merges, llama.cpp's add_bos default)
PRE_TOKENIZERS = {
    **{name: (_gpt2_split, False, False) for name in ("gpt-2", "phi-2")},
    **{name: (_digits_then_gpt2_split, False, False) for name in ("smollm", "starcoder", "refact")},
    **{name: (_regex_split(LLAMA3_SPLIT), True, True) for name in ("llama-bpe", "llama3", "llama-v3")},
    **{name: (_regex_split(QWEN2_SPLIT), False, False) for name in ("qwen2", "deepseek-r1-qwen")},
}

# The {arch}.* keys whose meaning llmkit computes (per architecture family), with the values they may take
# when they are not read into the config. Every other {arch}.* key is refused.
_ROPE_KEYS = {
    "vocab_size",
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
}
_GPT2_KEYS = {
    "vocab_size",
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_epsilon",
}
_NEUTRAL = {
    "expert_count": (0,),
    "expert_used_count": (0,),
    "rope.scaling.type": ("none",),
    "rope.scaling.factor": (0.0, 1.0),
    "attention.causal": (True,),
    "use_parallel_residual": (False,),
    "tensor_data_layout": ("Meta AI original pth",),
}
# Why some keys are refused (by prefix); any other is "not a hyperparameter llmkit computes".
_REASONS = {
    "rope.scaling": "llmkit computes plain RoPE without scaling",
    "attention.sliding_window": "llmkit attends to the whole context",
    "rope.freq_base_swa": "llmkit attends to the whole context",
    "expert": "llmkit's Mixture-of-Experts (with capacity dropping) is not llama.cpp's",
    "attention.layer_norm_epsilon": "llama.cpp's {arch} normalises with RMSNorm (attention.layer_norm_rms_epsilon)",
    "attention.layer_norm_rms_epsilon": "llama.cpp's gpt2 normalises with LayerNorm (attention.layer_norm_epsilon)",
}


class _CheckedReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that says which metadata key or tensor a truncated or corrupt file breaks off
    in (the reader itself only fails on a reshape). Hooks its field and tensor building; when those
    internals change the generic error below still names the file."""

    last_key: str | None = None

    def _push_field(self, field, skip_sum: bool = False) -> int:
        self.last_key = field.name
        return super()._push_field(field, skip_sum)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size, known = len(self.data), {int(kind) for kind in QUANT}
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            if int(raw_type[0]) not in known:
                raise _Broken(
                    f"tensor '{name}' has tensor type id {int(raw_type[0])}, which the gguf package does not know"
                )
            block, type_size = gguf.GGML_QUANT_SIZES[QUANT(int(raw_type[0]))]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise _Broken(f"truncated: tensor '{name}' ends at byte {end} but the file has {size} bytes")
        super()._build_tensors(start_offs, fields)


class _Broken(Exception):
    pass


def read_gguf(path: Path) -> gguf.GGUFReader:
    """The file's reader; a foreign, truncated or corrupt file is one InputError naming it (and the key or
    tensor where it breaks off)."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != MAGIC:
        raise InputError(f"{path}: not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    reader = _CheckedReader.__new__(_CheckedReader)  # kept when __init__ fails: it knows the last key read
    try:
        reader.__init__(path, "r")
        return reader
    except _Broken as error:
        raise InputError(f"{path}: {error}") from None
    except Exception as error:  # the reader fails on numpy reshapes/views or enum values when the file is cut
        where = f" after metadata key '{reader.last_key}'" if reader.last_key else " in its header"
        raise InputError(f"{path}: truncated or corrupt GGUF file (reading failed{where}: {error})") from None


class _Metadata:
    """The GGUF key/value pairs, with refusals that name the file and the key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.path = path
        self.values: dict[str, Any] = {
            name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")
        }

    def get(self, key: str, default=None):
        value = self.values.get(key)
        return default if value is None else value

    def need(self, key: str):
        if key not in self.values:
            raise MismatchError(f"{self.path}: '{key}' is missing")
        return self.values[key]

    def refuse(self, key: str, value, reason: str) -> MismatchError:
        shown = value if not isinstance(value, list) or len(value) <= 8 else f"[{len(value)} values]"
        return MismatchError(f"{self.path}: '{key}' = {shown!r} is not supported: {reason}")

    def scalar(self, key: str, default=None):
        """A number that must be one value for all layers; required unless ``default`` is given."""
        value = self.need(key) if default is None else self.get(key, default)
        if isinstance(value, list):
            raise self.refuse(key, value, "per-layer values; llmkit's layers all have the same shape")
        return value


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _check_keys(meta: _Metadata, arch: str) -> None:
    allowed = _GPT2_KEYS if arch == "gpt2" else _ROPE_KEYS
    for key, value in meta.values.items():
        if key == "split.count" and value > 1:
            raise meta.refuse(key, value, "llmkit reads one GGUF file; merge the parts with llama-gguf-split --merge")
        if not key.startswith(f"{arch}."):
            continue  # general.*, tokenizer.*, quantize.*: informational or read by the tokenizer
        suffix = key[len(arch) + 1 :]
        if suffix in allowed or (suffix in _NEUTRAL and value in _NEUTRAL[suffix]):
            continue
        reason = next(
            (text for prefix, text in _REASONS.items() if suffix.startswith(prefix)),
            "llmkit does not compute this llama.cpp hyperparameter",
        )
        raise meta.refuse(key, value, reason.format(arch=arch))


def model_config_from_gguf(
    meta: _Metadata, arch: str, vocab_size: int, tied: bool, bias: bool
) -> tuple[ModelConfig, str]:
    """The llmkit config of the GGUF model: its metadata as the Hugging Face config of the matching layout,
    mapped as a Hugging Face import maps it, once every key llmkit does not compute has been refused."""
    _check_keys(meta, arch)

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_embd, n_head = meta.scalar(key("embedding_length")), meta.scalar(key("attention.head_count"))
    if n_embd % n_head:
        raise meta.refuse(
            key("attention.head_count"), n_head, f"llmkit's heads split {key('embedding_length')} = {n_embd} evenly"
        )
    head_dim = n_embd // n_head
    n_kv_head = meta.scalar(key("attention.head_count_kv"), n_head)
    if meta.get(key("vocab_size"), vocab_size) != vocab_size:
        raise meta.refuse(
            key("vocab_size"), meta.get(key("vocab_size")), f"tensor 'token_embd.weight' has {vocab_size} rows"
        )
    common = {"architectures": [ARCHITECTURES[arch]], "vocab_size": vocab_size, "tie_word_embeddings": tied}
    if arch == "gpt2":
        if n_kv_head != n_head:
            raise meta.refuse(key("attention.head_count_kv"), n_kv_head, "llama.cpp's gpt2 has multi-head attention")
        values = {
            **common,
            "n_positions": meta.scalar(key("context_length")),
            "n_embd": n_embd,
            "n_layer": meta.scalar(key("block_count")),
            "n_head": n_head,
            "n_inner": meta.scalar(key("feed_forward_length")),
            "activation_function": "gelu_new",  # ggml's GELU is the tanh approximation
            "layer_norm_epsilon": _float32(meta.scalar(key("attention.layer_norm_epsilon"))),
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            value = meta.scalar(key(name), head_dim)
            if value != head_dim:
                reason = (
                    "llmkit rotates the whole head"
                    if name.startswith("rope")
                    else f"llmkit's heads are {key('embedding_length')} / {key('attention.head_count')} = "
                    f"{head_dim} wide"
                )
                raise meta.refuse(key(name), value, reason)
        values = {
            **common,
            "max_position_embeddings": meta.scalar(key("context_length")),
            "hidden_size": n_embd,
            "num_hidden_layers": meta.scalar(key("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv_head,
            "head_dim": head_dim,
            "intermediate_size": meta.scalar(key("feed_forward_length")),
            "rms_norm_eps": _float32(meta.scalar(key("attention.layer_norm_rms_epsilon"))),
            "rope_theta": _float32(meta.scalar(key("rope.freq_base"), 10000.0)),
            "hidden_act": "silu",
            "attention_bias": bias,
            "mlp_bias": bias,
            "attention_dropout": 0.0,
        }
    try:
        return model_config_from_hf(values, Path(f"{meta.path} (metadata as a Hugging Face config)"))
    except ConfigError as error:  # e.g. head_count_kv not dividing head_count
        raise MismatchError(f"{meta.path}: the metadata gives no valid llmkit config: {error}") from None


def _check_type(tensor, path: Path) -> None:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise MismatchError(
            f"{path}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which llmkit does not "
            f"import (supported: {', '.join(kind.name for kind in SUPPORTED_TYPES)})"
        )


def _dequantized(tensor, path: Path) -> torch.Tensor:
    _check_type(tensor, path)
    array = np.array(
        dequantize(tensor.data, tensor.tensor_type), dtype=np.float32
    )  # a copy: the file is mapped read-only
    return torch.from_numpy(array).reshape(tuple(reversed(tensor.shape.tolist())))


def _same_tensor(first, second) -> bool:
    return first.tensor_type == second.tensor_type and np.array_equal(first.data, second.data)


def gguf_state(
    reader: gguf.GGUFReader, meta: _Metadata, path: Path
) -> tuple[dict[str, torch.Tensor], ModelConfig, str]:
    """The llmkit state dict, config and layout of the file's model."""
    arch = meta.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise meta.refuse("general.architecture", arch, f"llmkit imports {', '.join(ARCHITECTURES)}")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise MismatchError(f"{path}: tensor 'token_embd.weight' is missing")
    for tensor in tensors.values():  # before any work: the type of every tensor
        _check_type(tensor, path)
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    # llama.cpp reads the head from token_embd when output is absent; gpt2 export writes the tied copy too.
    tied = "output.weight" not in tensors or _same_tensor(tensors["output.weight"], tensors["token_embd.weight"])
    biases = sorted(name for name in tensors if name.startswith("blk.") and name.endswith(LINEAR_BIASES))
    if arch == "qwen3" and biases:
        raise MismatchError(
            f"{path}: tensor '{biases[0]}' is not supported: llmkit's Qwen3 layout (QK-norm) has no biases"
        )
    config, layout = model_config_from_gguf(meta, arch, vocab_size, tied, bias=arch == "gpt2" or bool(biases))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layer)
    expected = {}  # GGUF name -> Hugging Face name, from the same tables export uses
    for entry in tensor_table(config, layout):
        for theirs in entry.theirs:
            expected[names.get_name(theirs, try_suffixes=(".weight", ".bias"))] = theirs
    if tied:
        tensors.pop("output.weight", None)
    for name in tensors:
        if name not in expected:
            reason = (
                "llama.cpp scales RoPE frequencies with it (Llama 3.1's 'llama3' scaling); llmkit computes plain RoPE"
                if name == "rope_freqs.weight"
                else f"llmkit's model of this {arch} has no place for it"
            )
            raise MismatchError(f"{path}: tensor '{name}' is not supported: {reason}")
    hf_state: dict[str, torch.Tensor] = {}
    for name, theirs in expected.items():
        if name in tensors:
            value = _dequantized(tensors[name], path)
        elif name.endswith(LINEAR_BIASES) and arch != "gpt2":
            # Qwen2 (and a Llama with some biases): a missing bias is a zero bias, the same function.
            weight = tensors.get(name.removesuffix(".bias") + ".weight")
            value = torch.zeros(int(weight.shape[1]) if weight is not None else 0)
        else:
            raise MismatchError(f"{path}: tensor '{name}' is missing for the metadata's {arch} model")
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = config.n_head if ".attn_q." in name else config.n_kv_head
            value = interleave_rotary_pairs(value, heads, inverse=True)  # back to rotate-half order
        hf_state[theirs] = value
    state = llmkit_state(hf_state, config, layout, path, conv1d=False, origin="its metadata")
    return state, config, layout


def gguf_tokenizer(meta: _Metadata, vocab_size: int) -> tuple[Tokenizer, list[str], int, dict]:
    """The file's vocabulary as an llmkit tokenizer (llmkit's missing special tokens added, as a Hugging
    Face import adds them), the added tokens, the source's size and the GGUF special token ids."""
    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise meta.refuse("tokenizer.ggml.model", kind, "llmkit imports byte-level BPE vocabularies ('gpt2') only")
    pre = meta.need("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise meta.refuse("tokenizer.ggml.pre", pre, f"llmkit knows the pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    for key in ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.remove_extra_whitespaces"):
        if meta.get(key):
            raise meta.refuse(key, True, "llmkit's byte-level tokenizers keep the text as given")
    if meta.get("tokenizer.ggml.precompiled_charsmap") is not None:
        raise meta.refuse(
            "tokenizer.ggml.precompiled_charsmap", "...", "llmkit's byte-level tokenizers normalise nothing"
        )
    tokens = meta.need("tokenizer.ggml.tokens")
    if len(tokens) != vocab_size:
        raise meta.refuse(
            "tokenizer.ggml.tokens",
            tokens,
            f"{len(tokens)} tokens, but tensor 'token_embd.weight' has {vocab_size} rows",
        )
    types = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise meta.refuse("tokenizer.ggml.token_type", types, f"{len(types)} types for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token in vocab:
            raise meta.refuse("tokenizer.ggml.tokens", token, f"appears at ids {vocab[token]} and {token_id}")
        vocab[token] = token_id
    merges = []
    for merge in meta.need("tokenizer.ggml.merges"):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise meta.refuse("tokenizer.ggml.merges", merge, "a merge is two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    split, ignore_merges, add_bos_default = PRE_TOKENIZERS[pre]
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    )
    backend.pre_tokenizer = split()
    backend.decoder = decoders.ByteLevel()
    # Tokens llama.cpp matches whole in the text; they keep their ids (the model vocabulary already has them).
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN)}
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind in special]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types)
            if kind == int(gguf.TokenType.USER_DEFINED)
        ]
    )
    ids = {}
    for role in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        key = f"tokenizer.ggml.{role}_token_id"
        token_id = meta.get(key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise meta.refuse(key, token_id, f"the vocabulary has {len(tokens)} tokens")
        ids[role] = token_id
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[role] is None:
            raise meta.refuse(f"tokenizer.ggml.add_{role}_token", True, f"'tokenizer.ggml.{role}_token_id' is missing")
    if add_bos or add_eos:  # what llama.cpp adds, for Hugging Face users of the files (llmkit adds nothing)
        bos = [tokens[ids["bos"]]] if add_bos else []
        eos = [tokens[ids["eos"]]] if add_eos else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B", *eos],
            special_tokens=[(token, vocab[token]) for token in dict.fromkeys(bos + eos)],
        )
    named = {"bos_token": ids["bos"], "eos_token": ids["eos"], "unk_token": ids["unknown"], "pad_token": ids["padding"]}
    source_config = {
        "kind": "bpe",
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        **{role: tokens[token_id] for role, token_id in named.items() if token_id is not None},
    }
    ends = [ids[role] for role in ("eos", "eot", "eom") if ids[role] is not None]
    tokenizer, added, source_size = imported_tokenizer(
        backend,
        backend.to_str().encode("utf-8"),
        source_config,
        str(meta.path),
        ends,
        extra={"add_bos_token": add_bos, "add_eos_token": add_eos},
    )
    return tokenizer, added, source_size, {"pre_tokenizer": pre, "special_token_ids": ids}


def import_gguf(file: str | Path, out: str | Path, dtype: str | None = "float32") -> dict:
    """Write the model in the GGUF ``file`` as an llmkit checkpoint ``out``: weights dequantized to float32,
    then ``dtype`` (None keeps float32). Refuses (MismatchError naming the file and the GGUF key or tensor)
    an architecture, hyperparameter, tensor type or vocabulary that llmkit would not compute exactly."""
    start = time.perf_counter()
    path, out = Path(file), Path(out)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_replaceable(out, CHECKPOINT_FILES)
    reader = read_gguf(path)
    meta = _Metadata(reader, path)
    state, config, layout = gguf_state(reader, meta, path)
    tokenizer, added, source_size, token_info = gguf_tokenizer(meta, state["token_embedding.weight"].shape[0])
    imported_from = {
        "gguf_architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "tensor_types": sorted({tensor.tensor_type.name for tensor in reader.tensors}),
        **token_info,
    }
    summary = write_import(out, path, state, config, layout, dtype, tokenizer, added, source_size, imported_from, start)
    return {
        **summary,
        "gguf_architecture": imported_from["gguf_architecture"],
        "tensor_types": imported_from["tensor_types"],
    }
