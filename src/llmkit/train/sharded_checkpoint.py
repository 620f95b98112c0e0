"""Sharded training checkpoints (``--train.checkpoint-format sharded``): every rank saves and resumes only
its own pieces of the model and optimizer state through ``torch.distributed.checkpoint``; no process
ever holds the whole state (the format: :mod:`llmkit.model.sharded`).

Each rank's piece of a tensor is its local shard (FSDP's rows, a tensor-parallel rank's heads, a
pipeline stage's blocks) placed in the one-process tensor, so a checkpoint saved on one layout resumes
on any other: each rank of the new layout asks for its own pieces and DCP reads them from whichever
saved pieces overlap. The folder is built like a full checkpoint's
(:func:`llmkit.train.checkpoint.save_sharded_checkpoint`): every rank writes its shard file into rank
0's temporary folder, rank 0 adds the JSON files and the manifest last and renames it into place, and
only then does ``latest`` move.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from llmkit.errors import MismatchError
from llmkit.io import read_json
from llmkit.model.config import ModelConfig
from llmkit.model.shard_io import Piece, PieceSavePlanner, load_pieces, read_index
from llmkit.model.sharded import EXTRA, MODEL, OPTIMIZER, SHARDS, fused_rows, part_name
from llmkit.train.parallel import row_pieces, tensor_parallel_of
from llmkit.train.pipeline import owning_rank

OPTIMIZER_GROUPS = "optimizer.json"
# Execution choices of the layout loading the checkpoint (fused kernels cannot take DTensors), not hyperparameters.
LAYOUT_GROUP_KEYS = ("params", "fused", "foreach")


def tensor_pieces(key: str, value: torch.Tensor, sizes: list[int] | None, tp: int) -> dict[str, Piece]:
    """This rank's pieces of the one-process tensor ``key`` from its state tensor ``value`` (a DTensor's
    local shard, placed where DCP itself would place it; a plain tensor whole). A fused projection of
    row blocks ``sizes``, interleaved over ``tp`` ranks, becomes pieces of its blocks ``key.part<i>``."""
    if isinstance(value, DTensor):
        local, offsets = value.to_local(), tuple(value.__create_chunk_list__()[0].offsets)
    else:
        local, offsets = value, (0,) * value.dim()
    if sizes is None or value.dim() == 0:
        return {key: Piece(local, offsets, value.shape)} if local.numel() or not value.numel() else {}
    return {
        part_name(key, block): Piece(
            local[first : first + rows], (row, *offsets[1:]), torch.Size([sizes[block], *value.shape[1:]])
        )
        for block, first, row, rows in row_pieces(offsets[0], offsets[0] + local.shape[0], sizes, tp)
    }


def _state_pieces(
    model: nn.Module, model_state: dict, optimizer_state: dict, config: ModelConfig, language_model: str, owned: bool
) -> dict[str, Piece]:
    """The pieces of (sharded) model and optimizer state dicts of ``model``, whose language model sits at
    ``language_model``; ``owned``: only the parameters this pipeline rank trains (its copies of the
    embedding and head on other stages are stale)."""
    prefix = language_model + "." if language_model else ""
    rows, tp = fused_rows(config), tensor_parallel_of(model)
    pipeline = hasattr(model, "pipeline_split")

    def keep(name: str) -> bool:
        return not (owned and pipeline) or owning_rank(model, name) == model.pipeline_rank

    pieces = {}
    for name, value in model_state.items():
        inside = name.startswith(prefix)
        own = name[len(prefix) :] if inside else name
        if inside and own == "lm_head.weight" and config.tie_embeddings:
            continue  # the embedding, stored once
        if keep(name):
            key = (MODEL if inside else EXTRA) + own
            pieces |= tensor_pieces(key, value, rows.get(own) if inside else None, tp)
    for name, state in optimizer_state["state"].items():
        if keep(name):
            sizes = rows.get(name[len(prefix) :]) if name.startswith(prefix) else None
            for state_name, value in state.items():
                pieces |= tensor_pieces(f"{OPTIMIZER}{name}.{state_name}", value, sizes, tp)
    return pieces


def rank_zero_folder(directory: Path | None) -> Path:
    """Rank 0's temporary checkpoint folder, on every rank: all write into it (the run directory is on a
    file system every rank sees, as resuming already needs)."""
    if not dist.is_initialized():
        return directory
    sent = [str(directory) if directory is not None else None]
    dist.broadcast_object_list(sent, src=0)
    return Path(sent[0])


def write_shards(
    source: Path, model: nn.Module, optimizer: torch.optim.Optimizer, model_config: ModelConfig, language_model: str
) -> list[dict]:
    """Write this rank's pieces into the shards folder ``source`` (every rank calls it; on return every
    rank's file is complete and fsynced); returns the optimizer's hyperparameters, per group."""
    model_state, optimizer_state = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    pieces = _state_pieces(model, model_state, optimizer_state, model_config, language_model, owned=True)
    with warnings.catch_warnings():  # one process saving alone is what it means
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(
            pieces,
            storage_writer=HuggingFaceStorageWriter(str(source), save_distributed=True),
            planner=PieceSavePlanner(),
        )
    return [
        {key: value for key, value in group.items() if key != "params"} for group in optimizer_state["param_groups"]
    ]


def load_sharded(
    checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, model_config: ModelConfig, language_model: str
) -> None:
    """Restore ``model`` and ``optimizer`` in place, on this process's layout, from a sharded checkpoint."""
    model_state = get_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates the optimizer's state to load into
    source = checkpoint / SHARDS
    index = read_index(source)
    for name, state in list(optimizer_state["state"].items()):
        # A parameter that never had a gradient in the saved run has no state there: none here either.
        wanted = _state_pieces(model, {}, {"state": {name: state}}, model_config, language_model, owned=False)
        if wanted and not set(wanted) & set(index):
            del optimizer_state["state"][name]
    pieces = _state_pieces(model, model_state, optimizer_state, model_config, language_model, owned=False)
    load_pieces(source, pieces, index)
    saved = read_json(checkpoint / OPTIMIZER_GROUPS)
    saved = saved.get("param_groups") if isinstance(saved, dict) else None
    groups = optimizer_state["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise MismatchError(
            f"{checkpoint / OPTIMIZER_GROUPS}: needs 'param_groups', a list of the optimizer's {len(groups)} groups"
        )
    for group, values in zip(groups, saved):
        for name, value in values.items():
            if name not in LAYOUT_GROUP_KEYS:
                group[name] = tuple(value) if isinstance(group.get(name), tuple) else value
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optimizer_state)
