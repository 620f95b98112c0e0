"""Tensor parallelism on a ``DeviceMesh`` through PyTorch's own ``torch.distributed.tensor.parallel``.

Megatron-LM's split of a block (Shoeybi et al. 2019 §3): the projections that fan out (fused q/k/v, the
MLP's up or fused gate/up) are column-parallel, each rank computing its share of the heads and of the
hidden units with no communication; the projections back into the residual stream (attention output,
MLP down) are row-parallel, their partial sums all-reduced once. So a block costs two all-reduces
forward and two backward. The norms stay replicated or, with sequence parallelism, split along the sequence.
The token embedding and the head stay replicated, or are split along the vocabulary (:func:`shard_vocabulary`).

The fused projections keep their single-process row order in checkpoints: ``[q; k; v]`` and
``[gate; up]``. Column sharding gives rank r the r-th contiguous slice of rows, so before sharding the
rows are interleaved (``[q_0; k_0; v_0; q_1; ...]``), each rank then holding whole heads of q, k and v;
:func:`canonical_state` undoes it on the gathered state a checkpoint saves and :func:`layout_state` redoes
it on the state a checkpoint loads, so a checkpoint resumes on any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.sharded import fused_rows
from llmkit.train.pipeline import gather_stages, select_stage


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks a model holds: all of them, or a pipeline stage's (a ``ModuleDict`` by block index)."""
    return list(model.blocks.values()) if isinstance(model.blocks, nn.ModuleDict) else list(model.blocks)


