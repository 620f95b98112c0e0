"""The KV cache: pre-allocated keys and values of every layer for a batch of sequence slots.

Every row keeps its own filled length, so rows at different positions decode together (continuous
batching, Yu et al. 2022, Orca): a forward appends each row's new keys and values right after that row's
own positions, and the model masks each row's queries to them. Rows that move in lock-step (one
sequence, the beams of a beam search, a batch of equal-length prompts) take the fast path of plain
slices and no mask. ``rows(start, stop)`` is a view on some of the slots that shares their storage, so a
prompt is prefilled straight into its slot; rows that are not neighbours are copied out (``take``) for a
forward and written back (``put``).

The forward calls :meth:`KVCache.begin` once (where the new tokens go), :meth:`KVCache.update` in every
layer (write them, return everything the layer's queries may attend to), then :meth:`KVCache.advance`.
:class:`PositionedRows` does the same through tensors only (no Python reads of the lengths), for a forward
that ``torch.compile`` traces as one graph.
"""

from __future__ import annotations

import torch

from llmkit.model.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device):
        shape = (config.n_layer, batch_size, config.n_kv_head, capacity, config.head_dim)
        # Zeros, not empty: masked-out positions still meet the attention weights (as 0 * value), and
        # uninitialised memory may hold NaN bit patterns.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # On the CPU: the forward reads them in Python to choose its path, without a device sync.
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self._start: int | None = None  # the rows' common first new position, or None when they differ
        self._write_rows: torch.Tensor | None = None  # (batch, 1) row index of every new token
        self._write_positions: torch.Tensor | None = None  # (batch, length) cache position of every new token
        self._end = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def begin(self, length: int) -> tuple[int | torch.Tensor, int]:
        """Plan a forward of ``length`` new tokens per row: ``(start, end)``, where ``start`` is the rows'
        common first new position, or their own ones as a (batch, 1) tensor when they differ, and ``end``
        is how far the longest row then reaches."""
        if self.lengths.shape[0] != self.batch_size:
            raise ValueError(
                f"the cache has {self.batch_size} rows of keys but {self.lengths.shape[0]} lengths: "
                "reorder its rows with KVCache.reorder"
            )
        starts = self.lengths.tolist()
        self._end = max(starts) + length
        if self._end > self.capacity:
            raise ValueError(
                f"{length} new tokens after {max(starts)} cached ones exceed the cache's capacity of {self.capacity}"
            )
        if min(starts) == max(starts):
            self._start = starts[0]
            return self._start, self._end
        device = self.keys.device
        self._start = None
        row_starts = self.lengths.to(device).unsqueeze(1)
        self._write_positions = row_starts + torch.arange(length, device=device)
        self._write_rows = torch.arange(self.batch_size, device=device).unsqueeze(1)
        return row_starts, self._end

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new (batch, kv_heads, length, head_dim) keys and values; return the cached
        ones up to the planned end, for attention."""
        if self._start is not None:
            self.keys[layer, :, :, self._start : self._end] = keys
            self.values[layer, :, :, self._start : self._end] = values
        else:
            # One scatter per tensor for all rows: index (row, :, position) takes (batch, length, heads, dim).
            self.keys[layer][self._write_rows, :, self._write_positions] = keys.transpose(1, 2)
            self.values[layer][self._write_rows, :, self._write_positions] = values.transpose(1, 2)
        return self.keys[layer, :, :, : self._end], self.values[layer, :, :, : self._end]

    def advance(self, length: int) -> None:
        self.lengths += length

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view on rows ``start``..``stop``-1: what a forward through it writes lands in this cache."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.lengths = self.lengths[start:stop]
        return view

    def take(self, rows: list[int]) -> "KVCache":
        """A cache of its own holding copies of ``rows`` (in that order): a forward over rows that are not
        neighbours (so no :meth:`rows` view holds them), which :meth:`put` then writes back."""
        index = torch.tensor(rows, device=self.keys.device)
        part = KVCache.__new__(KVCache)
        part.__dict__.update(self.__dict__)
        part.keys, part.values = self.keys.index_select(1, index), self.values.index_select(1, index)
        part.lengths = self.lengths[rows].clone()
        return part

    def put(self, rows: list[int], part: "KVCache") -> None:
        """Write ``part`` (from :meth:`take` of the same ``rows``) back: its positions up to its longest row,
        and its lengths."""
        index = torch.tensor(rows, device=self.keys.device)
        end = int(part.lengths.max())
        self.keys[:, index, :, :end] = part.keys[:, :, :, :end]
        self.values[:, index, :, :end] = part.values[:, :, :, :end]
        self.lengths[rows] = part.lengths

    def reorder(self, origins: torch.Tensor) -> None:
        """Row i becomes the old row ``origins[i]`` (rows may repeat and their number change): beam search
        continues every new beam from its parent's cache."""
        self.keys = self.keys.index_select(1, origins.to(self.keys.device))
        self.values = self.values.index_select(1, origins.to(self.keys.device))
        self.lengths = self.lengths.index_select(0, origins.cpu())

    def move(self, source: int, target: int) -> None:
        """Put row ``source``'s sequence into row ``target`` and leave ``source`` empty (continuous
        batching keeps its running rows at the front, so one decode step is one slice of the cache)."""
        filled = int(self.lengths[source])
        self.keys[:, target, :, :filled] = self.keys[:, source, :, :filled]
        self.values[:, target, :, :filled] = self.values[:, source, :, :filled]
        self.lengths[target] = filled
        self.lengths[source] = 0

    def grow(self, batch_size: int, capacity: int) -> None:
        """Enlarge to at least ``batch_size`` rows of ``capacity`` positions, keeping what is cached."""
        batch_size, capacity = max(batch_size, self.batch_size), max(capacity, self.capacity)
        if (batch_size, capacity) == (self.batch_size, self.capacity):
            return
        shape = (self.keys.shape[0], batch_size, self.keys.shape[2], capacity, self.keys.shape[4])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)
        self.lengths = torch.cat([self.lengths, torch.zeros(batch_size - self.lengths.shape[0], dtype=torch.long)])


