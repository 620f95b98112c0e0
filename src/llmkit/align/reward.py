"""``llmkit reward``: a reward model trained from human (or generated) comparisons.

**The model** (Ouyang et al. 2022 §3.5; Stiennon et al. 2020 §3.4) is the fine-tuned language model
with its unembedding replaced by a scalar head: ``Linear(n_embd, 1)`` on the final-norm hidden state
(:meth:`~llmkit.model.Transformer.hidden_states`) of a sequence's last token, the ``<|end|>`` that
closes the response, so the reward sees the prompt and the whole response. It starts from an SFT (or
pretrained) checkpoint, the head from N(0, init_std).

**The loss** over every (better, worse) pair of a prompt's responses is the Bradley-Terry
log-likelihood ``-log σ(r_better - r_worse - margin)``: a ranking of K responses gives all K(K-1)/2
pairs, kept in one batch and weighted 1/C(K, 2) so that each prompt counts once (InstructGPT eq. 1;
batches in :mod:`llmkit.align.preference`). The optional ``margin`` asks for a gap before a pair
stops contributing (Llama 2, Touvron et al. 2023 §3.2.2, uses one per preference strength). Training
is the one :class:`~llmkit.train.trainer.Trainer`; the summary reports the accuracy and mean margin
on held-out pairs.

**Normalisation.** The pairwise loss does not see a constant added to every reward, so the head's
bias is free: at the end it is shifted so that the best response of the training prompts scores 0
on average (InstructGPT normalises on the labelers' demonstrations, Stiennon et al. on the reference
summaries), which gives PPO rewards centred on good behaviour.

**The checkpoint** is a standard checkpoint directory (``config.json`` with ``stage: "reward"``) whose
``model.safetensors`` holds the language model's weights under their usual names, without an untied
``lm_head``, plus ``reward_head.weight`` (1, n_embd) and ``reward_head.bias`` (1,).
:func:`load_reward_model` returns a :class:`RewardScorer` whose call is PPO's reward function.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.align.preference import (
    PreferenceBatches,
    build_preference_batches,
    check_preference_config,
    heldout_pair_scores,
    with_epochs,
)
from llmkit.chat import render_completion
from llmkit.config import check
from llmkit.errors import InputError
from llmkit.figures import plot_metrics
from llmkit.io import atomic_directory
from llmkit.model.checkpoint import load_checkpoint, write_model
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tasks.registry import TASK_NAMES
from llmkit.tokenizer import Tokenizer
from llmkit.train.checkpoint import MANIFEST, gather_state, write_manifest
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer

NORMALIZATION_RESPONSES = 1024  # best responses sampled to centre the rewards


class RewardModel(Transformer):
    """The language model with a scalar reward head instead of its unembedding (module docstring).

    Not an architecture variant: the trunk is the :class:`~llmkit.model.Transformer` unchanged, so its
    weights load from any checkpoint of that config. An untied ``lm_head`` is removed (InstructGPT);
    a tied one is the token embedding and stays. ``forward`` returns rewards, not logits.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if not config.tie_embeddings:
            self.lm_head = None
        self.reward_head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.reward_head.weight, mean=0.0, std=config.init_std)
        nn.init.zeros_(self.reward_head.bias)

    @classmethod
    def from_language_model(cls, language_model: Transformer) -> "RewardModel":
        """A reward model whose trunk is a copy of ``language_model``'s weights and whose head is new."""
        model = cls(language_model.config).to(language_model.token_embedding.weight.device)
        trunk = {
            name: tensor for name, tensor in language_model.state_dict().items() if not name.startswith("lm_head.")
        }
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        leftover = set(missing) - {"reward_head.weight", "reward_head.bias", "lm_head.weight"}
        if leftover or unexpected:
            raise ValueError(
                f"the language model's weights do not fit a reward model of its config "
                f"(missing {sorted(leftover)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return model

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Rewards (batch,) in float32 of right-padded sequences whose last real token is at ``last_index``."""
        hidden = self.hidden_states(input_ids)
        last = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last_index]
        return self.reward_head(last).squeeze(-1).float()

    def flops_per_token(self, sequence_length: int | None = None) -> float:
        flops = super().flops_per_token(sequence_length)
        # No unembedding runs; the tied matrix was counted as the head's matmul.
        return flops - 6 * self.lm_head.weight.numel() if self.config.tie_embeddings else flops


# ------------------------------------------------------------------------------------ loss
def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean over pairs of ``-log σ(r_chosen - r_rejected - margin)`` (InstructGPT eq. 1)."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if weights is None:
        return losses.mean()
    return (weights * losses).sum() / weights.sum()


def reward_pair_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the better and the worse response of every pair of a preference batch."""
    rewards = model(batch["input_ids"], batch["last_index"])
    return rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]


