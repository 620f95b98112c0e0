"""llmkit's CPU decoding kernels: their AVX2 versions against their AVX-512 (VNNI) versions, in one process.

On a CPU with AVX-512 and VNNI the kernels run their AVX-512 versions, which take up to 4 activation rows for each
weight they read (``llmkit.infer.cpu_kernels``); ``use_vector_bits(256)`` runs the AVX2 versions, one row at a time.
Two measurements, each round-robin between the widths, medians:

* ``kernel_ms``: the products of one SmolLM2-135M decoding step (30 blocks of q/k/v, output and feed-forward
  projections at SmolLM2's shapes, and the 49,152-row head; random weights: speed does not depend on them) for 1, 4,
  8 and 16 activation rows, bfloat16, int8 and int4 weights (int4 with the int8 head, as the engine stores it), the
  kernels called directly. ``speedup`` = AVX2 ms / AVX-512 ms. One row of bfloat16 or int8 products runs the AVX2
  version at either setting (the AVX-512 one was no faster there), so those two lines show the noise.
* ``decode_tokens_per_s``: the compiled engine on the real SmolLM2-135M-Instruct (``../shared/data/models``; skipped
  with a reason when absent), 1 and 8 concurrent requests of 128 greedy tokens, each width of weights.

The CPU needs AVX-512 VNNI for the comparison (Intel Ice Lake or AMD Zen 4 and later); elsewhere the script says so
and exits. About 5 minutes of kernels, and 5-10 more with the model (compiling included), on 2 cores.

Usage: python benchmarks/cpu_kernel_widths.py [--threads 2] [--repeats 9] [--no-model]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved_rates, kernel_benchmark, on_smollm2  # noqa: E402

from llmkit.infer import Engine, EngineConfig, GenerationConfig, cpu_kernels  # noqa: E402
from llmkit.infer.quantize import Int4Linear, Int8Linear  # noqa: E402

# SmolLM2-135M: (in, out) of each block's projections (fused q/k/v: 9 + 2 x 3 heads of 64; output; the fused gate and
# up projection; down), 30 blocks, and the tied head over 49,152 tokens.
BLOCK_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
BLOCKS, WIDTH, VOCABULARY = 30, 576, 49152
WEIGHTS = {"bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}


def step_products(kind: str) -> list:
    """(kernel, in_features, tiled weights, out_features) for every product of one decoding step."""
    ops, products = torch.ops.llmkit_cpu, []
    shapes = BLOCK_SHAPES * BLOCKS + [(WIDTH, VOCABULARY)]
    for inputs, outputs in shapes:
        linear = nn.Linear(inputs, outputs, bias=False)
        if kind == "bfloat16":
            weight = cpu_kernels.tile(linear.weight.detach().bfloat16(), cpu_kernels.TILE)
            products.append((ops.gemv_bf16, inputs, (weight,), outputs))
        elif kind == "int8" or outputs == VOCABULARY:
            layer = Int8Linear(linear, torch.bfloat16)
            products.append((ops.gemv_int8, inputs, (layer.weight, layer.scales), outputs))
        else:
            layer = Int4Linear(linear, torch.bfloat16)
            products.append((ops.gemv_int4, inputs, (layer.weight, layer.scales, layer.minimums), layer.stored_rows))
    return products


def timed_at(bits: int, run) -> float:
    cpu_kernels.use_vector_bits(bits)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def kernels(repeats: int, context: dict) -> None:
    for kind in ("bfloat16", "int8", "int4"):
        products = step_products(kind)
        for rows in (1, 4, 8, 16):
            inputs = {width: torch.randn(rows, width) for width in {shape[0] for shape in BLOCK_SHAPES}}

            def step():
                for kernel, width, weights, outputs in products:
                    kernel(inputs[width], *weights, outputs)

            step()
            runs = {bits: (lambda b=bits: 1 / timed_at(b, step)) for bits in (256, 512)}
            rates = interleaved_rates(runs, repeats)
            for bits, rate in rates.items():
                emit("kernel_ms", round(1e3 / rate, 2), "ms", weights=kind, rows=rows, vector_bits=bits, **context)
            emit("speedup", round(rates[512] / rates[256], 3), "x", weights=kind, rows=rows, of="kernel_ms", **context)


def model(checkpoint: Path, repeats: int, context: dict) -> None:
    for name, (dtype, quantize) in WEIGHTS.items():
        engine = Engine.from_config(
            EngineConfig(checkpoint=str(checkpoint), dtype=dtype, quantize=quantize, compile=True)
        )
        config = GenerationConfig(max_new_tokens=128, temperature=0, stop_at_end_of_text=False)
        for requests in (1, 8):
            prompts = [engine.tokenizer.encode(f"Story {i}: once upon a time") for i in range(requests)]
            engine.generate_ids(prompts, config)  # compiles the step for this batch

            def generate(bits, prompts=prompts):
                seconds = timed_at(bits, lambda: engine.generate_ids(prompts, config))
                return 128 * len(prompts) / seconds

            runs = {bits: (lambda b=bits: generate(b)) for bits in (256, 512)}
            rates = interleaved_rates(runs, max(3, repeats // 2))
            for bits, rate in rates.items():
                emit(
                    "decode_tokens_per_s",
                    round(rate, 1),
                    "tokens/s",
                    model="SmolLM2-135M-Instruct",
                    weights=name,
                    requests=requests,
                    compile=True,
                    vector_bits=bits,
                    **context,
                )
            emit(
                "speedup",
                round(rates[512] / rates[256], 3),
                "x",
                weights=name,
                requests=requests,
                of="decode_tokens_per_s",
                **context,
            )


def main() -> None:
    if (benchmark := kernel_benchmark(__doc__, "the kernels")) is None:
        return
    arguments, context = benchmark
    if cpu_kernels.use_vector_bits(512) != 512:
        emit("skipped", 0, "", reason="this CPU has no AVX-512 with VNNI: the kernels run their AVX2 versions only")
        return
    kernels(arguments.repeats, context)
    on_smollm2(arguments.no_model, "SmolLM2 engine", lambda checkpoint: model(checkpoint, arguments.repeats, context))
    cpu_kernels.use_vector_bits(512)


if __name__ == "__main__":
    main()
