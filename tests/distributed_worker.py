"""Run by test_distributed.py under torchrun (or called in its process for one process): train the tiny
model on synthetic batches, or (``grpo``) a tiny policy with GRPO on arithmetic prompts. Under torchrun it
runs a list of such runs in one process group: starting the processes costs more than the training."""

import json
import sys

import torch
from helpers import SyntheticBatches, tiny_config

from llmkit.align.grpo import GRPOConfig, grpo, grpo_update
from llmkit.align.rl_source import RolloutConfig
from llmkit.align.rl_stage import RLStageConfig, rl_training
from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import shutdown
from llmkit.train.trainer import Trainer


def pretrain(out: str, parallelism: str, grad_accum: int) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    config = TrainConfig(
        out=out,
        batch_size=4,
        grad_accum=grad_accum,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,
        eval_interval=3,
        eval_batches=2,
        log_interval=1,
        checkpoint_interval=3,
        dtype="float32",
        progress=False,
        parallelism=parallelism,
        device="cpu",
    )
    Trainer(model, SyntheticBatches(), config, val_batches=SyntheticBatches()).run()


def train_grpo(out: str, grad_accum: int, policy: str) -> None:
    """2 iterations of 4 prompts x 4 samples at a high temperature (rewards differ), 2 epochs of minibatches
    of 8: 4 steps an iteration, with a held-out evaluation every iteration."""
    stage = RLStageConfig(
        policy=policy, task="arithmetic_plain", train_problems=8, validation_problems=4, missing_end_penalty=0.5
    )
    grpo(
        GRPOConfig(
            group_size=4,
            stage=stage,
            rollout=RolloutConfig(prompts_per_iteration=4, max_new_tokens=4, temperature=3.0, tools="none"),
            update=grpo_update(iterations=2, epochs=2, minibatch_size=8),
            train=rl_training(
                out=out,
                grad_accum=grad_accum,
                lr=3e-3,
                eval_interval=4,
                checkpoint_interval=4,
                device="cpu",
                progress=False,
            ),
        )
    )


def run(out: str, mode: str, grad_accum: int, policy: str = "") -> None:
    """Pretraining with ``mode`` (ddp or fsdp), or GRPO from ``policy``."""
    if mode == "grpo":
        train_grpo(out, grad_accum, policy)
    else:
        pretrain(out, mode, grad_accum)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for arguments in json.loads(sys.argv[1]):  # run's arguments, as JSON, a run each
        run(**arguments)
    shutdown()
