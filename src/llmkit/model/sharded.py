"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes only its own
pieces, in one process's layout, so any layout, or one process, reads them back.

A sharded checkpoint folder holds ``shards/`` instead of ``model.safetensors`` (and ``optimizer.pt``)::

    config.json  tokenizer files  trainer_state.json  optimizer.json  manifest.json
    shards/shard-00001-model-00001-of-00001.safetensors   one file per rank that held something

Tensor names in the shards:

- ``model.<name>``: the language model's weights, under their one-process names
- ``extra.<name>``: the trained module's other weights (PPO's value head)
- ``optimizer.<parameter>.<state>``: per-parameter optimizer state (AdamW's ``exp_avg``, ``exp_avg_sq``,
  ``step``); its hyperparameters are JSON, in ``optimizer.json``

A fused projection (``[q; k; v]``, ``[gate; up]``: :func:`fused_rows`) is saved as its row blocks,
``<name>.part0``, ``<name>.part1``...: tensor parallelism interleaves the blocks across ranks, so a rank's
rows are a contiguous piece of each block but not of the fused tensor. Each piece is stored with its
offsets in the full tensor (DCP's ``HuggingFaceStorageWriter``: safetensors files whose JSON header
carries the offsets): :mod:`llmkit.model.shard_io` writes and reads them.
"""

from __future__ import annotations

from llmkit.model.config import GATED_ACTIVATIONS, ModelConfig

SHARDS = "shards"
MODEL, EXTRA, OPTIMIZER = "model.", "extra.", "optimizer."


def fused_rows(config: ModelConfig) -> dict[str, list[int]]:
    """Parameter name (in the Transformer) -> the row blocks of each fused column-parallel projection."""
    head = config.head_dim
    qkv = [config.n_head * head, config.n_kv_head * head, config.n_kv_head * head]
    rows = {}
    for index in range(config.n_layer):
        prefix = f"blocks.{index}."
        rows[prefix + "attention.qkv.weight"] = qkv
        if config.bias:
            rows[prefix + "attention.qkv.bias"] = qkv
        if config.activation in GATED_ACTIVATIONS:
            rows[prefix + "feed_forward.up.weight"] = [config.ffn_hidden] * 2
            if config.bias:
                rows[prefix + "feed_forward.up.bias"] = [config.ffn_hidden] * 2
    return rows


def part_name(key: str, block: int) -> str:
    return f"{key}.part{block}"
