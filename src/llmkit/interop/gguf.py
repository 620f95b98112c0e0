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

The vocabulary goes in as a byte-level BPE (``tokenizer.ggml.model`` "gpt2" with GPT-2's pre-tokenizer
regex, which is what llmkit trains): tokens, their types, merges and the bos/eos/end-of-turn/pad ids,
plus the chat template.
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
from llmkit.interop.tokens import chat_template, special_tokens
from llmkit.model.config import ModelConfig
from llmkit.tokenizer import END, Tokenizer

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


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id, padded to the model's ``vocab_size``), their llama.cpp token types and the merges
    of a byte-level BPE tokenizer."""
    data = json.loads(tokenizer.tokenizer_json)
    model, pre_tokenizer = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre_tokenizer.get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex", True):
        raise MismatchError(f"tokenizer (kind {tokenizer.kind!r}, model {model.get('type')!r}, pre-tokenizer "
                            f"{pre_tokenizer.get('type')!r}) has no GGUF equivalent: llmkit writes byte-level BPE "
                            "with GPT-2's pre-tokenizer only (train one with --kind bpe)")
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


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    tokens, types, merges = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llmkit's BPE splits with GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {role: tokenizer.backend.token_to_id(token) for role, token in special_tokens(tokenizer).items()}
    writer.add_bos_token_id(ids["bos_token"])
    writer.add_eos_token_id(ids["eos_token"])
    writer.add_eot_token_id(tokenizer.special_ids[END])  # end of a chat turn: llama.cpp stops there too
    writer.add_pad_token_id(ids["pad_token"])
    writer.add_add_bos_token(False)  # llmkit never prepends a token
    writer.add_add_eos_token(False)
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
    return {"out": str(out), "checkpoint": str(folder), "architecture": architecture_name,
            "dtype": dtype, "tensors": len(tensors), "parameters": sum(tensor.numel() for tensor in tensors.values()),
            "bytes": out.stat().st_size, "seconds": time.perf_counter() - start}
