"""Run by test_distributed.py under torchrun (or alone): train the tiny model on synthetic batches."""

import sys

import torch

from helpers import SyntheticBatches, tiny_config
from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import shutdown
from llmkit.train.trainer import Trainer

if __name__ == "__main__":
    out, parallelism, grad_accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    config = TrainConfig(out=out, batch_size=4, grad_accum=grad_accum, lr=3e-3, warmup_steps=2, max_steps=6,
                         eval_interval=3, eval_batches=2, log_interval=1, checkpoint_interval=3, dtype="float32",
                         progress=False, parallelism=parallelism, device="cpu")
    Trainer(model, SyntheticBatches(), config, val_batches=SyntheticBatches()).run()
    shutdown()
