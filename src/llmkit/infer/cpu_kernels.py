"""llmkit's kernels for decoding on x86 CPUs (``cpu_kernels.cpp``): matrix-vector products and the tiled weight layouts
they read, and attention of one new token over the KV cache (:func:`decode_attention`).

Batch-1 decoding streams every weight from memory once a token. PyTorch's CPU kernels for one activation row (oneDNN,
``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) read the weights of SmolLM2-135M at 5-13 GB/s on the 2-core
machine where llama.cpp reads 16 GB/s; the kernels here read tiles of 8 output rows as one sequential stream, and
multiply 8- and 4-bit weights by int8 activations (``benchmarks/real_model_speed.py``; the figures
are in docs/infer.md). The file is compiled at first use with PyTorch's C++ extension builder (a C++ compiler and
ninja, as ``torch.compile`` on CPU needs; about 20 s, then cached). Where it cannot be (another architecture, no
AVX2, no compiler, or ``LLMKIT_CPU_KERNELS=0``), :func:`available` is false and the layers keep PyTorch's kernels.

Layouts (``out`` a multiple of :data:`TILE`, ``in`` of the block width):

- 16-bit, float32 and int8: ``[out / 8][in / width][8][width]`` (width 8 for bfloat16 and float32, 32 for int8), a
  block of 8 rows at a time;
- int4: codes 0..15 in the int8 layout, two a byte (byte j of a row's group: code j low, code j + 16 high), and the
  group scales and minimums as ``[out / 8][in / 32][8]`` float16, as GGUF's Q4_1 blocks store them: 20 bytes a group
  of 32 weights (0.625 a weight), where float32 took 24. Decoding reads every byte once a token, so that is 1/6 less
  to read.

int8 and int4 kernels quantize the activations to int8 with one scale per 4 inputs (scale = max |x| / 127) and
multiply bytes as llama.cpp does; llama.cpp's one scale per 32 rounds away small activations beside SmolLM2's outlier
channels. On SmolLM2 the logits stay within 3.4 % (int4) and 7.2 % (int8) of the largest float32 logit
(tests/test_fast_decoding.py). The 16-bit kernel multiplies in float32, as oneDNN does, except that more than 4 rows
of bfloat16 activations (a bfloat16 model's) multiply in bfloat16 pairs on CPUs with AVX-512 BF16: the same exact
products, half the instructions (SmolLM2's products of 16 rows 1.8x). float32 weights have a kernel too
(MKL's products of a few rows read SmolLM2's float32 weights at 10-15 GB/s).

Each kernel has two versions, chosen at run time (:func:`vector_bits`): AVX2, one activation row at a time, and on
CPUs with AVX-512 and VNNI, up to 4 rows at a time, each pair of a tile's rows in one 512-bit register (``vpdpbusd``
for the byte products). Taking several rows at once widens each weight once for all of them: SmolLM2's products of
8 rows took 1.4-1.6x less time than AVX2's row by row (``benchmarks/cpu_kernel_widths.py``). One row of bfloat16 or
int8 products keeps the AVX2 version, as fast there; int4's gains 1.1x.
"""

from __future__ import annotations

