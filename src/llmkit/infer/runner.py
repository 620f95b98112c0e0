"""The engine's forward passes over its KV cache: prefill, decoding steps and draft verification.

The scheduler (``llmkit.infer.scheduler``) decides what each cache row needs; a :class:`ModelRunner`
runs it. Eager by default. With ``compile=True`` the one-token decoding step of the running rows is one
``torch.compile`` graph: the cache is seen through :class:`~llmkit.model.kv_cache.PositionedRows` (each
row's position a tensor, writes one indexed store per layer), sizes are symbolic (batch, cache capacity,
attended span), so one graph serves every step; what is left in Python is one call a token instead of a
few hundred small operators. The first step compiles (tens of seconds for a 30-layer model on 2 cores;
Inductor's cache makes later processes faster); prompts and draft verification stay eager, where the
matrix products dominate. A model with forward hooks (tests that script the model) always runs eagerly.
"""

from __future__ import annotations

import types

import torch

from llmkit.model.kv_cache import KVCache, PositionedRows
from llmkit.model.transformer import Transformer

# Inductor on CPU: the weights become constants of the graph (freezing: oneDNN prepacked 16-bit weights, about
# 1.7x for bfloat16), which lets it choose, by measuring, its own C++ matrix kernels (the CPP GEMM templates,
# also for int8 and int4 weights) over ATen's (about 1.3x for int4; docs/infer.md). The graph's wrapper is C++
# (cpp_wrapper): a 30-layer step calls a few hundred kernels, and Python's wrapper spent about a millisecond a token
# between them (bfloat16 SmolLM2 1.04x and 1.10x in two A/Bs of 9 and 11 rounds, int4 1.02x). Set around every call
# (compiling happens in a call): Inductor reads these from its global config.
CPU_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True}


class ModelRunner:
    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.compile = compile
        self._compiled = None
        if compile:
            # 2 s of imports (Dynamo, Inductor) that only compiled runners need
            import torch._inductor.config
            import torch.fx.experimental._config

            inductor = CPU_INDUCTOR if model.token_embedding.weight.device.type == "cpu" else {}
            # Without duck sizing: a batch that happens to equal another size (say, 4 rows and 4 heads) would get
            # a graph of its own, one more compile when the batch changes. The patches are made once (making them
            # each step took 94 us a token, entering them 43 us).
            self._settings = (
                torch._inductor.config.patch(inductor),
                torch._dynamo.config.patch(specialize_float=True),
                torch.fx.experimental._config.patch(use_duck_shape=False),
            )
            # The weights are constants of the graph: guarding on every module attribute each step (about 1 ms
            # for 30 layers) would check nothing the graph still reads.
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            # Dynamo keeps its graphs per code object, and without the module guards it cannot tell two models
            # apart (a frozen graph holds its model's weights): each runner compiles its own copy of the code.
            code = ModelRunner._positioned_logits.__code__.replace()
            own = types.FunctionType(code, globals(), code.co_name).__get__(self)
            self._compiled = torch.compile(own, dynamic=True, fullgraph=True, options=options)

    def _positioned_logits(
        self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, end: int
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(ids, cache=PositionedRows(keys, values, starts, end))
        return self.model.output_logits(hidden[:, -1])

    def _hooked(self) -> bool:
        return bool(self.model._forward_hooks or self.model._forward_pre_hooks)

    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) of the next token after ``ids`` (rows, 1), one token for each of the cache's
        first ``rows`` rows, which then hold it."""
        rows = ids.shape[0]
        if self._compiled is None or self._hooked():
            return self.model(ids, cache=cache.rows(0, rows))[:, -1]
        view = PositionedRows.of(cache, rows, 1)
        inductor, dynamo, fx = self._settings
        with inductor, dynamo, fx:
            logits = self._compiled(ids, view.keys, view.values, view.starts, view.end)
        cache.lengths[:rows] += 1
        return logits

    def verify(self, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
        """Logits (length, vocab) after each of ``ids`` (1, length) continuing cache row ``row``: a draft's
        check in one pass. The row then holds all of them; the caller shortens it to what it keeps."""
        return self.model(ids, cache=cache.rows(row, row + 1))[0]

    def prefill(self, cache: KVCache, rows: list[int], pieces: list[list[int]]) -> None:
        """Append ``pieces[i]`` to cache row ``rows[i]``, all in one pass, without the output head. Rows may
        sit at different positions; rows that are not neighbours in order are copied out for the pass."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            append_to_rows(self.model, cache.rows(rows[0], rows[0] + len(rows)), pieces)
            return
        part = cache.take(rows)
        append_to_rows(self.model, part, pieces)
        cache.put(rows, part)


def append_to_rows(model: Transformer, cache: KVCache, pieces: list[list[int]]) -> torch.Tensor:
    """Append ``pieces[i]`` to cache row i in one forward pass and return the hidden states (rows, longest
    piece, n_embd): rows of different lengths are right-padded (a padded position is written but lies beyond
    its row's length, so it is masked until a real token overwrites it) and each row advances by its own
    length."""
    longest = max(len(piece) for piece in pieces)
    ids = torch.tensor([piece + [0] * (longest - len(piece)) for piece in pieces], device=cache.keys.device)
    before = cache.lengths.clone()
    hidden = model.hidden_states(ids, cache=cache)
    cache.lengths.copy_(before + torch.tensor([len(piece) for piece in pieces]))
    return hidden
