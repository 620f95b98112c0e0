"""llmkit's decoding-attention kernel against PyTorch's attention, in one process.

The engine attends one new token per row with ``llmkit.infer.cpu_kernels.decode_attention`` (set on every
``Attention`` as its ``decode_attention`` hook); without the hook the model calls ``scaled_dot_product_attention``
(the CPU flash kernel, in float32 for bfloat16 models as the model does). Two measurements, round-robin, medians:

* ``attention_us``: one SmolLM2-135M layer (3 key/value heads of 64, 3 query heads each), one request, bfloat16
  cache views of 64, 256 and 1024 positions, the two called directly; ``speedup`` = PyTorch's us / the kernel's.
* ``decode_tokens_per_s``: the real SmolLM2-135M-Instruct (``../shared/data/models``; skipped with a reason when
  absent), compiled bfloat16 engines with and without the hook, 1 and 8 concurrent requests of 128 greedy tokens;
  ``speedup`` per request count, and ``same_tokens`` (the two choose the same greedy tokens up to the first
  difference, as a fraction: bfloat16 rounds the attention output, so near-ties may flip).

About 1 minute for the layer and 5-10 more for the engines (compiling two, Inductor's cache helps) on 2 cores.

Usage: python benchmarks/decode_attention.py [--threads 2] [--repeats 9] [--no-model]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved_rates, kernel_benchmark, on_smollm2  # noqa: E402

from llmkit.infer import Engine, EngineConfig, GenerationConfig, cpu_kernels  # noqa: E402
from llmkit.model.transformer import Attention  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM = 3, 3, 64  # SmolLM2-135M: 9 query heads sharing 3 key/value heads


def pytorch_attention(q, keys, values, mask):
    """What the model runs without the hook: float32 SDPA over the group's query rows."""
    return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask).to(q.dtype)


def emit_speedup(rates: dict[str, float], **context) -> None:
    emit("speedup", round(rates["llmkit"] / rates["pytorch"], 3), "x", **context)


def layer(repeats: int, context: dict) -> None:
    for span in (64, 256, 1024):
        q = torch.randn(1, KV_HEADS, GROUP, HEAD_DIM).bfloat16()
        cache = torch.randn(2, 1, KV_HEADS, span + 64, HEAD_DIM).bfloat16()
        keys, values = cache[0, :, :, :span], cache[1, :, :, :span]
        mask = torch.ones(1, 1, 1, span, dtype=torch.bool)
        calls = 200

        def rate(attend):
            start = time.perf_counter()
            for _ in range(calls):
                attend(q, keys, values, mask)
            return calls / (time.perf_counter() - start)

        rates = interleaved_rates(
            {"pytorch": lambda: rate(pytorch_attention), "llmkit": lambda: rate(cpu_kernels.decode_attention)}, repeats
        )
        for system, calls_per_s in rates.items():
            emit("attention_us", round(1e6 / calls_per_s, 1), "us", system=system, cached_positions=span, **context)
        emit_speedup(rates, of="attention_us", cached_positions=span, **context)


def agreement(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def model(checkpoint: Path, repeats: int, context: dict) -> None:
    engines = {}
    for system in ("pytorch", "llmkit"):
        engine = Engine.from_config(EngineConfig(checkpoint=str(checkpoint), dtype="bfloat16", compile=True))
        if system == "pytorch":
            for module in engine.model.modules():
                if isinstance(module, Attention):
                    module.decode_attention = None
        engines[system] = engine
    config = GenerationConfig(max_new_tokens=128, temperature=0, stop_at_end_of_text=False)
    for requests in (1, 8):
        prompts = [engines["llmkit"].tokenizer.encode(f"Story {i}: once upon a time") for i in range(requests)]
        tokens = {system: engine.generate_ids(prompts, config) for system, engine in engines.items()}  # compiles

        def generate(engine, prompts=prompts):
            start = time.perf_counter()
            engine.generate_ids(prompts, config)
            return 128 * len(prompts) / (time.perf_counter() - start)

        rates = interleaved_rates(
            {system: (lambda e=engine: generate(e)) for system, engine in engines.items()}, repeats
        )
        same = [agreement(a.token_ids, b.token_ids) for a, b in zip(tokens["pytorch"], tokens["llmkit"])]
        for system, rate in rates.items():
            emit(
                "decode_tokens_per_s",
                round(rate, 1),
                "tokens/s",
                system=system,
                model="SmolLM2-135M-Instruct",
                weights="bfloat16+compile",
                requests=requests,
                **context,
            )
        same_tokens = round(sum(same) / len(same), 3)
        emit_speedup(rates, of="decode_tokens_per_s", requests=requests, same_tokens=same_tokens, **context)


def main() -> None:
    if (benchmark := kernel_benchmark(__doc__, "the layer")) is None:
        return
    arguments, context = benchmark
    layer(arguments.repeats, context)
    on_smollm2(arguments.no_model, "SmolLM2 engines", lambda checkpoint: model(checkpoint, arguments.repeats, context))


if __name__ == "__main__":
    main()
