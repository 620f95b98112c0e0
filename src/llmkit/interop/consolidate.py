"""``llmkit export --format llmkit``: an llmkit checkpoint, sharded ones included, as a checkpoint folder
of the full format (one ``model.safetensors``), for tools that read that file directly. The shards are
read through their index, each tensor's pieces into one tensor: the whole model (not the optimizer
state) must fit this process's memory."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmkit.interop.hf import check_replaceable
from llmkit.io import atomic_directory
from llmkit.model.checkpoint import (
    EXTRA_WEIGHTS,
    model_config_of,
    read_config,
    read_extra_weights,
    read_model_weights,
    resolve_checkpoint,
    write_model,
)
from llmkit.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

FULL_FILES = {"model.safetensors", "config.json", EXTRA_WEIGHTS, TOKENIZER_FILE, CONFIG_FILE}


def export_full(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """Write the checkpoint's model as the folder ``out``: ``model.safetensors``, its ``config.json``
    (the stage's metadata kept), the tokenizer, and ``extra_weights.safetensors`` when it has some;
    ``dtype`` converts the floating-point weights, ``None`` keeps the stored precision."""
    start = time.perf_counter()
    out = Path(out)
    check_replaceable(out, FULL_FILES)
    folder = resolve_checkpoint(checkpoint)
    config = read_config(folder)
    model_config = model_config_of(folder, config)
    target = getattr(torch, dtype) if dtype else None
    state = {
        name: tensor.to(target or tensor.dtype) for name, tensor in read_model_weights(folder, model_config).items()
    }
    extra = read_extra_weights(folder)
    metadata = {key: value for key, value in config.items() if key not in ("model", "llmkit_version")}
    with atomic_directory(out) as directory:
        write_model(directory, state, model_config, metadata)
        if extra:
            save_file(extra, str(directory / EXTRA_WEIGHTS), metadata={"format": "pt"})
        if (folder / TOKENIZER_FILE).is_file():
            Tokenizer.load(folder).save(directory)
    return {
        "out": str(out),
        "checkpoint": str(folder),
        "tensors": len(state),
        "seconds": round(time.perf_counter() - start, 2),
    }