import functools
import mmap
import os
import platform
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GROUP",
    "TILE",
    "TiledLinear",
    "available",
    "bf16_pair_products",
    "decode_attention",
    "dense",
    "dequantize",
    "gemv",
    "kernel_rows",
    "one_stream",
    "product_dtype",
    "tile",
    "tile_int4",
    "untile",
    "untiled",
]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
TILE = 8  # output rows per tile
GROUP = 32  # inputs per int8 block and per int4 group (one scale and one minimum)
ALIGNMENT = 64  # bytes at which one_stream starts each buffer: a cache line, an AVX-512 vector
HUGE_PAGE = 2 << 20  # x86-64's transparent huge pages
# Activation rows up to which the int8 and int4 kernels run, and the bfloat16 one without the pair products (each
# further row rereads the tile from L1): SmolLM2's products of 16 rows took 103 ms with the bfloat16 kernel and 287 ms
# with oneDNN. Prompts and larger batches untile or dequantize the weight and multiply with PyTorch, whose
# matrix-matrix kernels win there.
MAX_ROWS = 16
# float32 weights: untiling them for PyTorch's product (MKL) costs more than the kernel's products of many rows.
# SmolLM2's products of 30 blocks, 2 threads, kernel against untiled MKL: AVX-512 64 rows 78 / 146 ms, 256 rows
# 307 / 555, 512 rows 553 / 735 (577 / 752 in a later run), 1024 rows 1194 / 1559, 2048 rows 2968 / 3068 (the rows
# no longer fit the cache); AVX2 64 rows 131 / 184, 256 rows 471 / 412.
F32_MAX_ROWS = {512: 1024, 256: 64}  # by vector_bits()
# bfloat16 weights where the pair products run (:func:`bf16_pair_products`): SmolLM2's 121 products of a bfloat16 step,
# 2 threads, kernel against untiling + oneDNN's bfloat16 product: 17 rows 19 / 54 ms, 32 rows 30 / 67, 64 rows 60 /
# 113, 128 rows 107 / 155, 256 rows 231 / 234, 512 rows 483 / 445 (benchmarks/kernel_rows.py: 1.10x at 256 rows,
# 0.94x at 512).
BF16_DOT_MAX_ROWS = 256
CPU_BFLOAT16_MATMUL = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bfloat16 instructions (AVX-512 BF16, AMX)


