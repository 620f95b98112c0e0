"""Continuous batching against one request at a time, on the same engine and requests.

16 requests of mixed prompt lengths (8..160 tokens) and output lengths (16..128 new tokens), greedy, on a
random mid-sized model (6 layers x 384 wide, RoPE/RMSNorm/SwiGLU, 8192-token vocabulary, float32; speed
does not depend on the weights). "continuous" submits all of them at once to the engine's scheduler, which
decodes them together, each row at its own position, retiring each when it is done and admitting waiting
ones into freed slots (with ``--max-batch-size`` below 16); "sequential" completes them one after the
other. Both produce the same tokens in float32 (checked: ``same_tokens``); in bfloat16 the matmuls round
differently for different batch shapes, so some requests may differ (``requests_with_same_tokens``).
Prompt processing is included in the time.

Metrics (one JSON object per line): tokens_per_s of both (generated tokens / wall time) and
speedup_vs_sequential (the issue's goal: >= 4 with 16 concurrent requests).

Usage: python benchmarks/continuous_batching.py [--requests 16] [--max-batch-size 16] [--repeats 3]
    [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved_rates  # noqa: E402
from decode_speed import small_tokenizer  # noqa: E402

from llmkit.infer import Engine, GenerationConfig  # noqa: E402
from llmkit.model import Transformer, preset  # noqa: E402

MODEL = dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=6, context_length=512)


def mixed_requests(count: int, vocab_size: int, seed: int = 0) -> list[tuple[list[int], GenerationConfig]]:
    """Prompt lengths spread over 8..160 and output lengths over 16..128, independently shuffled."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.linspace(8, 160, count).round().long()[torch.randperm(count, generator=generator)]
    output_lengths = torch.linspace(16, 128, count).round().long()[torch.randperm(count, generator=generator)]
    return [
        (
            torch.randint(0, vocab_size, (int(prompt_length),), generator=generator).tolist(),
            GenerationConfig(max_new_tokens=int(output_length), temperature=0, stop_at_end_of_text=False),
        )
        for prompt_length, output_length in zip(prompt_lengths, output_lengths)
    ]


def continuous(engine: Engine, requests) -> list[list[int]]:
    completions = engine.generate_ids([prompt for prompt, _ in requests], [config for _, config in requests])
    return [completion.token_ids for completion in completions]


def sequential(engine: Engine, requests) -> list[list[int]]:
    return [engine.generate_ids([prompt], config)[0].token_ids for prompt, config in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' dtype")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    model = Transformer(preset("cpu-small", **MODEL)).eval().to(getattr(torch, arguments.dtype))
    with tempfile.TemporaryDirectory() as directory:
        # The weight layout that Engine.from_checkpoint (and so the server) uses.
        engine = Engine(
            model, small_tokenizer(Path(directory)), decoding_layout=True, max_batch_size=arguments.max_batch_size
        )
    requests = mixed_requests(arguments.requests, model.config.vocab_size)
    generated = sum(config.max_new_tokens for _, config in requests)
    together, alone = continuous(engine, requests), sequential(engine, requests)  # also warms both paths up
    # bfloat16 matmuls round differently for different batch shapes, so near-tied logits of the random
    # model can pick other tokens; float32 gives the same tokens.
    identical = sum(a == b for a, b in zip(together, alone))

    def rate(run) -> float:
        start = time.perf_counter()
        run(engine, requests)
        return generated / (time.perf_counter() - start)

    rates = interleaved_rates(
        {"continuous": lambda: rate(continuous), "sequential": lambda: rate(sequential)}, arguments.repeats
    )
    context = {
        "model": f"6x384 random, {arguments.dtype}",
        "requests": arguments.requests,
        "max_batch_size": arguments.max_batch_size,
        "generated_tokens": generated,
        "prompt_tokens": sum(len(prompt) for prompt, _ in requests),
        "same_tokens": identical == len(requests),
        "requests_with_same_tokens": identical,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for mode, value in rates.items():
        emit("tokens_per_s", round(value, 1), "tokens/s", mode=mode, **context)
    emit("speedup_vs_sequential", round(rates["continuous"] / rates["sequential"], 2), "x", **context)


if __name__ == "__main__":
    main()
