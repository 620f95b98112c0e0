"""Run by test_parallel_layouts.py under torchrun (or called in its process for one process): train the tiny
model on synthetic batches with a tensor x pipeline x data parallel layout, optionally resuming the run
directory's checkpoint. Under torchrun it runs a list of such segments in one process group, since starting
4 processes costs more than the training (each imports torch and the trainer: about 5 s of CPU)."""

import json
import shutil
import sys

import torch
from helpers import SyntheticBatches, tiny_config

from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import barrier, init_world, shutdown
from llmkit.train.trainer import Trainer


def train(
    out: str,
    tp: int = 1,
    pp: int = 1,
    grad_accum: int = 1,
    max_steps: int = 4,
    schedule: str = "1f1b",
    recompute: str = "none",
    sequence_parallel: bool = True,
    vocab_parallel: bool = False,
    checkpoint_format: str = "full",
    resume: bool = False,
) -> None:
    torch.manual_seed(0)
    # Grouped-query attention (4 query heads, 2 key/value heads) and a gated MLP: both fused projections
    # are split across the tensor-parallel ranks. 4 blocks: 2 pipeline ranks x 2 interleaved stages. 64 tokens
    # (the batches use 61) split in two for the vocabulary-parallel embedding and head, tied.
    model = Transformer(tiny_config(n_head=4, n_kv_head=2, n_layer=4, vocab_size=64))
    config = TrainConfig(
        out=out,
        batch_size=4,
        grad_accum=grad_accum,
        lr=3e-3,
        warmup_steps=2,
        schedule="constant",  # the learning rate of a step does not depend on where a resumed segment stops
        max_steps=max_steps,
        eval_interval=2,
        eval_batches=2,
        log_interval=1,
        checkpoint_interval=2,
        dtype="float32",
        progress=False,
        device="cpu",
        tp=tp,
        pp=pp,
        pipeline_schedule=schedule,
        activation_checkpointing=recompute,
        sequence_parallel=sequence_parallel,
        vocab_parallel=vocab_parallel,
        resume=resume,
        checkpoint_format=checkpoint_format,
    )
    Trainer(model, SyntheticBatches(), config, val_batches=SyntheticBatches()).run()


if __name__ == "__main__":
    torch.set_num_threads(1)
    for segment in json.loads(sys.argv[1]):  # train's arguments, as JSON, a segment each
        copy_to = segment.pop("copy_to", None)  # a copy of the run directory after the segment
        train(**segment)
        if copy_to:  # once every rank has finished the segment, and before any starts the next one
            world = init_world(torch.device("cpu"))
            barrier(world)
            if world.is_main:
                shutil.copytree(segment["out"], copy_to)
            barrier(world)
    shutdown()
