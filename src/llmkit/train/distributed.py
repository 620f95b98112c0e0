"""PyTorch's own distributed engine under ``torchrun``: DDP or FSDP2 (``fully_shard``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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


def wrap_model(model: nn.Module, world: World, parallelism: str, device: torch.device) -> nn.Module:
    """DDP replicates the model and all-reduces gradients; FSDP2 shards parameters, gradients and
    optimizer state across ranks (ZeRO-3, Rajbhandari et al. 2020), each block its own unit so only
    one block is gathered at a time."""
    if not world.distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