class PositionedRows:
    """The first rows of a :class:`KVCache` for one forward pass, with every row's first new position given
    as a (rows, 1) tensor and the span attention reads (``end``) fixed by the caller. Writes are one indexed
    store per layer and tensor, masks come from the positions, and nothing reads the lengths in Python, so
    ``torch.compile`` traces the whole forward as one graph. It holds the cache's whole tensors (the rows
    are the first ``len(starts)``), so a compiled graph always sees the same memory layout. The caller
    advances the cache's lengths."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, end: int):
        self.keys, self.values, self.starts, self.end = keys, values, starts, end

    @classmethod
    def of(cls, cache: KVCache, rows: int, length: int) -> "PositionedRows":
        """Rows 0..rows-1 of ``cache`` for ``length`` new tokens each; attention reads as far as the
        longest row then reaches."""
        lengths = cache.lengths[:rows]
        end = int(lengths.max()) + length
        if end > cache.capacity:
            raise ValueError(
                f"{length} new tokens after {end - length} cached ones exceed the cache's capacity of {cache.capacity}"
            )
        return cls(cache.keys, cache.values, lengths.to(cache.keys.device).unsqueeze(1), end)

    def begin(self, length: int) -> tuple[torch.Tensor, int]:
        return self.starts, self.end

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, length, _ = keys.shape
        rows = torch.arange(batch, device=keys.device).unsqueeze(1)
        positions = self.starts + torch.arange(length, device=keys.device)
        layers = torch.full_like(rows, layer)
        # Indexed on the whole (layers, rows, heads, positions, dim) tensor, so a compiled graph writes in place.
        self.keys[layers, rows, :, positions] = keys.transpose(1, 2)
        self.values[layers, rows, :, positions] = values.transpose(1, 2)
        return self.keys[layer, :batch, :, : self.end], self.values[layer, :batch, :, : self.end]

    def advance(self, length: int) -> None:
        """Nothing: the lengths live outside the traced forward (see the class docstring)."""
