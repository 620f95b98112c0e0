"""Mixtures and curricula: how often each source's documents appear in the training split, and in which order.

GPT-3 (Brown et al. 2020, table 2.2) samples its sources by weight rather than
by size, so small high-quality sources are seen for several epochs and large
noisy ones for less than one. Here a source's weight is its share of the
training bytes: with every weight unset the mixture is the natural one (one
epoch each); otherwise source ``s`` is repeated ``epochs[s] = share[s] * total / size[s]``
times, whole epochs by repetition and the fractional part by a seeded sample of
its documents. The total defaults to the corpus's own size.
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

from llmkit.errors import ConfigError

Curriculum = Literal["none", "length", "perplexity", "quality"]
# The document meta value each curriculum orders by, and whether "easy" comes first in ascending order.
CURRICULUM_KEYS = {
    "length": ("bytes", True),
    "perplexity": ("bits_per_byte", True),
    "quality": ("quality_score", False),
}


def mixture_epochs(
    source_bytes: dict[str, int], weights: dict[str, float | None], total_bytes: int | None = None
) -> dict[str, float]:
    """Epochs of every source so that its share of ``total_bytes`` equals its normalised weight."""
    given = {name: weight for name, weight in weights.items() if weight is not None}
    if not given:
        return {name: 1.0 for name in source_bytes}
    if len(given) != len(source_bytes):
        missing = sorted(set(source_bytes) - set(given))
        raise ConfigError("weight", None, f"give every source a weight or none (missing for {', '.join(missing)})")
    total = total_bytes if total_bytes is not None else sum(source_bytes.values())
    # A source the filters emptied cannot take its share: the others split the whole mixture.
    weight_sum = sum(weight for name, weight in given.items() if source_bytes[name])
    return {name: given[name] / weight_sum * total / size if size else 0.0 for name, size in source_bytes.items()}


def sample_mixture(sources: Sequence[str], sizes: Sequence[int], epochs: dict[str, float], seed: int) -> list[int]:
    """Indices of the documents in the mixture, a document appearing once per epoch of its source.

    ``sources[i]`` and ``sizes[i]`` describe document ``i``. The fractional epoch is a
    random subset of the source's documents holding that fraction of its bytes.
    """
    by_source: dict[str, list[int]] = {}
    for index, name in enumerate(sources):
        by_source.setdefault(name, []).append(index)
    chosen: list[int] = []
    for name, members in by_source.items():
        whole, fraction = divmod(epochs[name], 1.0)
        chosen += members * int(whole)
        if fraction > 0:
            shuffled = list(members)
            random.Random(f"{seed}:{name}").shuffle(shuffled)
            budget, taken = fraction * sum(sizes[i] for i in members), 0
            for index in shuffled:
                if taken >= budget:
                    break
                chosen.append(index)
                taken += sizes[index]
    return chosen


def order_documents(indices: list[int], metas: Sequence[dict], curriculum: Curriculum, seed: int) -> list[int]:
    """Shuffle ``indices``; a curriculum then sorts them easy-first (stable, so ties stay shuffled).

    ``length`` puts short documents first, ``perplexity`` low bits per byte first,
    ``quality`` high classifier scores first. Documents without the value go last.
    """
    ordered = list(indices)
    random.Random(seed).shuffle(ordered)
    if curriculum == "none":
        return ordered
    key, ascending = CURRICULUM_KEYS[curriculum]

    def sort_key(index: int) -> tuple[bool, float]:
        value = metas[index].get(key)
        if value is None or value != value:  # missing or NaN
            return (True, 0.0)
        return (False, value if ascending else -value)

    return sorted(ordered, key=sort_key)
