"""Up to how many activation rows llmkit's tiled kernels beat untiling the weight for PyTorch's product.

A layer in the engine's decoding layout (``cpu_kernels.TiledLinear``) holds its bfloat16 or float32 weight in the
kernels' tiles. Up to ``cpu_kernels.kernel_rows(dtype)`` rows multiply with the kernel; more untile the weight
(``cpu_kernels.untiled``) and multiply with PyTorch (oneDNN for bfloat16, MKL for float32). This script times both
for the products of one SmolLM2-135M step (30 blocks of q/k/v, output and feed-forward projections and the 49,152-row
head; random weights: speed does not depend on them), in one process, round-robin, medians, at 16 to 1024 rows:
``kernel_ms``, ``pytorch_ms`` and ``speedup`` (PyTorch's ms / the kernel's), with the limit in use. bfloat16 rows take
AVX-512 BF16's pair products where the CPU has them (``cpu_kernels.bf16_pair_products``). About 3 minutes on 2 cores.

Usage: python benchmarks/kernel_rows.py [--threads 2] [--repeats 5] [--rows 16,32,64,128,256,512,1024]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved_rates, kernel_benchmark  # noqa: E402
from cpu_kernel_widths import BLOCK_SHAPES, BLOCKS, VOCABULARY, WIDTH  # noqa: E402

from llmkit.infer import cpu_kernels  # noqa: E402
from llmkit.infer.cpu_kernels import TiledLinear  # noqa: E402


def step_layers(dtype: torch.dtype) -> list[TiledLinear]:
    return [
        TiledLinear(nn.Linear(inputs, outputs, bias=False).to(dtype))
        for inputs, outputs in BLOCK_SHAPES * BLOCKS + [(WIDTH, VOCABULARY)]
    ]


def seconds_of(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    benchmark = kernel_benchmark(
        __doc__,
        repeats=5,
        more_arguments=lambda parser: parser.add_argument("--rows", default="16,32,64,128,256,512,1024"),
    )
    if benchmark is None:
        return
    arguments, context = benchmark
    context |= {"vector_bits": cpu_kernels.vector_bits(), "bf16_pair_products": cpu_kernels.bf16_pair_products()}
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            layers, kind = step_layers(dtype), TiledLinear.KINDS[dtype]
            limit = cpu_kernels.kernel_rows(dtype)
            for rows in (int(count) for count in arguments.rows.split(",")):
                inputs = {width: torch.randn(rows, width, dtype=dtype) for width, _ in BLOCK_SHAPES}

                def kernel():
                    for layer in layers:
                        cpu_kernels.gemv(kind, inputs[layer.in_features], layer.weight, out_features=layer.out_features)

                def pytorch():
                    for layer in layers:
                        cpu_kernels.dense(
                            inputs[layer.in_features], cpu_kernels.untiled(layer.weight, layer.out_features)
                        )

                kernel(), pytorch()  # warm-up
                rates = interleaved_rates(
                    {"kernel": lambda: 1 / seconds_of(kernel), "pytorch": lambda: 1 / seconds_of(pytorch)},
                    arguments.repeats,
                )
                shared = {"weights": str(dtype).removeprefix("torch."), "rows": rows, "kernel_rows": limit, **context}
                for name, rate in rates.items():
                    emit(f"{name}_ms", round(1e3 / rate, 1), "ms", **shared)
                emit(
                    "speedup", round(rates["kernel"] / rates["pytorch"], 3), "x", of="pytorch_ms / kernel_ms", **shared
                )


if __name__ == "__main__":
    main()