def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor], margin: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The training loop's loss function: the pairwise loss, with pair accuracy, margin and mean rewards."""
    chosen, rejected = reward_pair_scores(model, batch)
    loss = pairwise_reward_loss(chosen, rejected, margin, batch["pair_weight"])
    margins = (chosen - rejected).detach()
    metrics = {
        "accuracy": (margins > 0).float().mean(),
        "margin": margins.mean(),
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------- scoring
class RewardScorer:
    """A reward model with its tokenizer: rewards of responses to prompts.

    ``scorer(prompt, completion)`` is the reward function of PPO (``prompt`` a message list or a user
    message, ``completion`` an assistant message text or messages). A completion sampled with tool calls
    holds special tokens that message text may not; score its token ids with :meth:`score_ids`.
    """

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """The reward of each rendered prompt + response, read at its last token (same order)."""
        context = self.model.config.context_length
        for index, sequence in enumerate(sequences):
            if not 1 <= len(sequence) <= context:
                raise InputError(
                    f"sequence {index}: {len(sequence)} tokens; a reward needs 1 to context_length={context}"
                )
        device = self.model.token_embedding.weight.device
        rewards = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))  # little padding per batch
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            ids = torch.full(
                (len(chosen), max(len(sequences[index]) for index in chosen)),
                self.tokenizer.pad_id,
                dtype=torch.long,
                device=device,
            )
            for row, index in enumerate(chosen):
                ids[row, : len(sequences[index])] = torch.tensor(sequences[index], device=device)
            last = torch.tensor([len(sequences[index]) - 1 for index in chosen], device=device)
            for index, reward in zip(chosen, self.model(ids, last).tolist()):
                rewards[index] = reward
        return rewards

    def score(self, prompts: list, completions: list) -> list[float]:
        """Rewards of ``completions[i]`` as the answer to ``prompts[i]``."""
        from llmkit.tasks.datasets import to_messages

        if len(prompts) != len(completions):
            raise InputError(f"{len(prompts)} prompts but {len(completions)} completions")
        sequences = [
            render_completion(
                self.tokenizer,
                to_messages(prompt, f"prompts[{index}]", "user"),
                to_messages(completion, f"completions[{index}]", "assistant"),
            )[0]
            for index, (prompt, completion) in enumerate(zip(prompts, completions))
        ]
        return self.score_ids(sequences)

    def __call__(self, prompt, completion) -> float:
        return self.score([prompt], [completion])[0]


def load_reward_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, batch_size: int = 16
) -> RewardScorer:
    """The reward model of a checkpoint written by :func:`train_reward`, with its tokenizer."""
    loaded = load_checkpoint(path, device, dtype, model_class=RewardModel, stage="reward")
    return RewardScorer(loaded.model, loaded.tokenizer, batch_size)


# -------------------------------------------------------------------------------- the stage
def reward_training(**changes) -> TrainConfig:
    """The training loop's settings with reward-model defaults (``changes`` override them); ``batch_size``
    counts prompts, each with all its compared responses."""
    return TrainConfig(
        **{"out": "runs/reward", "batch_size": 8, "lr": 5e-5, "warmup_steps": 20, "eval_interval": 50, **changes}
    )


