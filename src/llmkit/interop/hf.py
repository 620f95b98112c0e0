"""llmkit checkpoint <-> Hugging Face model directory.

:func:`export_hf` writes what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load
(``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` with the chat template); :func:`import_hf` reads such a directory back into
an llmkit checkpoint that ``load_model``, the engine and fine-tuning use. The architecture decision and
the tensor names live in :mod:`llmkit.interop.layouts`, the config fields in
:mod:`llmkit.interop.hf_config`, the tokenizer files in :mod:`llmkit.interop.tokens`; this module moves
the tensors: it splits llmkit's fused projections (qkv; gate and up) into Hugging Face's separate ones,
transposes for GPT-2's Conv1D, and joins them again on import.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from llmkit.errors import InputError, MismatchError
from llmkit.interop.hf_config import hf_config, model_config_from_hf
from llmkit.interop.layouts import GPT2, hf_architecture, tensor_table
from llmkit.interop.tokens import (
    SPECIAL_ROLES,
    generation_token_ids,
    grow_embeddings,
    hf_tokenizer_config,
    import_tokenizer,
)
from llmkit.io import atomic_directory, atomic_write_bytes, atomic_write_json, read_json
from llmkit.model.checkpoint import read_config, read_model_weights, resolve_checkpoint, write_model
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
CHECKPOINT_FILES = {WEIGHTS_FILE, "config.json", TOKENIZER_FILE, CONFIG_FILE}  # what an import writes
HF_FILES = {WEIGHTS_FILE, "config.json", "generation_config.json", TOKENIZER_FILE, CONFIG_FILE}
# Buffers some Hugging Face checkpoints carry that are derived, not learned: GPT-2's causal mask and
# older Llamas' rotary frequencies.
DERIVED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def check_replaceable(out: Path, names: set[str]) -> None:
    """``out`` may be replaced as a whole (atomic_directory does) only when it is new or holds nothing
    but files of the kind being written: a mistyped ``--out .`` must not delete a project."""
    if out.exists() and (not out.is_dir() or any(entry.name not in names for entry in out.iterdir())):
        raise InputError(f"{out}: exists and holds other files; give a new directory (or a previous output to replace)")


def read_checkpoint(path: str | Path) -> tuple[Path, ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """The folder, model config, weights and (when saved with it) tokenizer of an llmkit checkpoint, full
    or sharded."""
    folder = resolve_checkpoint(path)
    config = ModelConfig(**read_config(folder)["model"])
    state = read_model_weights(folder, config)
    tokenizer = Tokenizer.load(folder) if (folder / TOKENIZER_FILE).is_file() else None
    return folder, config, state, tokenizer


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_tensors(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    architecture: str,
    source: Path,
    dtype: torch.dtype,
    conv1d: bool = True,
) -> dict[str, torch.Tensor]:
    """llmkit weights under ``architecture``'s Hugging Face names, fused projections split, in ``dtype``.
    ``conv1d=False`` keeps GPT-2's matrices in ``nn.Linear``'s (out, in) layout (what GGUF stores)."""
    tensors: dict[str, torch.Tensor] = {}
    for entry in tqdm(tensor_table(config, architecture), desc="export: tensors", unit=" tensors"):
        value = state.get(entry.ours)
        if value is None and architecture == GPT2 and entry.ours.endswith(".bias"):
            # GPT-2 always has biases; a model without them is the same function with zero biases.
            value = torch.zeros(state[entry.ours.removesuffix(".bias") + ".weight"].shape[0])
        if value is None:
            raise MismatchError(f"{source}: tensor '{entry.ours}' is missing for the config in config.json")
        pieces = value.split(list(entry.sizes)) if entry.sizes else [value]
        for name, piece in zip(entry.theirs, pieces):
            tensors[name] = (piece.t() if entry.transpose and conv1d else piece).to(dtype).contiguous()
    return tensors


def export_token_settings(tokenizer: Tokenizer, context_length: int) -> tuple[dict, dict]:
    """``tokenizer_config.json`` and the bos/eos/pad ids of ``config.json`` and ``generation_config.json``.
    Only tokens of the vocabulary are named: a model that keeps its own vocabulary (an imported chat model)
    has none of llmkit's default names (``<|pad|>``, ...), which ``transformers`` would otherwise add as new
    tokens past the model's embedding; its padding is its pad token, else its eos (``Tokenizer.pad_id``)."""
    config, ids = hf_tokenizer_config(tokenizer, context_length), generation_token_ids(tokenizer)
    for role in SPECIAL_ROLES:
        if isinstance(config.get(role), str) and tokenizer.backend.token_to_id(config[role]) is None:
            del config[role]
    config["pad_token"] = tokenizer.backend.id_to_token(tokenizer.pad_id)
    return config, {**ids, "pad": tokenizer.pad_id}


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """Write the checkpoint as a Hugging Face directory ``out``; ``dtype`` (float32, float16, bfloat16)
    converts the weights, ``None`` keeps the stored precision. Refuses (MismatchError, naming the field)
    a model that no supported Hugging Face architecture computes exactly."""
    start = time.perf_counter()
    out = Path(out)
    check_replaceable(out, HF_FILES)
    folder, config, state, tokenizer = read_checkpoint(checkpoint)
    architecture = hf_architecture(config)
    target = getattr(torch, dtype) if dtype else state["token_embedding.weight"].dtype
    tensors = hf_tensors(state, config, architecture, folder / WEIGHTS_FILE, target)
    tokenizer_config, token_ids = (
        export_token_settings(tokenizer, config.context_length) if tokenizer is not None else ({}, {})
    )
    with atomic_directory(out) as directory:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(directory / "config.json", hf_config(config, architecture, token_ids, _dtype_name(target)))
        generation = {
            "bos_token_id": token_ids.get("bos"),
            "eos_token_id": token_ids.get("eos"),
            "pad_token_id": token_ids.get("pad"),
        }
        atomic_write_json(directory / "generation_config.json", generation)
        if tokenizer is not None:
            atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer.tokenizer_json)  # as is: same sha256
            atomic_write_json(directory / CONFIG_FILE, tokenizer_config)
    return {
        "out": str(out),
        "checkpoint": str(folder),
        "architecture": architecture,
        "dtype": _dtype_name(target),
        "tensors": len(tensors),
        "parameters": sum(tensor.numel() for tensor in tensors.values()),
        "tokenizer": tokenizer is not None,
        "seconds": time.perf_counter() - start,
    }