@functools.cache
def available() -> bool:
    """Whether the kernels run here: an x86-64 CPU with AVX2 whose compiler built ``cpu_kernels.cpp`` (once per
    process; PyTorch caches the library on disk between processes)."""
    if os.environ.get("LLMKIT_CPU_KERNELS", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        return False
    from torch.utils.cpp_extension import load

    try:
        load(
            name="llmkit_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        warnings.warn(f"llmkit's CPU decoding kernels did not build, PyTorch's are used: {error}", stacklevel=2)
        return False
    register_shapes()
    return True


def vector_bits() -> int:
    """The kernels' vector width: 512 (AVX-512 with VNNI) or 256 (AVX2). Needs :func:`available`."""
    return torch.ops.llmkit_cpu.vector_bits()


def bf16_pair_products() -> bool:
    """Whether bfloat16 rows multiply bfloat16 tiles with AVX-512 BF16's pair products (``cpu_kernels.cpp``): the
    AVX-512 path on a CPU that has them. Needs :func:`available`."""
    return torch.ops.llmkit_cpu.bf16_pair_products()


def kernel_rows(dtype: torch.dtype) -> int:
    """The most activation rows the kernel multiplies a tiled ``dtype`` (bfloat16 or float32) weight by; more multiply
    with PyTorch on the untiled weight."""
    if dtype == torch.float32:
        return F32_MAX_ROWS[vector_bits()]
    return BF16_DOT_MAX_ROWS if bf16_pair_products() else MAX_ROWS


def use_vector_bits(bits: int) -> int:
    """Run the kernels' AVX2 (256) or AVX-512 (512) versions from now on, in this process; 512 falls back to 256 on a
    CPU without AVX-512 VNNI. Returns the width in use (to compare the two, as the tests and benchmarks do)."""
    return torch.ops.llmkit_cpu.use_vector_bits(bits)


def register_shapes() -> None:
    """Output shapes for ``torch.compile``, which traces the kernels without running them."""

    def rows_by_out(x, *weights_and_out):
        return x.new_empty(x.shape[0], weights_and_out[-1], dtype=torch.float32)

    for name in ("gemv_bf16", "gemv_f32", "gemv_int8", "gemv_int4"):
        torch.library.register_fake(f"llmkit_cpu::{name}", rows_by_out)
    torch.library.register_fake("llmkit_cpu::decode_attention", lambda q, keys, values, mask: q.new_empty(q.shape))

    torch.library.register_fake(
        "llmkit_cpu::untile_dense", lambda packed, out: packed.new_empty(out, packed.numel() // out)
    )
    torch.library.register_fake(
        "llmkit_cpu::dequantize_int8",
        lambda packed, scales, out, dtype: packed.new_empty(out, packed.numel() // out, dtype=dtype),
    )
    torch.library.register_fake(
        "llmkit_cpu::dequantize_int4",
        lambda packed, scales, minimums, out, dtype: packed.new_empty(out, 2 * packed.numel() // out, dtype=dtype),
    )


def usable(linear_in: int, linear_out: int, width: int, device: torch.device) -> bool:
    """Whether a layer of this shape, on this device, can be stored tiled for the kernels."""
    return device.type == "cpu" and linear_out % TILE == 0 and linear_in % width == 0 and available()


def tile(weight: torch.Tensor, width: int) -> torch.Tensor:
    """(out, in) -> ``[out / 8][in / width][8][width]``."""
    out, inputs = weight.shape
    return weight.reshape(out // TILE, TILE, inputs // width, width).permute(0, 2, 1, 3).contiguous()


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tile`: (out, in)."""
    blocks, columns, rows, width = tiles.shape
    return tiles.permute(0, 2, 1, 3).reshape(blocks * rows, columns * width)


def tile_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15 -> two a byte, tiled as int8 weights (byte j of a group: code j, code j + 16)."""
    out, inputs = codes.shape
    halves = codes.to(torch.uint8).reshape(out, inputs // GROUP, 2, GROUP // 2)
    return tile((halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out, inputs // 2), GROUP // 2)


def tile_groups(values: torch.Tensor) -> torch.Tensor:
    """Per-group values (out, in / 32) -> ``[out / 8][in / 32][8]`` float16."""
    out, groups = values.shape
    return values.half().reshape(out // TILE, TILE, groups).transpose(1, 2).contiguous()


def gemv(kind: str, rows: torch.Tensor, *weights: torch.Tensor, out_features: int) -> torch.Tensor:
    """``rows`` (n, in) times a tiled weight: ``kind`` "bf16" or "f32" (tiles), "int8" (tiles, scales (out,) float32)
    or "int4" (tiles, scales, minimums); (n, out) in the rows' dtype. The kernels take float32 rows, and the bfloat16
    kernel bfloat16 rows too (its pair products, ``cpu_kernels.cpp``)."""
    op = getattr(torch.ops.llmkit_cpu, f"gemv_{kind}")
    activations = rows if kind == "bf16" and rows.dtype == torch.bfloat16 else rows.float()
    return op(activations.contiguous(), *weights, out_features).to(rows.dtype)


def untiled(tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """:func:`untile` of bfloat16 or float32 tiles into a new row-major (out, in) tensor, in one C++ pass (PyTorch's
    copy of the permuted view ran at about 7 GB/s): what :func:`dense` multiplies prompts by."""
    return torch.ops.llmkit_cpu.untile_dense(tiles, out_features)


def dequantize(kind: str, *weights: torch.Tensor, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of tiled ``kind`` "int8" (tiles, scales (out,) float32) or "int4" (tiles, scales,
    minimums) layers in ``dtype`` (float32 or bfloat16), in one pass: what :func:`dense` multiplies prompts by."""
    return getattr(torch.ops.llmkit_cpu, f"dequantize_{kind}")(*weights, out_features, dtype)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one new token per row over cached keys and values (``cpu_kernels.cpp``): q (batch, kv_heads,
    group, dim), the query heads that share a key/value head as its rows; keys and values (batch, kv_heads, span, dim),
    views on the cache; ``mask`` boolean, broadcastable to (batch, 1, 1, span), or None. Softmax in float32, the
    result in q's dtype (float32 or bfloat16), shaped as q. The model's :attr:`Attention.decode_attention` hook."""
    return torch.ops.llmkit_cpu.decode_attention(q, keys, values, mask)


def product_dtype(rows: torch.Tensor) -> torch.dtype:
    """The dtype :func:`dense` multiplies ``rows`` in: theirs, but float32 for bfloat16 rows on a CPU without bfloat16
    instructions (there oneDNN's bfloat16 product of 512 rows by a 1536 x 576 weight took 111 ms, 1232 ms with a
    column-major weight, float32's 19 ms)."""
    if rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and not CPU_BFLOAT16_MATMUL:
        return torch.float32
    return rows.dtype


def dense(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``rows @ weight.T + bias`` with PyTorch, for the products the kernels leave (prompts, large batches), in the
    rows' dtype, multiplied in :func:`product_dtype`."""
    dtype = product_dtype(rows)
    return F.linear(rows.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(rows.dtype)


def huge_pages(nbytes: int) -> torch.Tensor:
    """``nbytes`` of memory (uint8) starting at a huge-page boundary, backed by transparent huge pages where Linux gives
    them. The hardware's prefetchers stop at every 4 KiB page and each page costs a TLB entry, so a stream of 4 KiB
    pages keeps stalling: SmolLM2's 121 bfloat16 products of one row read their weights at 32 GB/s from 4 KiB pages
    and 46 GB/s from 2 MiB ones (1.42x; float32 1.38x, 4 rows 1.16-1.35x). Elsewhere, plain memory."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private: a shared anonymous mapping is shared memory, whose huge pages follow another setting.
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched, so the first touch faults in huge pages
    except OSError:
        pass  # a kernel built without transparent huge pages refuses the advice: the mapping stays in small pages
    whole = torch.frombuffer(memory, dtype=torch.uint8)  # holds the mapping for as long as a view of it lives
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def one_stream(modules: list[nn.Module]) -> None:
    """Move the modules' kernel buffers (each one's ``streamed`` names: tiles, and the scales and minimums of int8 and
    int4 layers) into one region of memory, one after another in the order given (the order a forward reads them),
    each at a multiple of :data:`ALIGNMENT` bytes, in place: decoding then streams its weights from one region instead
    of a separate allocation per tensor, and a thread's stream runs on from one layer into the next. Compiled bfloat16
    SmolLM2 decoded 1.05x and 1.07x faster so (one process, round-robin, 9 rounds each, the same tokens), int8 1.05x
    and int4 1.01x. The region lies in huge pages (:func:`huge_pages`): compiled SmolLM2 at batch 1, against the same
    region in 4 KiB pages, one process, round-robin: bfloat16 1.13x, int8 1.10x, int4 1.05x, the same tokens."""
    buffers = [(module, name, getattr(module, name)) for module in modules for name in module.streamed]
    starts = [0]
    for _, _, tensor in buffers:
        starts.append(starts[-1] + -(-tensor.nbytes // ALIGNMENT) * ALIGNMENT)
    region = huge_pages(starts[-1])
    for (module, name, tensor), start in zip(buffers, starts):
        view = region[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        setattr(module, name, view.copy_(tensor))


class TiledLinear(nn.Module):
    """``nn.Linear`` with its bfloat16 or float32 weight tiled for the kernel, for decoding only (the engine's decoding
    layout; the weight is a buffer): up to :func:`kernel_rows` rows multiply with the kernel, more with PyTorch on the
    untiled weight. For float32 the kernel beat PyTorch's product (MKL, column-major weight) at every row count up to
    16: SmolLM2's products of one step, 2 threads, one row 23 against 35 ms, 4 rows 28 against 93, 16 rows 45 against
    94 (an AVX-512 machine; the 6 x 384 model of continuous_batching.py: 3.7 / 4.6 ms, 3.5 / 11.1, 7.1 / 18.7)."""

    KINDS = {torch.bfloat16: "bf16", torch.float32: "f32"}

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", tile(linear.weight.detach(), TILE))
        # the most activation rows the kernel takes; more multiply with PyTorch on the untiled weight (fixed here, for
        # the width in use: a compiled step reads it as a constant)
        self.kernel_rows = kernel_rows(self.weight.dtype)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return linear.weight.dtype in TiledLinear.KINDS and usable(
            linear.in_features, linear.out_features, TILE, linear.weight.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.kernel_rows:
            out = gemv(self.KINDS[self.weight.dtype], rows, self.weight, out_features=self.out_features)
            out = out if self.bias is None else out + self.bias
        else:
            out = dense(rows, untiled(self.weight, self.out_features), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def streamed(self) -> tuple[str, ...]:
        """The buffers :func:`one_stream` lays out."""
        return ("weight",)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
