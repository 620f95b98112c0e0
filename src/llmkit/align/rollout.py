"""Rollouts: the policy completes prompts through the inference engine; the completions become padded
training tensors with their old log-probabilities, reference log-probabilities and values.

Generation goes through :class:`~llmkit.infer.engine.Engine` (continuous batching, tool calls), with a
seed per request derived from ``(seed, iteration)`` and the request's position in the iteration, so a
rollout batch is a pure function of the policy's weights and the iteration (a resumed run draws what
an uninterrupted one would have), and a share of an iteration's prompts (a process's, under
``torchrun``) samples the completions it would have sampled among all of them.

A row is ``prompt + completion``, right-padded (causal attention keeps padding out of every earlier
position, so no attention mask is needed). The completion is what the engine returned, tool results
included, plus the end token that closed the assistant's turn: the engine stops at it without adding it
to ``Completion.token_ids``, but the policy chose it and must learn when to stop (as the SFT loss
trains on the closing ``<|end|>``, see :mod:`llmkit.chat`). ``Completion`` does not say which end token
stopped generation; a chat policy ends its turn with ``<|end|>``, which is the one appended (a rare
``<|endoftext|>`` is trained as ``<|end|>``).

``action_mask[t]`` is True when token ``t + 1`` is an action: a completion token the policy sampled.
Prompt tokens, padding and the tool results the engine injected (``Completion.injected``) are not: the
policy did not choose them, so they carry no log-probability ratio, no KL and no advantage (they
remain context, and the value of the state after them is still estimated at the next action).

A completion with tool calls falls into *steps*: the maximal runs of tokens the policy sampled between
the tool results the engine injected (each call is one step, the final answer the last). With process
supervision (:mod:`llmkit.align.grpo`) a reward rates each step, and the batch holds it at the action
position of the step's last token (``step_rewards``, where ``step_mask`` is True).

Old log-probabilities are recomputed with a training-style forward pass instead of taken from the
sampler: the two differ numerically (KV-cache decoding vs one full pass), and the PPO ratio must be
exactly 1 before the first update (Huang et al. 2024, "The N+ implementation details of RLHF with PPO").
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmkit.align.policy_gradient import policy_forward
from llmkit.chat import render_ids
from llmkit.infer.completion import Completion, Tools
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.tokenizer import Tokenizer

FINISHED = ("stop", "tool_calls")  # the policy sampled an end token (a turn's end, or a call's close)


@dataclass
class Prompt:
    messages: list[dict]
    ids: list[int]


def chat_prompt(tokenizer: Tokenizer, messages: list[dict]) -> Prompt:
    """A conversation rendered up to the ``<|assistant|>`` header that asks for the policy's reply."""
    return Prompt(messages, render_ids(tokenizer, messages, add_generation_prompt=True)[0])


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt: Prompt
    completion: Completion
    token_ids: list[int]  # the completion's tokens, with the end token that closed the turn
    injected: list[bool]  # per token of token_ids: a tool result's token, not the policy's

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason in FINISHED

    def step_ends(self) -> list[int]:
        """The index in ``token_ids`` of each step's last token: a sampled token followed by an injected
        one or by the end of the completion (module docstring)."""
        flags = self.injected + [True]
        return [index for index in range(len(self.token_ids)) if not flags[index] and flags[index + 1]]


def completion_tokens(completion: Completion, end_id: int) -> tuple[list[int], list[bool]]:
    """The completion's tokens and injected flags, with the sampled end token restored (module docstring)."""
    if completion.finish_reason not in FINISHED:
        return list(completion.token_ids), list(completion.injected)
    return [*completion.token_ids, end_id], [*completion.injected, False]


def request_seeds(seed: int, iteration: int, count: int, first: int = 0) -> list[int]:
    """Distinct sampling seeds for requests ``first .. first + count - 1`` of one iteration, a pure function
    of (seed, iteration, position): the first values of a longer draw are those of a shorter one."""
    return [int(value) for value in np.random.SeedSequence((seed, iteration)).generate_state(first + count)[first:]]


def generate_rollouts(
    engine: Engine,
    prompts: list[Prompt],
    samples_per_prompt: int,
    generation: GenerationConfig,
    tools: Tools | None,
    seed: int,
    iteration: int,
    first_prompt: int = 0,
) -> list[Rollout]:
    """``samples_per_prompt`` completions of every prompt (a prompt's samples next to each other);
    ``prompts`` begin at position ``first_prompt`` of the iteration's prompts, whose sampling seeds they take."""
    requests = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    seeds = request_seeds(seed, iteration, len(requests), first_prompt * samples_per_prompt)
    configs = [dataclasses.replace(generation, seed=request_seed) for request_seed in seeds]
    completions = engine.generate_ids([prompt.ids for prompt in requests], configs, tools)
    end_id = engine.tokenizer.stop_ids[0]
    return [
        Rollout(prompt, completion, *completion_tokens(completion, end_id))
        for prompt, completion in zip(requests, completions)
    ]


TRAINING_FIELDS = (
    "input_ids",
    "action_mask",
    "rewards",
    "old_logprobs",
    "reference_logprobs",
    "values",
    "advantages",
    "returns",
)


