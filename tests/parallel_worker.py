"""Run by test_parallel_layouts.py under torchrun (or alone): train the tiny model on synthetic batches with a
tensor x pipeline x data parallel layout, optionally resuming the run directory's checkpoint."""

import sys

import torch
from helpers import SyntheticBatches, tiny_config

from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import shutdown
from llmkit.train.trainer import Trainer

if __name__ == "__main__":
    out, tp, pp, grad_accum, max_steps, resume, schedule, recompute, sequence, vocabulary, checkpoint_format = sys.argv[
        1:12
    ]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Grouped-query attention (4 query heads, 2 key/value heads) and a gated MLP: both fused projections
    # are split across the tensor-parallel ranks. 4 blocks: 2 pipeline ranks x 2 interleaved stages. 64 tokens
    # (the batches use 61) split in two for the vocabulary-parallel embedding and head, tied.
    model = Transformer(tiny_config(n_head=4, n_kv_head=2, n_layer=4, vocab_size=64))
    config = TrainConfig(
        out=out,
        batch_size=4,
        grad_accum=int(grad_accum),
        lr=3e-3,
        warmup_steps=2,
        schedule="constant",  # the learning rate of a step does not depend on where a resumed segment stops
        max_steps=int(max_steps),
        eval_interval=2,
        eval_batches=2,
        log_interval=1,
        checkpoint_interval=2,
        dtype="float32",
        progress=False,
        device="cpu",
        tp=int(tp),
        pp=int(pp),
        pipeline_schedule=schedule,
        activation_checkpointing=recompute,
        sequence_parallel=sequence == "sequence-parallel",
        vocab_parallel=vocabulary == "vocab-parallel",
        resume=resume == "resume",
        checkpoint_format=checkpoint_format,
    )
    Trainer(model, SyntheticBatches(), config, val_batches=SyntheticBatches()).run()
    shutdown()
