"""PyTorch's own distributed engine under ``torchrun``: DDP or FSDP2 (``fully_shard``), and layouts of
tensor x pipeline x data parallelism on one ``DeviceMesh`` (:mod:`llmkit.train.parallel`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import ConfigError


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The data-parallel group this process belongs to: the whole world unless tensor or pipeline
    # parallelism splits the model, whose ranks then read the same batches.
    data_rank: int | None = None
    data_size: int | None = None
    mesh: object = None  # the (pp, dp, tp) DeviceMesh of a model-parallel layout
    pipeline: object = None  # this rank's pipeline stage and schedule (llmkit.train.pipeline.Pipeline)

    def __post_init__(self) -> None:
        self.data_rank = self.rank if self.data_rank is None else self.data_rank
        self.data_size = self.world_size if self.data_size is None else self.data_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment; a plain run is a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap_model(model: nn.Module, world: World, config, device: torch.device, language_model: nn.Module | None = None):
    """DDP replicates the model and all-reduces gradients; FSDP2 shards parameters, gradients and
    optimizer state across ranks (ZeRO-3, Rajbhandari et al. 2020), each block its own unit so only
    one block is gathered at a time. With ``config.tp`` > 1 the blocks of ``language_model`` (default
    ``model``) are first split across tensor-parallel ranks, and the data-parallel ranks shard with FSDP2
    on the same mesh (``reshard_after_forward`` false keeps the gathered weights: ZeRO-2)."""
    model_parallel = config.tp > 1 or config.pp > 1
    if not world.distributed:
        if model_parallel:
            raise ConfigError("tp", config.tp, "tensor or pipeline parallelism needs torchrun with tp x pp processes")
        return model
    if model_parallel:
        return _wrap_layout(model, world, config, device, language_model or model)
    if config.parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, reshard_after_forward=config.reshard_after_forward)
        fully_shard(model, reshard_after_forward=config.reshard_after_forward)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _wrap_layout(model: nn.Module, world: World, config, device: torch.device, language_model: nn.Module):
    from torch.distributed.fsdp import fully_shard

    from llmkit.train.parallel import apply_tensor_parallel, blocks_of, build_mesh
    from llmkit.train.pipeline import Pipeline, prune_to_stage

    mesh = build_mesh(device, world.world_size, config.tp, config.pp)
    world.mesh, world.data_rank, world.data_size = mesh, mesh["dp"].get_local_rank(), mesh["dp"].size()
    if config.pp > 1:
        if language_model is not model:
            raise ConfigError("pp", config.pp, "pipeline parallelism trains a bare language model (pretraining)")
        virtual = config.virtual_stages if config.pipeline_schedule == "interleaved-1f1b" else 1
        prune_to_stage(model, config.pp, mesh["pp"].get_local_rank(), config.pipeline_split, virtual)
    if config.tp > 1:
        apply_tensor_parallel(language_model, mesh["tp"], config.sequence_parallel, config.vocab_parallel)

    def shard(root: nn.Module) -> None:  # the model, or one pipeline stage's forward module
        for block in blocks_of(root):
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=config.reshard_after_forward)
        fully_shard(root, mesh=mesh["dp"], reshard_after_forward=config.reshard_after_forward)

    sharding = shard if world.data_size > 1 else None
    if config.pp > 1:  # the stage's forward, not the model's, gathers the embedding and head: it is the root
        world.pipeline = Pipeline(model, mesh, config.pipeline_schedule, config.grad_accum, device, sharding)
    elif sharding:
        sharding(model)
    return model


def all_reduce_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world.world_size
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly: every rank waits for the others first, since a rank that tears
    down gloo while a peer still talks to it can abort the process."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
