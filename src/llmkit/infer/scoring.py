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
    """Scores of the last k tokens of one sequence of n tokens (k <= n - 1; token 0 has no context to be
    scored in): k = n - 1 unless fewer were asked for."""

    logprobs: torch.Tensor  # (k,) float32: log p(token_i | tokens_<i)
    greedy: torch.Tensor  # (k,) bool: token_i is the most likely token at its position
    top_ids: torch.Tensor | None = None  # (k, top) the ``top`` most likely tokens at each position
    top_logprobs: torch.Tensor | None = None  # (k, top) their log-probabilities


@torch.inference_mode()
def score_sequences(
    model: Transformer,
    sequences: list[list[int]],
    batch_size: int = 16,
    top: int = 0,
    scored: list[int] | None = None,
) -> list[TokenScores]:
    """Scores of every sequence (each at least one token and at most the model's context long), in the
    given order; ``top`` > 0 adds the most likely alternatives at each position. ``scored[i]``: score only
    the last ``scored[i]`` tokens of sequence i (a continuation after its context): the output head and the
    softmax over the vocabulary then run on those positions alone, which for a 49k vocabulary and a short
    answer is most of the work saved."""
    context = model.config.context_length
    for index, sequence in enumerate(sequences):
        if not 1 <= len(sequence) <= context:
            raise ValueError(
                f"sequence {index} has {len(sequence)} tokens; scoring needs 1 to context_length={context}"
            )
    counts = [len(sequence) - 1 for sequence in sequences] if scored is None else list(scored)
    for index, (sequence, count) in enumerate(zip(sequences, counts)):
        if not 0 <= count <= len(sequence) - 1:
            raise ValueError(f"sequence {index} has {len(sequence)} tokens; cannot score its last {count}")
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
        hidden = model.hidden_states(ids)
        # Position t predicts token t + 1: the last k tokens of a row of n are predicted at n - k - 1 .. n - 2.
        rows = torch.tensor([row for row, index in enumerate(chosen) for _ in range(counts[index])], dtype=torch.long)
        positions = torch.tensor(
            [
                position
                for index in chosen
                for position in range(len(sequences[index]) - counts[index] - 1, len(sequences[index]) - 1)
            ],
            dtype=torch.long,
        )
        rows, positions = rows.to(device), positions.to(device)
        logprobs = model.output_logits(hidden[rows, positions]).float().log_softmax(dim=-1)
        targets = ids[rows, positions + 1]
        chosen_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        greedy = (logprobs.argmax(dim=-1) == targets).cpu()
        if top:
            top_logprobs, top_ids = (part.cpu() for part in logprobs.topk(min(top, logprobs.shape[-1]), dim=-1))
        offset = 0
        for index in chosen:
            piece = slice(offset, offset + counts[index])
            offset += counts[index]
            results[index] = TokenScores(
                chosen_logprobs[piece],
                greedy[piece],
                top_ids[piece] if top else None,
                top_logprobs[piece] if top else None,
            )
    return results
