"""``llmkit dpo``: direct preference optimisation of a policy against a frozen reference.

DPO (Rafailov et al. 2023) trains the policy π on (chosen y_w, rejected y_l) pairs without a reward
model or sampling: with the log-ratio difference

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

(sequence log-probs summed over the response tokens, :func:`~llmkit.align.preference.sequence_logprobs`)
the losses per pair are

- ``dpo``: −log σ(β h) (eq. 7); with ``label_smoothing`` ε, the conservative cDPO
  −(1−ε) log σ(β h) − ε log σ(−β h) (Mitchell 2023), for labels flipped with probability ε;
- ``ipo``: (h − 1/(2β))² (Azar et al. 2023, eq. 17): a squared loss that pulls h to a finite target
  instead of pushing it to infinity, so it does not overfit deterministic preferences;
- ``hinge``: max(0, 1 − β h) (SLiC-HF, Zhao et al. 2023, with β as 1/δ).

β(log π − log π_ref) of a response is its *implicit reward*; the run logs TRL's metrics
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward
above rejected) and ``logps/chosen``, ``logps/rejected``, and the summary the same on held-out pairs.

The reference is the starting checkpoint (or ``reference``). By default its log-probs are computed
once before training for every training and held-out response and stored with the batches (TRL's
``precompute_ref_log_probs``); the reference then needs no memory during training, and the policy,
being the reference at step 0, starts at h = 0 and loss log 2. ``--no-precompute-reference`` keeps a
frozen copy and computes them batch by batch instead. Training is the one
:class:`~llmkit.train.trainer.Trainer`; the output is a standard language-model checkpoint (stage "dpo").
Rankings of K responses train on all their K(K−1)/2 pairs, weighted so each prompt counts once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmkit.align.preference import (
    PreferenceBatches,
    build_preference_batches,
    check_preference_config,
    heldout_pair_scores,
    sequence_logprobs,
    with_epochs,
)
from llmkit.config import check
from llmkit.errors import MismatchError
from llmkit.figures import plot_metrics
from llmkit.model.checkpoint import load_checkpoint
from llmkit.tasks.registry import TASK_NAMES
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer, resolve_device, resolve_dtype

LOSSES = ("dpo", "ipo", "hinge")


def log_ratio_difference(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), per pair."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair −(1−ε) log σ(β h) − ε log σ(−β h) (Rafailov et al. 2023 eq. 7; ε > 0: cDPO)."""
    scaled = beta * log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair (h − 1/(2β))² (Azar et al. 2023 eq. 17, β their τ)."""
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair max(0, 1 − β h) (SLiC-HF's calibration loss, Zhao et al. 2023, on reference-normalised log-probs as
    TRL)."""
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return torch.relu(1 - beta * h)


class DPOObjective:
    """The training loop's loss function for one of :data:`LOSSES`, and the implicit rewards of pairs.

    Reference log-probs come from the batch (``reference_logps``, precomputed) or, when a batch has
    none, from the frozen ``reference`` model, run without gradients under the loop's autocast.
    """

    def __init__(
        self, loss: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0, reference: nn.Module | None = None
    ):
        self.beta, self.reference = beta, reference
        self.loss_function = (
            functools.partial(dpo_loss, label_smoothing=label_smoothing)
            if loss == "dpo"
            else {"ipo": ipo_loss, "hinge": hinge_loss}[loss]
        )

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) sequence log-probs of every row."""
        policy = sequence_logprobs(model, batch["input_ids"], batch["continuation_mask"])
        if "reference_logps" in batch:
            return policy, batch["reference_logps"]
        if self.reference is None:
            raise ValueError("the batch has no reference_logps and no reference model was given")
        with torch.no_grad():
            return policy, sequence_logprobs(self.reference, batch["input_ids"], batch["continuation_mask"])

    def pair_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit rewards β(log π − log π_ref) of the chosen and the rejected response of every pair."""
        policy, reference = self.logps(model, batch)
        rewards = self.beta * (policy - reference)
        return rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        policy, reference = self.logps(model, batch)
        chosen, rejected, weights = batch["chosen_index"], batch["rejected_index"], batch["pair_weight"]
        losses = self.loss_function(policy[chosen], policy[rejected], reference[chosen], reference[rejected], self.beta)
        loss = (weights * losses).sum() / weights.sum()
        rewards = self.beta * (policy - reference).detach()
        margins = rewards[chosen] - rewards[rejected]
        metrics = {
            "rewards/chosen": rewards[chosen].mean(),
            "rewards/rejected": rewards[rejected].mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": policy[chosen].detach().mean(),
            "logps/rejected": policy[rejected].detach().mean(),
        }
        return loss, metrics