def read_hf_weights(directory: Path, architecture: str) -> dict[str, torch.Tensor]:
    """Every learned tensor of a Hugging Face directory (one file or index-listed shards), under the
    names ``transformers`` gives them when it saves (GPT-2's original files lack the "transformer." prefix)."""
    if (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    elif (directory / WEIGHTS_INDEX).is_file():
        index = read_json(directory / WEIGHTS_INDEX)
        files = [directory / name for name in sorted(set(index.get("weight_map", {}).values()))]
    else:
        raise InputError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (llmkit reads safetensors weights only)")
    state: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="import: reading", unit=" files", disable=len(files) == 1):
        if not file.is_file():
            raise InputError(f"{file}: listed in {WEIGHTS_INDEX} but missing")
        state.update(load_file(str(file)))
    if architecture == GPT2:
        state = {
            name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": tensor
            for name, tensor in state.items()
        }
    return {name: tensor for name, tensor in state.items() if not name.endswith(DERIVED_SUFFIXES)}


def llmkit_state(
    hf_state: dict[str, torch.Tensor],
    config: ModelConfig,
    architecture: str,
    source: Path,
    conv1d: bool = True,
    origin: str = "config.json",
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> the llmkit model's state dict, checked name by name and shape by shape.
    ``conv1d=False``: GPT-2's matrices come in ``nn.Linear``'s (out, in) layout (as GGUF stores them);
    ``origin`` names where the config came from in errors."""
    remaining = dict(hf_state)
    state: dict[str, torch.Tensor] = {}
    for entry in tensor_table(config, architecture):
        missing = [name for name in entry.theirs if name not in remaining]
        if missing:
            raise MismatchError(f"{source}: tensor '{missing[0]}' is missing for the config in {origin}")
        pieces = [remaining.pop(name) for name in entry.theirs]
        state[entry.ours] = torch.cat(
            [piece.t() if entry.transpose and conv1d else piece for piece in pieces]
        ).contiguous()
    if config.tie_embeddings:
        remaining.pop("lm_head.weight", None)  # the embedding again
    if remaining:
        raise MismatchError(f"{source}: tensors llmkit has no place for: {', '.join(sorted(remaining)[:5])}")
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise MismatchError(
                f"{source}: tensor for '{name}' has shape {tuple(tensor.shape)}, "
                f"{origin} implies {tuple(expected[name].shape)}"
            )
    return state


def import_hf(directory: str | Path, out: str | Path, dtype: str | None = "float32") -> dict:
    """Write the Hugging Face model in ``directory`` as an llmkit checkpoint ``out`` (weights in
    ``dtype``, ``None`` keeps the source's). llmkit's special tokens that the source tokenizer lacks are
    added at the end of its vocabulary with mean-initialised embedding rows (see :mod:`.tokens`)."""
    start = time.perf_counter()
    source, out = Path(directory), Path(out)
    check_replaceable(out, CHECKPOINT_FILES)
    values = read_json(source / "config.json")
    config, architecture = model_config_from_hf(values, source / "config.json")
    state = llmkit_state(read_hf_weights(source, architecture), config, architecture, source)
    tokenizer, added, source_size = import_tokenizer(source)
    return write_import(
        out,
        source,
        state,
        config,
        architecture,
        dtype,
        tokenizer,
        added,
        source_size,
        {"model_type": values.get("model_type")},
        start,
    )


def write_import(
    out: Path,
    source: Path,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    architecture: str,
    dtype: str | None,
    tokenizer: Tokenizer,
    added: list[str],
    source_size: int,
    imported_from: dict,
    start: float,
) -> dict:
    """The end of every import: weights in ``dtype``, embeddings grown for llmkit's ``added`` special tokens
    (see :mod:`.tokens`), the checkpoint folder ``out`` written atomically, and the summary."""
    if dtype:
        state = {name: tensor.to(getattr(torch, dtype)) for name, tensor in state.items()}
    config = grow_embeddings(state, config, tokenizer, added, source_size)
    metadata = {
        "stage": "import",
        "stage_config": {"source": str(source), "out": str(out), "dtype": dtype},
        "tokenizer_sha256": tokenizer.sha256,
        "imported_from": {"architecture": architecture, **imported_from, "added_special_tokens": added},
    }
    with atomic_directory(out) as folder:
        write_model(folder, state, config, metadata)
        tokenizer.save(folder)
    return {
        "out": str(out),
        "source": str(source),
        "architecture": architecture,
        "vocab_size": config.vocab_size,
        "added_special_tokens": added,
        "parameters": sum(tensor.numel() for tensor in state.values()),
        "seconds": time.perf_counter() - start,
    }
