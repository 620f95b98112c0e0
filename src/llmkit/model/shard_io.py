"""Reading and writing the pieces of sharded checkpoints (:mod:`llmkit.model.sharded`) through
``torch.distributed.checkpoint`` (DCP), safetensors files only.

Nothing is unpickled on load: ``HuggingFaceStorageReader`` builds its index from the safetensors
headers (JSON) and reads tensors with ``safe_open``; DCP's pickled metadata file is never written nor
read, and :class:`PieceLoadPlanner` refuses the "byte" items DCP would unpickle. Imported on use by the
loaders: DCP takes most of a second to import, which only sharded checkpoints need.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from llmkit.errors import InputError, MismatchError
from llmkit.model.config import ModelConfig
from llmkit.model.sharded import fused_rows, part_name


@dataclass
class Piece:
    """This process's piece of one saved tensor: ``tensor`` (a view of the parameter or state it belongs
    to, so loading writes in place) starts at ``offsets`` in the full tensor of shape ``size``."""

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    size: torch.Size

    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.tensor.shape)


class PieceSavePlanner(DefaultSavePlanner):
    """DCP's default planner (replicated pieces written once; under several ranks, the pieces of each
    tensor checked to neither overlap nor leave a gap) over a flat ``{name: Piece}``: a rank may hold
    any rectangle of a tensor, which a DTensor's placements cannot always describe (FSDP's row shards
    of a tensor-parallel rank's fused rows)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(
            [
                WriteItem(
                    index=MetadataIndex(key, piece.offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=piece.chunk(),
                        properties=TensorProperties.create_from_tensor(piece.tensor),
                        size=piece.size,
                    ),
                )
                for key, piece in self.state_dict.items()
            ]
        )
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].tensor


class PieceLoadPlanner(DefaultLoadPlanner):
    """Reads every ``{name: Piece}`` from whichever saved pieces overlap it (DCP's resharding)."""

    def __init__(self, source: Path):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.source = source

    def set_up_planner(self, state_dict: dict, metadata: Metadata | None = None, is_coordinator: bool = False):
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        return LoadPlan(
            [
                item
                for key, piece in self.state_dict.items()
                for item in create_read_items_for_chunk_list(key, saved[key], [piece.chunk()])
            ]
        )

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].tensor

    def load_bytes(self, read_item, value) -> None:
        # DCP's default unpickles byte items (torch.load, weights_only=False); the shards hold tensors only.
        raise InputError(
            f"{self.source}: '{read_item.storage_index.fqn}' is not a tensor (refused: it would be unpickled)"
        )


def read_index(source: Path) -> dict[str, TensorStorageMetadata]:
    """Name -> shape, dtype and pieces of every tensor in the shards folder ``source``, from the
    safetensors headers."""
    if not source.is_dir():
        raise InputError(f"{source}: shards folder not found")
    try:
        return HuggingFaceStorageReader(str(source)).read_metadata().state_dict_metadata
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise InputError(f"{source}: not readable sharded checkpoint files ({error})") from None


def load_pieces(source: Path, pieces: dict[str, Piece], index: dict[str, TensorStorageMetadata] | None = None) -> None:
    """Fill ``pieces`` in place from the shards folder ``source``. Each process reads on its own (no
    collective: this works in one process, under ``torchrun``, and from one rank of it)."""
    index = read_index(source) if index is None else index
    for key, piece in pieces.items():
        if key not in index:
            raise MismatchError(f"{source}: no tensor '{key}' in the shards (saved by another model or optimizer?)")
        if index[key].size != piece.size:
            raise MismatchError(
                f"{source}: '{key}' has shape {list(index[key].size)} in the shards, {list(piece.size)} here"
            )
    with warnings.catch_warnings():  # DCP warns that it reads in one process: what no_dist asks for
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(
            pieces, storage_reader=HuggingFaceStorageReader(str(source)), planner=PieceLoadPlanner(source), no_dist=True
        )


def read_full(source: Path, prefix: str, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The whole tensors named ``prefix...`` in the shards folder ``source`` (consolidated on read: they
    must fit this process's memory), the prefix dropped; with ``config``, fused projections joined."""
    index = read_index(source)
    pieces = {
        key: Piece(torch.empty(saved.size, dtype=saved.properties.dtype), (0,) * len(saved.size), saved.size)
        for key, saved in index.items()
        if key.startswith(prefix)
    }
    load_pieces(source, pieces, index)
    tensors = {key[len(prefix) :]: piece.tensor for key, piece in pieces.items()}
    if config is not None:
        for name, sizes in fused_rows(config).items():
            parts = [tensors.pop(part_name(name, block), None) for block in range(len(sizes))]
            if any(part is None for part in parts):
                raise MismatchError(f"{source}: the row blocks of '{prefix}{name}' are missing from the shards")
            tensors[name] = torch.cat(parts)
    return tensors
