"""llmkit checkpoint -> one GGUF file for llama.cpp, written with the ``gguf`` package.

Two llama.cpp architectures compute what an llmkit model computes: ``llama`` (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases) and ``gpt2`` (learned positions, LayerNorm with biases, the tanh
GELU that ggml's ``gelu`` is). Anything else is refused naming the field. The tensors are the Hugging
Face export's (:func:`llmkit.interop.hf.hf_tensors`) renamed by the ``gguf`` package's own name map,
the way llama.cpp's ``convert_hf_to_gguf.py`` does it, with one change of layout: llmkit, like Hugging
Face, rotates the pairs (i, i + head_dim/2) of each head ("rotate half"), while llama.cpp's ``llama``
rotates adjacent pairs (2i, 2i + 1). :func:`interleave_rotary_pairs` reorders the rows of the query and
key projections accordingly (convert_hf_to_gguf.py's ``LlamaModel.permute``); queries and keys get the
same order, so their dot products, and the model, are unchanged.

The vocabulary goes in as a byte-level BPE (``tokenizer.ggml.model`` "gpt2"): tokens, their types,
merges, the chat template, and the pre-tokenizer llama.cpp names for the one in ``tokenizer.json``
(``gpt-2`` for GPT-2's regex, which is what llmkit trains; ``smollm``, ``llama-bpe`` and ``qwen2`` for
the ones GGUF import rebuilds, :data:`llmkit.interop.gguf_import.PRE_TOKENIZERS`; anything else is
refused). The special ids are the model's own: its bos (when it has one), its eos, the other ids
generation stops at (``Tokenizer.stop_ids``) as end-of-turn and end-of-message, and its pad; so a
model that keeps its own vocabulary and chat template (an imported SmolLM2) stops in llama.cpp where
it stops in llmkit. ``add_bos_token`` is true exactly when ``tokenizer.json`` prepends bos itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.interop.hf import WEIGHTS_FILE, hf_tensors, read_checkpoint
from llmkit.interop.layouts import GPT2, LLAMA, QWEN3, hf_architecture
from llmkit.interop.tokens import chat_template
from llmkit.model.config import ModelConfig
from llmkit.tokenizer import Tokenizer

GGUF_ARCHITECTURES = {LLAMA: gguf.MODEL_ARCH.LLAMA, GPT2: gguf.MODEL_ARCH.GPT2}
FILE_TYPES = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16}


def _refuse(field: str, value, reason: str) -> MismatchError:
    return MismatchError(f"model config field '{field}' = {value!r} has no GGUF (llama.cpp) equivalent: {reason}")


def gguf_architecture(config: ModelConfig) -> str:
    """The Hugging Face layout of ``config`` when llama.cpp has a matching architecture."""
    architecture = hf_architecture(config)
    if architecture == QWEN3:
        raise _refuse("qk_norm", True, "llama.cpp's llama architecture has no QK-norm (export to Hugging Face instead)")
    if architecture == LLAMA and config.activation != "swiglu":
        raise _refuse("activation", config.activation, "llama.cpp's llama architecture gates with SiLU (swiglu)")
    if architecture == LLAMA and config.bias:
        raise _refuse("bias", True, "llama.cpp's llama architecture is exported without biases")
    if architecture == GPT2 and config.activation != "gelu_tanh":
        raise _refuse("activation", config.activation, "llama.cpp's gpt2 architecture uses the tanh GELU (gelu_tanh)")
    return architecture


def interleave_rotary_pairs(weight: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """Rows of a query/key projection (or its bias) reordered per head so that output 2j is the old j and
    2j+1 the old j + head_dim/2: the pairs that rotate-half RoPE rotates become adjacent, as llama.cpp
    rotates. ``inverse=True`` undoes it (GGUF import): row j comes back from 2j, row j + head_dim/2 from 2j+1."""
    half = weight.shape[0] // heads // 2
    grouped = (heads, half, 2) if inverse else (heads, 2, half)
    return weight.reshape(*grouped, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# Hugging Face's own spellings of the Llama 3 and Qwen2 split regexes (their tokenizer.json files), which
# match what llama.cpp's "llama-bpe" and "qwen2" pre-tokenizers split.
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_HF_SPLITS = {
    "llama-bpe": _HF_CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": _HF_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _canonical(pre_tokenizer) -> object:
    """A pre-tokenizer's JSON without the settings that change offsets only (``trim_offsets``)."""
    if isinstance(pre_tokenizer, dict):
        return {key: _canonical(value) for key, value in pre_tokenizer.items() if key != "trim_offsets"}
    if isinstance(pre_tokenizer, list):
        return [_canonical(value) for value in pre_tokenizer]
    return pre_tokenizer