@dataclass
class RewardConfig:
    base: str = field(
        default="runs/sft", metadata={"help": "checkpoint the reward model starts from (SFT or pretrained)"}
    )
    datasets: list[str] = field(
        default_factory=lambda: ["arithmetic"],
        metadata={
            "help": f"preference files (prompt/chosen/rejected, chosen/rejected, prompt/responses ranked best "
            f"first) and embedded tasks' generated pairs ({', '.join(TASK_NAMES)}; name:N for N problems)"
        },
    )
    generated_pairs: int = field(
        default=2000, metadata={"help": "problems generated for an embedded task named without :N"}
    )
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "held-out share: of each file's rows, or problems of an embedded task's held-out split per "
            "training problem"
        },
    )
    margin: float = field(
        default=0.0, metadata={"help": "margin m of the loss -log sigmoid(r_chosen - r_rejected - m)"}
    )
    epochs: float | None = field(
        default=1.0,
        metadata={
            "help": "passes over the prompts (InstructGPT trains one: more overfits); with max_steps or max_time, "
            "whichever ends first"
        },
    )
    normalize: bool = field(
        default=True, metadata={"help": "shift the rewards so the best responses of the training prompts average 0"}
    )
    train: TrainConfig = field(default_factory=reward_training)

    def __post_init__(self) -> None:
        check_preference_config(self)
        check(self.margin >= 0, "margin", self.margin, "must be >= 0")
        check(
            self.train.optimizer == "adamw",
            "optimizer",
            self.train.optimizer,
            "Muon is for hidden matrices, not the scalar reward head; use adamw",
        )
        check(
            not (self.normalize and self.train.checkpoint_format == "sharded"),
            "checkpoint_format",
            self.train.checkpoint_format,
            "normalize rewrites the final checkpoint's model.safetensors; use --train.checkpoint-format full "
            "or --normalize false",
        )


def _normalize(model: RewardModel, tokenizer: Tokenizer, batches: PreferenceBatches, seed: int) -> float:
    """Shift the head's bias so the best responses of (a sample of) the training prompts average 0;
    returns the shift. Every rank computes it alike (FSDP needs each to run the forward passes)."""
    groups = random.Random(seed).sample(batches.groups, min(NORMALIZATION_RESPONSES, len(batches.groups)))
    was_training = model.training
    model.eval()
    offset = sum(RewardScorer(model, tokenizer).score_ids([group.sequences[0].tolist() for group in groups])) / len(
        groups
    )
    model.train(was_training)
    with torch.no_grad():
        model.reward_head.bias -= offset
    return offset


def _rewrite_model(checkpoint: Path, state: dict, config: ModelConfig, metadata: dict) -> None:
    """Replace a checkpoint's weights and config.json, keeping its other files (optimizer, trainer state, tokenizer)."""
    with atomic_directory(checkpoint) as building:
        for path in checkpoint.iterdir():
            if path.name not in ("model.safetensors", "config.json", MANIFEST):
                shutil.copy2(path, building / path.name)
        write_model(building, state, config, metadata)
        write_manifest(building)  # last: the checksums of the new weights, so resume accepts it


def train_reward(config: RewardConfig) -> dict:
    """Train a reward model on ``config.datasets`` from ``config.base``; returns the run summary."""
    train = config.train
    loaded = load_checkpoint(config.base)
    language_model, tokenizer, base = loaded.model, loaded.tokenizer, loaded.path
    batches, val_batches, counts = build_preference_batches(
        config.datasets,
        config.generated_pairs,
        config.val_fraction,
        tokenizer,
        language_model.config.context_length,
        train.batch_size,
        train.seed,
    )
    torch.manual_seed(train.seed)  # the head's initialisation
    model = RewardModel.from_language_model(language_model)
    del language_model
    model.train()  # load_model returns evaluation mode, which would switch dropout off
    metadata = {
        "stage": "reward",
        "stage_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer.sha256,
        "base": str(base.resolve()),
        "reward_head": "reward_head.weight, reward_head.bias: Linear(n_embd, 1) at the last token",
    }
    trainer = Trainer(
        model,
        batches,
        with_epochs(train, config.epochs, batches, val_batches),
        val_batches=val_batches,
        loss_fn=functools.partial(reward_loss, margin=config.margin),
        tokenizer=tokenizer,
        metadata=metadata,
        tokens_per_batch=batches.tokens_per_batch,
    )
    summary = trainer.run()
    offset = 0.0
    if config.normalize and not summary["interrupted"]:
        offset = _normalize(trainer.model, tokenizer, batches, train.seed)
        state, _ = gather_state(trainer.wrapped, trainer.optimizer)
        if trainer.world.is_main:
            _rewrite_model(Path(summary["checkpoint"]), state, model.config, {**metadata, "reward_offset": offset})
    heldout = (
        heldout_pair_scores(trainer.model, val_batches, reward_pair_scores, trainer.device, trainer.dtype)
        if val_batches is not None
        else {}
    )
    if trainer.world.is_main:
        plot_metrics(Path(train.out), ["accuracy", "margin", "rewards/chosen", "rewards/rejected"], "reward model")
    return {"base": str(base), **counts, **heldout, "reward_offset": round(offset, 6), **summary}
