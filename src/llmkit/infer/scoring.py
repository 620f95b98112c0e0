"""Scoring: the log-probability a model gives each token of a sequence, given the tokens before it.

One forward pass per batch of sequences, right-padded (padding sits after every real token, so under
causal attention it changes nothing before it). Used by the engine's prompt log-probs (``echo``), by
evaluation (log-likelihood of answers, perplexity) and by the alignment losses' reference log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.infer.runner import append_to_rows
from llmkit.infer.sampling import most_likely
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
        greedy = (most_likely(logprobs) == targets).cpu()
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


@torch.inference_mode()
def score_continuations(
    model: Transformer, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[TokenScores]:
    """Scores of each ``(context, continuation)`` pair's continuation tokens, as :func:`score_sequences` of
    ``context + continuation`` with ``scored = len(continuation)`` gives them, but with every distinct context
    of a batch run once: its keys and values are cached, copied to the rows of its continuations (the choices
    of a multiple-choice question share their question) and each continuation runs after it. A batch holds up
    to ``batch_size`` continuations (more when one context has more: its continuations stay together).
    Contexts need a token and each pair must fit the model's context."""
    window = model.config.context_length
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation or len(context) + len(continuation) > window:
            raise ValueError(
                f"pair {index}: {len(context)} context and {len(continuation)} continuation tokens; scoring "
                f"needs at least one of each and at most context_length={window} in all"
            )
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(index)
    # Similar lengths share a batch, so little compute goes to padding.
    ordered = sorted(groups.items(), key=lambda group: len(group[0]) + max(len(pairs[i][1]) for i in group[1]))
    # Every row of a batch runs as long as its longest context and then its longest continuation (the
    # shorter ones right-padded): a batch stays within the model's window as well as within batch_size rows.
    batches, batch, rows, reach = [], [], 0, (0, 0)
    for context, members in ordered:
        longest = (max(reach[0], len(context) - 1), max(reach[1], *(len(pairs[index][1]) for index in members)))
        if batch and (rows + len(members) > batch_size or sum(longest) > window):
            batches.append(batch)
            batch, rows = [], 0
            longest = (len(context) - 1, max(len(pairs[index][1]) for index in members))
        batch.append((context, members))
        rows, reach = rows + len(members), longest
    batches += [batch] if batch else []
    results: list[TokenScores | None] = [None] * len(pairs)
    for batch in batches:
        contexts = [list(context) for context, _ in batch]
        members = [index for _, group in batch for index in group]
        owners = torch.tensor([row for row, (_, group) in enumerate(batch) for _ in group], dtype=torch.long)
        capacity = max(len(context) - 1 for context in contexts) + max(len(pairs[index][1]) for index in members)
        cache = model.new_cache(len(contexts), capacity)
        # The context's last token runs with the continuation: its position predicts the first answer token.
        if any(len(context) > 1 for context in contexts):
            append_to_rows(model, cache, [context[:-1] for context in contexts])
        cache.reorder(owners)
        pieces = [[pairs[index][0][-1], *pairs[index][1][:-1]] for index in members]
        hidden = append_to_rows(model, cache, pieces)
        rows = torch.tensor([row for row, piece in enumerate(pieces) for _ in piece], dtype=torch.long)
        positions = torch.tensor([position for piece in pieces for position in range(len(piece))], dtype=torch.long)
        device = hidden.device
        logprobs = model.output_logits(hidden[rows.to(device), positions.to(device)]).float().log_softmax(dim=-1)
        targets = torch.tensor([token for index in members for token in pairs[index][1]], device=device)
        chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        greedy = (most_likely(logprobs) == targets).cpu()
        offset = 0
        for index in members:
            piece = slice(offset, offset + len(pairs[index][1]))
            offset += len(pairs[index][1])
            results[index] = TokenScores(chosen[piece], greedy[piece])
    return results
