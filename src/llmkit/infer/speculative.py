"""Drafts for speculative decoding from the request's own text (prompt lookup decoding, Saxena 2023).

Text that quotes, edits or summarises its prompt, code, and lists repeat n-grams of their own sequence.
:func:`prompt_lookup` finds the most recent earlier occurrence of the sequence's last n tokens (n from
``MAX_NGRAM`` down to 1) and proposes the tokens that followed it. The scheduler checks a draft with one
forward pass over it and keeps the model's own greedy choices (``llmkit.infer.scheduler``), so a draft
changes the speed, never the tokens. No draft model is needed; a wrong draft costs the extra positions
of one forward pass, which on a CPU is little next to reading the weights once.
"""

from __future__ import annotations

MAX_NGRAM = 3


def prompt_lookup(sequence: list[int], max_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the sequence's last n-gram
    (the longest n up to ``max_ngram`` that occurs), or [] when none occurs or ``max_tokens`` < 1."""
    if max_tokens < 1:
        return []
    length = len(sequence)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = sequence[length - n :]
        # Latest occurrence first: recent text predicts the continuation best.
        last = tail[-1]
        for start in range(length - n - 1, -1, -1):
            if sequence[start + n - 1] == last and sequence[start : start + n] == tail:
                return sequence[start + n : start + n + max_tokens]
    return []