def build_mesh(device: torch.device, world_size: int, tp: int, pp: int) -> DeviceMesh:
    """The world as (pp, dp, tp), tensor parallel fastest: Megatron-LM's order, which keeps a
    tensor-parallel group on the GPUs of one node, where the bandwidth is."""
    if world_size % (tp * pp):
        raise ConfigError("tp", tp, f"tp x pp = {tp * pp} must divide the {world_size} processes")
    return init_device_mesh(device.type, (pp, world_size // (tp * pp), tp), mesh_dim_names=("pp", "dp", "tp"))


def check_tensor_parallel(
    config: ModelConfig, tp: int, sequence_parallel: bool = False, vocab_parallel: bool = False
) -> None:
    """Refuse, naming the field, the variants whose heads or weights do not split across ``tp`` ranks."""
    if sequence_parallel and config.norm_placement != "pre":
        raise ConfigError("norm_placement", config.norm_placement, "sequence parallelism splits pre-LN blocks only")
    if vocab_parallel and config.vocab_size % tp:
        # Refused rather than padded: padding rows would change the checkpoint's shapes and the logits' width.
        raise ConfigError("vocab_size", config.vocab_size, f"must be divisible by tp={tp} for --train.vocab-parallel")
    for name, value in (("n_head", config.n_head), ("n_kv_head", config.n_kv_head), ("ffn_hidden", config.ffn_hidden)):
        if value % tp:
            raise ConfigError(name, value, f"must be divisible by tp={tp} for tensor parallelism")
    refusals = {
        "position": (config.position == "alibi", "ALiBi's per-head slopes are not split across tensor-parallel ranks"),
        "qk_norm": (config.qk_norm, "QK-norm weights are shared by heads that tensor parallelism splits"),
        "moe_experts": (config.moe_experts > 0, "Mixture-of-Experts layers are not tensor-parallel; use tp=1"),
    }
    for name, (refused, reason) in refusals.items():
        if refused:
            raise ConfigError(name, getattr(config, name), reason)


def interleave(tensor: torch.Tensor, sizes: list[int], parts: int) -> torch.Tensor:
    """Rows ``[A; B; C]`` (``sizes``) -> ``[A_0; B_0; C_0; A_1; ...]``: rank r's contiguous slice holds the
    r-th part of every block."""
    pieces = [block.chunk(parts) for block in tensor.split(sizes)]
    return torch.cat([blocks[rank] for rank in range(parts) for blocks in pieces])


def deinterleave(tensor: torch.Tensor, sizes: list[int], parts: int) -> torch.Tensor:
    """The inverse of :func:`interleave`."""
    local = [size // parts for size in sizes]
    ranks = [chunk.split(local) for chunk in tensor.split(sum(local))]
    return torch.cat([ranks[rank][block] for block in range(len(sizes)) for rank in range(parts)])


def row_pieces(start: int, stop: int, sizes: list[int], parts: int) -> list[tuple[int, int, int, int]]:
    """Where rows ``[start, stop)`` of a fused tensor interleaved over ``parts`` ranks (:func:`interleave`)
    come from: (block, first of those rows counted from ``start``, first row within the block, rows) for
    each block they cross. A rank's rows, or an FSDP shard of them, cross each block at most once."""
    local = [size // parts for size in sizes]
    pieces = []
    segment = 0  # the first interleaved row of (rank, block)
    for rank in range(parts):
        for block, rows in enumerate(local):
            low, high = max(start, segment), min(stop, segment + rows)
            if low < high:
                pieces.append((block, low - start, rank * rows + low - segment, high - low))
            segment += rows
    return pieces


def apply_tensor_parallel(
    model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = True, vocab_parallel: bool = False
) -> None:
    """Shard every block of the Transformer ``model`` over the 1-D ``mesh`` in place.

    With ``sequence_parallel`` (Korthikanti et al. 2022) the residual stream between the tensor-parallel
    regions is split along the sequence too: each rank normalises (and drops out) its T/t positions, the
    column-parallel projections all-gather the sequence and the row-parallel ones reduce-scatter it
    instead of all-reducing: the same traffic, a t-th of the norms' work and of the activations they
    keep. The sequence is cut before the first block and gathered again before the final norm. With
    ``vocab_parallel`` the token embedding and the head are split too (:func:`shard_vocabulary`)."""
    tp = mesh.size()
    config = model.config
    check_tensor_parallel(config, tp, sequence_parallel, vocab_parallel)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, sizes in fused_rows(config).items():
            if name in parameters:  # a pipeline stage holds some of the blocks
                parameters[name].copy_(interleave(parameters[name], sizes, tp))
    sequence = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention.qkv": ColwiseParallel(input_layouts=sequence),
        "attention.out": RowwiseParallel(output_layouts=sequence),
        "feed_forward.up": ColwiseParallel(input_layouts=sequence),
        "feed_forward.down": RowwiseParallel(output_layouts=sequence),
    }
    if sequence_parallel:
        # The norms' outputs stay DTensors: the attention reads the whole sequence's length off them.
        plan |= {"attention_norm": SequenceParallel(), "feed_forward_norm": SequenceParallel()}
    for block in blocks_of(model):
        parallelize_module(block, mesh, plan)
        # Each rank attends with its own heads: the local projections hold n_head / tp of them.
        block.attention.n_head //= tp
        block.attention.n_kv_head //= tp
    if sequence_parallel:
        cut = PrepareModuleInput(
            input_layouts=(Replicate(), None, None, None, None),
            desired_input_layouts=(Shard(1), None, None, None, None),
            use_local_output=True,
        )
        gather = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        held = {name for name, _ in model.named_children()} | {
            f"blocks.{name}" for name, _ in model.blocks.named_children()
        }
        edges = {"blocks.0": cut, "final_norm": gather}  # a pipeline stage holds block 0 or not
        parallelize_module(model, mesh, {name: style for name, style in edges.items() if name in held})
    if vocab_parallel:
        shard_vocabulary(model, mesh)
    model.tensor_parallel = tp
    model.sequence_shards = tp if sequence_parallel else 1


def shard_vocabulary(model: nn.Module, mesh: DeviceMesh) -> None:
    """Megatron-LM's vocabulary-parallel embedding and head (Shoeybi et al. 2019 §3), in place: rank r holds
    the r-th V/t rows of the token embedding and of the head. The embedding looks up the ids in its rows (zero
    for the others) and all-reduces; the head computes its V/t logits and leaves them split, a DTensor sharded
    on the vocabulary, whose cross-entropy under ``loss_parallel`` all-reduces a max and a sum of
    exponentials per position, never the batch × length × V logits that a replicated head holds on every rank
    (the largest activation of a small model with a large vocabulary). Both split dimension 0 of their weight,
    so tied embeddings (Press & Wolf 2017) stay one parameter."""
    plan = {
        "token_embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    }
    parallelize_module(model, mesh, plan)
    if model.config.tie_embeddings:  # each style distributed its own copy of the shared weight: one parameter again
        model.lm_head.weight = model.token_embedding.weight


def tensor_parallel_of(model: nn.Module) -> int:
    """The tensor-parallel size of the Transformer inside ``model`` (1 when not split)."""
    return max((getattr(module, "tensor_parallel", 1) for module in model.modules()), default=1)


def _convert(model: nn.Module, states: list[dict], function) -> None:
    sharded = next((module for module in model.modules() if getattr(module, "tensor_parallel", 1) > 1), None)
    if sharded is None:
        return
    tp, rows = sharded.tensor_parallel, fused_rows(sharded.config)
    for state in states:
        for key in list(state):
            name = next((n for n in rows if key == n or key.endswith("." + n)), None)
            if name is None:
                continue
            value = state[key]
            if isinstance(value, dict):  # an optimizer's per-parameter state: exp_avg, exp_avg_sq, step
                state[key] = {
                    k: function(v, rows[name], tp) if torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in value.items()
                }
            else:
                state[key] = function(value, rows[name], tp)


def canonical_state(model: nn.Module, model_state: dict, optimizer_state: dict | None = None) -> None:
    """Make the full state dicts gathered from ``model`` (any module holding a Transformer) one process's,
    in place: every pipeline stage's blocks gathered (:func:`~llmkit.train.pipeline.gather_stages`), the
    tensor-parallel fused projections back in single-process row order."""
    if optimizer_state is not None:
        gather_stages(model, model_state, optimizer_state)
    _convert(model, [model_state] + ([optimizer_state["state"]] if optimizer_state else []), deinterleave)


def layout_state(model: nn.Module, model_state: dict, optimizer_state: dict | None = None) -> None:
    """The inverse of :func:`canonical_state`: single-process row order -> ``model``'s layout, in place.
    A checkpoint written by one process also names its fused AdamW kernel, which cannot mix the sharded
    DTensors with the replicated tensors: the per-parameter loop runs instead."""
    _convert(model, [model_state] + ([optimizer_state["state"]] if optimizer_state else []), interleave)
    if optimizer_state is not None:
        select_stage(model, model_state, optimizer_state)
    if optimizer_state and any(isinstance(p, DTensor) for p in model.parameters()):
        for group in optimizer_state["param_groups"]:
            group.update(fused=None, foreach=False)


def clip_grad_norm(model: nn.Module, max_norm: float, pipeline=None) -> torch.Tensor:
    """The global gradient norm (clipped to ``max_norm`` when > 0) over parameters that may be DTensors
    on different meshes (tensor-parallel and FSDP shards, replicated norms): each norm is reduced over
    its own mesh, then summed over the pipeline stages, each counting the parameters it trains."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    counted = pipeline.counted() if pipeline is not None else model.parameters()
    total = torch.zeros((), dtype=torch.float32)
    for grad in [p.grad for p in counted if p.grad is not None]:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = total.to(norm.device) + norm.square()
    if pipeline is not None:
        dist.all_reduce(total, group=pipeline.group)
    total = total.sqrt()
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device))
    return total
