"""Beam search over one prompt, with the model's KV cache.

The search keeps the ``num_beams`` most likely open continuations. Each step scores every
(beam, next token) pair by its summed log-probability, takes the best candidates, closes those that end
in an end token (a finished hypothesis), and keeps the best open ones as the next beams. The cache rows
follow their beams: they are reordered by each new beam's origin before the next forward pass, so every
step costs one forward pass of ``num_beams`` tokens, not a re-run of the sequences.

It follows Hugging Face ``generate``'s beam search: (1 + number of end tokens) * num_beams candidates
per step, so at least ``num_beams`` of them are open; only candidates ranked within the first
``num_beams`` may finish; a hypothesis scores sum(logprob) / length**length_penalty, where length counts
the generated tokens including the end token; at the last step the best open beams finish as "length".
Early stopping is exact rather than HF's heuristic: the search ends once ``num_beams`` hypotheses are
finished and no open beam can still beat the worst of them (log-probabilities only ever add negative
terms, so the best an open beam can reach is its current sum at the most favourable length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.errors import InputError
from llmkit.model.transformer import Transformer


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # generated tokens; the end token that closed a "stop" hypothesis is not included
    score: float  # logprob / length**length_penalty
    logprob: float  # sum of the log-probabilities of the generated tokens, the end token included
    finish_reason: str  # "stop" (an end token) or "length"


class _FinishedHypotheses:
    """The ``capacity`` best finished hypotheses seen so far."""

    def __init__(self, capacity: int, length_penalty: float):
        self.capacity, self.length_penalty = capacity, length_penalty
        self.kept: list[BeamHypothesis] = []

    def score(self, logprob: float, length: int) -> float:
        return logprob / length**self.length_penalty

    def add(self, token_ids: list[int], logprob: float, finish_reason: str) -> None:
        length = len(token_ids) + (finish_reason == "stop")
        self.kept.append(BeamHypothesis(token_ids, self.score(logprob, length), logprob, finish_reason))
        self.kept.sort(key=lambda hypothesis: hypothesis.score, reverse=True)
        del self.kept[self.capacity :]

    def can_improve(self, best_open_logprob: float, open_length: int, longest: int) -> bool:
        """Whether an open beam with this log-probability sum and length may still finish above the worst
        kept hypothesis. Its sum can only fall; dividing a non-positive sum by length**penalty is largest
        at the longest reachable length when penalty > 0 and at the shortest (one more token) otherwise."""
        if len(self.kept) < self.capacity:
            return True
        best_length = longest if self.length_penalty > 0 else open_length + 1
        return self.score(best_open_logprob, best_length) > self.kept[-1].score


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt_ids: list[int],
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    end_ids: frozenset[int] = frozenset(),
) -> list[BeamHypothesis]:
    """The best ``num_beams`` hypotheses continuing ``prompt_ids``, best first; at most ``max_new_tokens``
    new tokens (fewer if the context fills up); a hypothesis closes at any token of ``end_ids``."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(
            f"beam search needs num_beams >= 1 and max_new_tokens >= 1, got {num_beams} and {max_new_tokens}"
        )
    context = model.config.context_length
    if not 0 < len(prompt_ids) < context:
        raise InputError(
            f"a prompt of {len(prompt_ids)} tokens: beam search needs 1 to {context - 1} "
            f"(the model's context is {context} tokens)"
        )
    steps = min(max_new_tokens, context - len(prompt_ids))
    device = model.token_embedding.weight.device
    cache = model.new_cache(1, capacity=len(prompt_ids) + steps)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[:, -1]
    beams: list[list[int]] = [[]]
    beam_logprobs = torch.zeros(1, device=device)
    finished = _FinishedHypotheses(num_beams, length_penalty)
    candidates_per_step = (1 + len(end_ids)) * num_beams
    for step in range(steps):
        totals = (beam_logprobs.unsqueeze(1) + logits.float().log_softmax(dim=-1)).flatten()
        values, indices = totals.topk(min(candidates_per_step, totals.numel()))
        vocab = logits.shape[-1]
        last_step = step == steps - 1
        origins, tokens, sums = [], [], []
        for rank, (total, index) in enumerate(zip(values.tolist(), indices.tolist())):
            origin, token = divmod(index, vocab)
            if token in end_ids or last_step:
                if rank < num_beams:
                    reason = "stop" if token in end_ids else "length"
                    finished.add(beams[origin] + ([] if reason == "stop" else [token]), total, reason)
            elif len(origins) < num_beams:
                origins.append(origin)
                tokens.append(token)
                sums.append(total)
        if not origins or not finished.can_improve(sums[0], step + 1, steps):
            break
        beams = [beams[origin] + [token] for origin, token in zip(origins, tokens)]
        beam_logprobs = torch.tensor(sums, device=device)
        cache.reorder(torch.tensor(origins))
        logits = model(torch.tensor(tokens, device=device).unsqueeze(1), cache=cache)[:, -1]
    return finished.kept