def gguf_pre_tokenizer(data: dict) -> str:
    """The ``tokenizer.ggml.pre`` of the pre-tokenizer in a ``tokenizer.json``, whose BPE model must also
    use llama.cpp's ``ignore_merges`` setting for it."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from llmkit.interop.gguf_import import PRE_TOKENIZERS  # imports this module: not at the top

    def spelled(pre_tokenizer) -> object:
        probe = Backend(models.BPE())
        probe.pre_tokenizer = pre_tokenizer
        return _canonical(json.loads(probe.to_str())["pre_tokenizer"])

    candidates = [
        (name, spelled(build()), ignore_merges)
        for name, (build, ignore_merges, _) in PRE_TOKENIZERS.items()
        if name in ("gpt-2", "smollm", "llama-bpe", "qwen2")
    ]
    candidates += [
        (
            name,
            spelled(
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            ),
            name == "llama-bpe",
        )
        for name, pattern in _HF_SPLITS.items()
    ]
    ours = _canonical(data.get("pre_tokenizer"))
    for name, theirs, ignore_merges in candidates:
        if ours == theirs:
            if bool(data["model"].get("ignore_merges", False)) != ignore_merges:
                raise MismatchError(
                    f"tokenizer.json: model.ignore_merges = {data['model'].get('ignore_merges', False)} but "
                    f"llama.cpp's '{name}' pre-tokenizer has ignore_merges = {ignore_merges}"
                )
            return name
    kind = (data.get("pre_tokenizer") or {}).get("type")
    raise MismatchError(
        f"tokenizer.json: pre-tokenizer {kind!r} ({json.dumps(data.get('pre_tokenizer'))[:200]}) has no "
        "llama.cpp equivalent: GGUF export writes the pre-tokenizers gpt-2 (llmkit's), smollm, llama-bpe and qwen2"
    )


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id, padded to the model's ``vocab_size``), their llama.cpp token types and the merges
    of a byte-level BPE tokenizer."""
    data = json.loads(tokenizer.tokenizer_json)
    model, pre_tokenizer = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre_tokenizer):
        raise MismatchError(
            f"tokenizer (kind {tokenizer.kind!r}, model {model.get('type')!r}, pre-tokenizer "
            f"{pre_tokenizer.get('type')!r}) has no GGUF equivalent: llmkit writes byte-level BPE "
            "vocabularies only (train one with --kind bpe)"
        )
    if tokenizer.vocab_size > vocab_size:
        raise MismatchError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for token, token_id in model["vocab"].items():
        tokens[token_id] = token
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for token_id, token in enumerate(tokens):
        if token is None:  # the model's padding rows (convert_hf_to_gguf.py names them the same way)
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", gguf.TokenType.UNUSED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokens, [int(kind) for kind in types], merges


def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, architecture: str) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    if architecture == GPT2:
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)