@dataclass
class RolloutBatch:
    """Padded rows and the per-token tensors of the algorithms, all ``(rows, length - 1)`` but the first
    and the per-row ones. ``advantages``/``returns`` are set by the algorithm."""

    input_ids: torch.Tensor  # (rows, length)
    action_mask: torch.Tensor  # (rows, length - 1) bool
    rewards: torch.Tensor  # (rows,) the scalar reward of each completion
    step_rewards: torch.Tensor | None = None  # (rows, length - 1) a step's reward at its last action, 0 elsewhere
    step_mask: torch.Tensor | None = None  # (rows, length - 1) bool: where a step ends
    old_logprobs: torch.Tensor | None = None
    reference_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.action_mask.sum(dim=1)

    def sequence_kls(self) -> torch.Tensor:
        """Per completion, sum(log pi_old - log pi_ref) over its actions: the k1 estimate of KL(pi || pi_ref)
        that InstructGPT's penalty sums (needs the scored log-probabilities)."""
        return torch.where(self.action_mask, self.old_logprobs - self.reference_logprobs, 0.0).sum(dim=1)

    def sequence_kl(self) -> float:
        """The mean of :meth:`sequence_kls` over the completions."""
        return float(self.sequence_kls().mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields a loss reads, as a batch dict of the Trainer."""
        return {name: getattr(self, name) for name in TRAINING_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RolloutBatch":
        """The batch of :meth:`tensors` (other keys of ``tensors`` are left out)."""
        return cls(**{name: tensors[name] for name in TRAINING_FIELDS if name in tensors})

    def rows(self, indices: torch.Tensor) -> "RolloutBatch":
        """The rows at ``indices``, cut to the longest of them (a minibatch pays for its own length only)."""
        acting = self.action_mask[indices].any(dim=0)
        positions = int(acting.nonzero().max()) + 1 if acting.any() else 1  # up to the last action of any row
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or value.dim() == 1:
                fields[field.name] = None if value is None else value[indices]
            else:  # input_ids hold one token more than the per-position tensors
                fields[field.name] = value[indices, : positions + (field.name == "input_ids")]
        return RolloutBatch(**fields)

    def to(self, device: torch.device) -> "RolloutBatch":
        return RolloutBatch(
            **{
                field.name: None if getattr(self, field.name) is None else getattr(self, field.name).to(device)
                for field in dataclasses.fields(self)
            }
        )


def build_batch(
    rollouts: list[Rollout], rewards: list[float], pad_id: int, step_rewards: list[list[float]] | None = None
) -> RolloutBatch:
    """Rows ``prompt + completion`` right-padded with ``pad_id``, and the action mask; with
    ``step_rewards`` (one per step of each rollout, :meth:`Rollout.step_ends`) the step tensors too."""
    lengths = [len(rollout.prompt.ids) + len(rollout.token_ids) for rollout in rollouts]
    width = max(lengths)
    input_ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    action_mask = torch.zeros((len(rollouts), width - 1), dtype=torch.bool)
    for row, rollout in enumerate(rollouts):
        start = len(rollout.prompt.ids)
        input_ids[row, : lengths[row]] = torch.tensor(rollout.prompt.ids + rollout.token_ids)
        # Token start + i is predicted at position start + i - 1.
        action_mask[row, start - 1 : lengths[row] - 1] = ~torch.tensor(rollout.injected, dtype=torch.bool)
    batch = RolloutBatch(input_ids, action_mask, torch.tensor(rewards, dtype=torch.float32))
    if step_rewards is not None:
        batch.step_rewards = torch.zeros(action_mask.shape)
        batch.step_mask = torch.zeros(action_mask.shape, dtype=torch.bool)
        for row, (rollout, values) in enumerate(zip(rollouts, step_rewards)):
            ends = rollout.step_ends()
            if len(values) != len(ends):
                raise ValueError(f"a completion has {len(ends)} steps but {len(values)} step rewards")
            positions = [len(rollout.prompt.ids) - 1 + end for end in ends]
            batch.step_rewards[row, positions] = torch.tensor(values, dtype=torch.float32)
            batch.step_mask[row, positions] = True
    return batch


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on the forward passes when ``dtype`` is not float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def score_rollouts(
    batch: RolloutBatch,
    policy: nn.Module,
    reference: nn.Module,
    value_head: nn.Module | None,
    temperature: float,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> RolloutBatch:
    """Fill in the old (policy) and reference log-probabilities, and the values when there is a value
    head, in forward passes of ``batch_size`` rows; zero outside the action mask."""
    device = batch.input_ids.device
    old, reference_logprobs, values = [], [], []
    for start in range(0, len(batch), batch_size):
        rows, actions = batch.input_ids[start : start + batch_size], batch.action_mask[start : start + batch_size]
        with autocast(device, dtype):
            outputs = policy_forward(policy, rows, temperature, value_head, actions)
            reference_outputs = policy_forward(reference, rows, temperature, action_mask=actions)
        old.append(outputs.logprobs)
        reference_logprobs.append(reference_outputs.logprobs)
        if outputs.values is not None:
            values.append(outputs.values)
    mask = batch.action_mask
    batch.old_logprobs = torch.cat(old) * mask
    batch.reference_logprobs = torch.cat(reference_logprobs) * mask
    batch.values = torch.cat(values) * mask if values else None
    return batch
