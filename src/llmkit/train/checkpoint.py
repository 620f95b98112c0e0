"""Training checkpoints: the model files plus optimizer and trainer state, written atomically.

Layout of a run directory::

    latest                     -> "checkpoints/step_00000500"
    checkpoints/step_00000500/ config.json model.safetensors tokenizer files
                               optimizer.pt trainer_state.json
    metrics.csv loss.png
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmkit.errors import InputError, MismatchError
from llmkit.io import atomic_directory, atomic_write_json, atomic_write_text, read_json
from llmkit.model.checkpoint import LATEST, read_config, resolve_checkpoint, write_model
from llmkit.model.config import ModelConfig

# Full (unsharded) state on the CPU: a checkpoint written by 4 FSDP ranks loads in 1 process and back.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts with plain parameter names, whatever the wrapping (DDP, FSDP2).
    Every rank must call this: under FSDP it gathers the shards."""
    return get_model_state_dict(model, options=FULL_STATE), get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def save_training_checkpoint(run_directory: Path, step: int, model_state: dict, optimizer_state: dict,
                             model_config: ModelConfig, trainer_state: dict, metadata: dict, tokenizer=None,
                             keep_last: int = 3) -> Path:
    name = f"step_{step:08d}"
    final = run_directory / "checkpoints" / name
    with atomic_directory(final) as directory:
        write_model(directory, model_state, model_config, metadata)
        torch.save(optimizer_state, directory / "optimizer.pt")
        atomic_write_json(directory / "trainer_state.json", trainer_state)
        if tokenizer is not None:
            tokenizer.save(directory)
    # The pointer moves only once the folder is complete: an interrupted save leaves the old one in force.
    atomic_write_text(run_directory / LATEST, f"checkpoints/{name}\n")
    _prune(run_directory / "checkpoints", keep_last, keep=final)
    return final


def _prune(directory: Path, keep_last: int, keep: Path) -> None:
    checkpoints = sorted(path for path in directory.glob("step_*") if path.is_dir())
    for old in checkpoints[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(run_directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             model_config: ModelConfig) -> dict:
    """Restore model and optimizer in place from the run's latest checkpoint; return its trainer state."""
    checkpoint = resolve_checkpoint(run_directory)
    saved = ModelConfig(**read_config(checkpoint)["model"])
    for field_name, value in vars(saved).items():
        if getattr(model_config, field_name) != value:
            raise MismatchError(f"{checkpoint / 'config.json'}: cannot resume, model field '{field_name}' was "
                                f"{value!r} in the checkpoint but is {getattr(model_config, field_name)!r} now")
    optimizer_path = checkpoint / "optimizer.pt"
    if not optimizer_path.is_file():
        raise InputError(f"{checkpoint}: not a training checkpoint (no optimizer.pt), cannot resume from it")
    from safetensors.torch import load_file

    model_state = load_file(str(checkpoint / "model.safetensors"))
    if model_config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["token_embedding.weight"]
    set_model_state_dict(model, model_state, options=FULL_STATE)
    optimizer_state = torch.load(optimizer_path, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_STATE)
    return read_json(checkpoint / "trainer_state.json")
