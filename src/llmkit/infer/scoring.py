"""Scoring: the log-probability a model gives each token of a sequence, given the tokens before it.

One forward pass per batch of sequences, right-padded (padding sits after every real token, so under
causal attention it changes nothing before it). Used by the engine's prompt log-probs (``echo``), by
evaluation (log-likelihood of answers, perplexity) and by the alignment losses' reference log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.model.transformer import Transformer


@dataclass
class TokenScores:
    """Scores of tokens 1..n-1 of one sequence of n tokens (token 0 has no context to be scored in)."""

    logprobs: torch.Tensor  # (n-1,) float32: log p(token_i | tokens_<i)
    greedy: torch.Tensor  # (n-1,) bool: token_i is the most likely token at its position
    top_ids: torch.Tensor | None = None  # (n-1, top) the ``top`` most likely tokens at each position
    top_logprobs: torch.Tensor | None = None  # (n-1, top) their log-probabilities


@torch.inference_mode()
def score_sequences(
    model: Transformer, sequences: list[list[int]], batch_size: int = 16, top: int = 0
) -> list[TokenScores]:
    """Scores of every sequence (each at least one token and at most the model's context long), in the
    given order; ``top`` > 0 adds the most likely alternatives at each position."""
    context = model.config.context_length
    for index, sequence in enumerate(sequences):
        if not 1 <= len(sequence) <= context:
            raise ValueError(
                f"sequence {index} has {len(sequence)} tokens; scoring needs 1 to context_length={context}"
            )
    device = model.token_embedding.weight.device
    results: list[TokenScores | None] = [None] * len(sequences)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        longest = max(len(sequences[index]) for index in chosen)
        ids = torch.zeros(len(chosen), longest, dtype=torch.long, device=device)
        for row, index in enumerate(chosen):
            ids[row, : len(sequences[index])] = torch.tensor(sequences[index], device=device)
        logprobs = model(ids)[:, :-1].float().log_softmax(dim=-1)
        targets = ids[:, 1:]
        chosen_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(dim=-1) == targets
        if top:
            top_logprobs, top_ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        for row, index in enumerate(chosen):
            length = len(sequences[index]) - 1
            results[index] = TokenScores(
                chosen_logprobs[row, :length].cpu(),
                greedy[row, :length].cpu(),
                top_ids[row, :length].cpu() if top else None,
                top_logprobs[row, :length].cpu() if top else None,
            )
    return results