@torch.no_grad()
def precompute_reference_logps(
    reference: nn.Module, batches: PreferenceBatches, device: torch.device, dtype: torch.dtype
) -> None:
    """Store the reference's sequence log-probs in every group of ``batches`` (computed as the training
    loop computes the policy's: same function, device and autocast)."""
    was_training = reference.training
    reference.eval()
    for index in tqdm(range(batches.sequential_batches), desc="dpo: reference log-probs", unit=" batches", leave=False):
        members = batches.groups[index * batches.batch_size : (index + 1) * batches.batch_size]
        batch = batches.assemble(members)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logps = sequence_logprobs(reference, batch["input_ids"].to(device), batch["continuation_mask"].to(device))
        sizes = np.cumsum([len(group.sequences) for group in members])[:-1]
        for group, group_logps in zip(members, np.split(logps.cpu().numpy(), sizes)):
            group.reference_logps = group_logps
    reference.train(was_training)


# -------------------------------------------------------------------------------- the stage
def dpo_training(**changes) -> TrainConfig:
    """The training loop's settings with DPO defaults (``changes`` override them); ``batch_size`` counts
    prompts, each with all its compared responses."""
    return TrainConfig(
        **{"out": "runs/dpo", "batch_size": 8, "lr": 1e-5, "warmup_steps": 20, "eval_interval": 50, **changes}
    )


@dataclass
class DPOConfig:
    base: str = field(default="runs/sft", metadata={"help": "checkpoint of the policy to tune (usually the SFT model)"})
    reference: str | None = field(default=None, metadata={"help": "checkpoint of the frozen reference (default: base)"})
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
    loss: Literal["dpo", "ipo", "hinge"] = field(
        default="dpo",
        metadata={
            "help": "dpo: -log sigmoid(beta h) (TRL's 'sigmoid'); ipo: (h - 1/(2 beta))^2; hinge: max(0, 1 - beta h)"
        },
    )
    beta: float = field(
        default=0.1, metadata={"help": "strength of the implicit KL penalty to the reference (IPO: its tau)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "cDPO: assumed probability that a pair's label is flipped"}
    )
    precompute_reference: bool = field(
        default=True,
        metadata={"help": "compute the reference log-probs once before training (else a frozen copy runs every step)"},
    )
    epochs: float | None = field(
        default=1.0, metadata={"help": "passes over the prompts; with max_steps or max_time, whichever ends first"}
    )
    train: TrainConfig = field(default_factory=dpo_training)

    def __post_init__(self) -> None:
        check_preference_config(self)
        check(self.loss in LOSSES, "loss", self.loss, f"choose one of {', '.join(LOSSES)}")
        check(self.beta > 0, "beta", self.beta, "must be positive")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        check(
            self.label_smoothing == 0 or self.loss == "dpo",
            "label_smoothing",
            self.label_smoothing,
            "label smoothing (cDPO) is defined for the dpo loss only",
        )


def dpo(config: DPOConfig) -> dict:
    """Tune ``config.base`` on the preference pairs of ``config.datasets``; returns the run summary."""
    train = config.train
    loaded = load_checkpoint(config.base)
    policy, tokenizer, base = loaded.model, loaded.tokenizer, loaded.path
    reference, reference_path = policy, base
    if config.reference is not None:
        loaded = load_checkpoint(config.reference)
        reference, reference_tokenizer, reference_path = loaded.model, loaded.tokenizer, loaded.path
        if reference_tokenizer.sha256 != tokenizer.sha256:
            raise MismatchError(f"{reference_path}: the reference's tokenizer is not the policy's ({base})")
    batches, val_batches, counts = build_preference_batches(
        config.datasets,
        config.generated_pairs,
        config.val_fraction,
        tokenizer,
        policy.config.context_length,
        train.batch_size,
        train.seed,
    )
    device = resolve_device(train.device)
    dtype = resolve_dtype(train.dtype, device)
    if config.precompute_reference:
        reference.to(device)
        for part in (batches, val_batches):
            if part is not None:
                precompute_reference_logps(reference, part, device, dtype)
        reference = None  # no longer needed: training reads the stored log-probs
    elif reference is policy:
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.requires_grad_(False).eval().to(device)
    objective = DPOObjective(config.loss, config.beta, config.label_smoothing, reference)

    policy.train()  # load_model returns evaluation mode, which would switch dropout off
    metadata = {
        "stage": "dpo",
        "stage_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer.sha256,
        "base": str(base.resolve()),
        "reference": str(Path(reference_path).resolve()),
    }
    trainer = Trainer(
        policy,
        batches,
        with_epochs(train, config.epochs, batches, val_batches),
        val_batches=val_batches,
        loss_fn=objective,
        tokenizer=tokenizer,
        metadata=metadata,
        tokens_per_batch=batches.tokens_per_batch,
    )
    summary = trainer.run()
    heldout = (
        heldout_pair_scores(trainer.model, val_batches, objective.pair_scores, trainer.device, trainer.dtype)
        if val_batches is not None
        else {}
    )
    if trainer.world.is_main:
        plot_metrics(
            Path(train.out),
            ["rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"],
            f"{config.loss} preference tuning",
        )
    return {
        "base": str(base),
        "reference": str(reference_path),
        "loss": config.loss,
        "beta": config.beta,
        **counts,
        **heldout,
        **summary,
    }