def _named_id(tokenizer: Tokenizer, role: str) -> int | None:
    """The id of the token ``tokenizer_config.json`` names for ``role`` (bos_token, ...), if in the vocabulary."""
    token = tokenizer.config.get(role)
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.backend.token_to_id(token) if isinstance(token, str) else None


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos, eos, end-of-turn, end-of-message, pad (and unknown) ids for GGUF: the declared eos (else the
    first stop id) is eos, the other ids generation stops at are end-of-turn then end-of-message (llmkit's
    own tokenizers: eos ``<|endoftext|>``, eot ``<|end|>``; SmolLM2: eos ``<|im_end|>`` alone)."""
    eos = _named_id(tokenizer, "eos_token")
    eos = eos if eos in tokenizer.stop_ids else tokenizer.stop_ids[0]
    others = [token_id for token_id in tokenizer.stop_ids if token_id != eos]
    if len(others) > 2:
        raise MismatchError(
            f"the model stops at {len(tokenizer.stop_ids)} token ids {tokenizer.stop_ids}; GGUF names "
            "three at most (eos, end-of-turn, end-of-message)"
        )
    return {
        "bos": _named_id(tokenizer, "bos_token"),
        "eos": eos,
        "eot": (others + [None])[0],
        "eom": (others[1:] + [None])[0],
        "pad": tokenizer.pad_id,
        "unknown": _named_id(tokenizer, "unk_token"),
    }


def _added_by_tokenizer(tokenizer: Tokenizer, ids: dict) -> tuple[bool, bool]:
    """Whether ``tokenizer.json``'s post-processor prepends bos / appends eos (llama.cpp's add_bos/add_eos)."""
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    prefix, suffix = full[:start], full[start + len(plain) :]
    for added, role in ((prefix, "bos"), (suffix, "eos")):
        if added and added != [ids[role]]:
            raise MismatchError(
                f"tokenizer.json's post-processor adds {added}, which is not the {role} token "
                f"({ids[role]}); llama.cpp can only add bos and eos"
            )
    return bool(prefix), bool(suffix)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    tokens, types, merges = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(json.loads(tokenizer.tokenizer_json)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = special_token_ids(tokenizer)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "eom": writer.add_eom_token_id,
        "pad": writer.add_pad_token_id,
        "unknown": writer.add_unk_token_id,
    }
    for role, token_id in ids.items():
        if token_id is not None:  # llama.cpp stops at eos, eot and eom
            adders[role](token_id)
    add_bos, add_eos = _added_by_tokenizer(tokenizer, ids)
    writer.add_add_bos_token(add_bos)  # llmkit's own tokenizers add nothing; Llama 3's prepend bos
    writer.add_add_eos_token(add_eos)
    writer.add_chat_template(chat_template(tokenizer))


def export_gguf(checkpoint: str | Path, out_file: str | Path, dtype: str | None = None) -> dict:
    """Write the checkpoint as the GGUF file ``out_file``, matrices in ``dtype`` (float32, the default,
    or float16; norms and biases stay float32 as llama.cpp expects)."""
    start = time.perf_counter()
    dtype = dtype or "float32"
    if dtype not in FILE_TYPES:
        raise ConfigError("dtype", dtype, f"GGUF export writes {' or '.join(FILE_TYPES)}")
    folder, config, state, tokenizer = read_checkpoint(checkpoint)
    architecture = gguf_architecture(config)
    if tokenizer is None:
        raise InputError(f"{folder}: no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF file")
    tensors = hf_tensors(state, config, architecture, folder / WEIGHTS_FILE, torch.float32, conv1d=False)
    if architecture == GPT2 and config.tie_embeddings:
        # llama.cpp's gpt2 graph reads its head from "output" (convert_hf_to_gguf.py writes the tied copy too).
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    names = gguf.get_tensor_name_map(GGUF_ARCHITECTURES[architecture], config.n_layer)
    architecture_name = gguf.MODEL_ARCH_NAMES[GGUF_ARCHITECTURES[architecture]]
    out = Path(out_file)
    if out.is_dir():
        raise InputError(f"{out}: is a directory; GGUF export writes one file (e.g. {out / 'model.gguf'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(temporary, architecture_name)
    try:
        writer.add_name(folder.name)
        writer.add_file_type(FILE_TYPES[dtype])
        _add_hyperparameters(writer, config, architecture)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for hf_name, tensor in tensors.items():
            if hf_name.endswith("self_attn.q_proj.weight"):
                tensor = interleave_rotary_pairs(tensor, config.n_head)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                tensor = interleave_rotary_pairs(tensor, config.n_kv_head)
            keep_float32 = tensor.dim() == 1 or dtype == "float32"
            array = tensor.numpy() if keep_float32 else tensor.to(torch.float16).numpy()
            writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.replace(temporary, out)  # the file appears complete or not at all
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    return {
        "out": str(out),
        "checkpoint": str(folder),
        "architecture": architecture_name,
        "dtype": dtype,
        "tensors": len(tensors),
        "parameters": sum(tensor.numel() for tensor in tensors.values()),
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - start,
    }
