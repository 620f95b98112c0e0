"""Weight-only int8 and int4 quantization for decoding.

One-token decoding reads every weight once per step and does little arithmetic with it, so its speed is
the memory bandwidth divided by the weights' bytes (float32 GPT-2-124M: 0.5 GB a token). Storing each
linear layer's weight as int8 with one scale per output channel (absmax, symmetric; the "weight-only"
scheme of LLM.int8()'s baseline and of gpt-fast) reads a quarter of float32's bytes; activations stay in
16-bit floating point. Per-channel absmax keeps the relative error of each output row near 1/255 of its
largest weight, which leaves greedy decoding of a trained model almost unchanged (tests check the logits).

On x86 CPUs with AVX2 the matrix-vector products of decoding (up to 16 rows) run llmkit's kernels
(:mod:`llmkit.infer.cpu_kernels`): the weights tiled, the activations quantized to int8 (one scale per 4
inputs). Elsewhere on CPU they use PyTorch's fused int8 x 16-bit kernel (``torch._weight_int8pack_mm``,
input width a multiple of 16, up to 8 rows). Prompt processing (and any other shape or device) dequantizes
the weight to the activations' dtype and multiplies as usual.

int4 (:class:`Int4Linear`) stores two weights a byte with a scale and an offset per group of 32 weights
along the input (asymmetric min/max: w = q * scale + min, q in 0..15, scale and min rounded to float16),
GGUF's Q4_1 block: a model imported from a Q4_1 file gets back its own 4-bit weights. On x86 CPUs it decodes
with llmkit's kernels and dequantizes for prompts; on other CPUs it multiplies with PyTorch's packed int4 kernel
(``torch.ops.aten._weight_int4pack_mm_for_cpu``) at every batch size; elsewhere (untested: no GPU here) it
unpacks the codes and multiplies in 16-bit. The output head gets int8 in that mode (as llama.cpp's Q4
files keep ``token_embd``/``output`` at Q8_0): the head decides every token, and its 4-bit copy costs
agreement for little speed.
"""

from __future__ import annotations

import typing
from dataclasses import field

import torch
from torch import nn

from llmkit.infer import cpu_kernels

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QUANTIZATIONS",
    "Quantization",
    "quantize",
    "quantize_field",
    "quantize_int4",
    "quantize_int8",
]

Quantization = typing.Literal["none", "int8", "int4"]
QUANTIZATIONS = typing.get_args(Quantization)

FUSED_KERNEL_MAX_ROWS = 8  # beyond this the fused kernel loses to dequantize + 16-bit matmul (measured on AVX-512)
FUSED_KERNEL_WIDTH_MULTIPLE = 16
INT4_GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1 block; the CPU kernel takes 32, 64, 128 or 256
INT4_ROW_MULTIPLE = 16  # the CPU kernel packs output rows in tiles of 16: others are padded with zero rows


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (out, in) and one scale per output channel. On x86 CPUs with llmkit's
    kernels (:mod:`llmkit.infer.cpu_kernels`) the codes are stored in the kernels' tiles."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.tiled = cpu_kernels.usable(self.in_features, self.out_features, cpu_kernels.GROUP, weight.device)
        self.register_buffer("weight", cpu_kernels.tile(codes, cpu_kernels.GROUP) if self.tiled else codes.contiguous())
        self.register_buffer("scales", scales if self.tiled else scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def codes(self) -> torch.Tensor:
        """The int8 weight, (out, in)."""
        return cpu_kernels.untile(self.weight) if self.tiled else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.tiled and rows.shape[0] <= cpu_kernels.MAX_ROWS:
            out = cpu_kernels.gemv("int8", rows, self.weight, self.scales, out_features=self.out_features)
        elif (
            not self.tiled
            and x.device.type == "cpu"
            and rows.shape[0] <= FUSED_KERNEL_MAX_ROWS
            and self.in_features % FUSED_KERNEL_WIDTH_MULTIPLE == 0
        ):
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        else:
            out = cpu_kernels.dense(rows, self.dequantized(cpu_kernels.product_dtype(rows)))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def streamed(self) -> tuple[str, ...]:
        """The buffers the decoding layout lays out in one region (:func:`~llmkit.infer.cpu_kernels.one_stream`)."""
        return ("weight", "scales") if self.tiled else ()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer multiplies by, (out, in) in ``dtype`` (float32 or bfloat16: the product in float32,
        rounded)."""
        if self.tiled:
            return cpu_kernels.dequantize("int8", self.weight, self.scales, out_features=self.out_features, dtype=dtype)
        return (self.codes().float() * self.scales.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights: per group of ``group_size`` inputs of an output row, a scale and
    the group's minimum (w = q * scale + minimum, q in 0..15, rounded to nearest). Stored in one of three
    layouts (``layout``): ``"tiles"`` for llmkit's x86 kernels, ``"int4pack"`` for PyTorch's CPU kernel
    elsewhere on CPU, ``"codes"`` (one code a byte, unpacked to 16-bit for each product) on other devices."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        if linear.in_features % group_size:
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {linear.in_features}")
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        weight = linear.weight.detach().float()
        rows = self.stored_rows = -(-self.out_features // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
        weight = torch.cat([weight, weight.new_zeros(rows - self.out_features, self.in_features)])
        groups = weight.view(rows, -1, group_size)
        minimum, maximum = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = torch.where(maximum > minimum, (maximum - minimum) / 15, torch.ones_like(maximum))
        # Scales and minimums are rounded to float16 (Q4_1's own precision, and what the kernels' tiles store) before
        # the codes are rounded against them. A range below float16's smallest step gets that step (codes all 0).
        scales, minimum = scales.half().float().clamp(min=2**-24), minimum.half().float()
        codes = (
            torch.round((groups - minimum[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).view(rows, -1)
        )
        device = linear.weight.device
        if group_size == cpu_kernels.GROUP and cpu_kernels.usable(self.in_features, rows, group_size, device):
            self.layout = "tiles"
            self.register_buffer("weight", cpu_kernels.tile_int4(codes))
            self.register_buffer("scales", cpu_kernels.tile_groups(scales))
            self.register_buffer("minimums", cpu_kernels.tile_groups(minimum))
        elif device.type == "cpu":
            self.layout = "int4pack"
            # (rows, in / 2) uint8, and (groups, rows, 2) [scale, zero] where the kernel computes
            # (q - 8) * scale + zero.
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            self.register_buffer(
                "scales_and_zeros", torch.stack([scales.t(), (minimum + 8 * scales).t()], dim=-1).contiguous().to(dtype)
            )
        else:
            self.layout = "codes"
            self.register_buffer("weight", codes.to(torch.uint8).to(device))
            self.register_buffer("scales_and_zeros", torch.stack([scales, minimum], dim=-1).to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.layout == "tiles" and rows.shape[0] <= cpu_kernels.MAX_ROWS:
            out = cpu_kernels.gemv("int4", rows, self.weight, self.scales, self.minimums, out_features=self.stored_rows)
            out = out[:, : self.out_features]
        elif self.layout == "int4pack":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.contiguous(), self.weight, self.group_size, self.scales_and_zeros.to(x.dtype)
            )[:, : self.out_features]
        else:
            out = cpu_kernels.dense(rows, self.dequantized(cpu_kernels.product_dtype(rows)))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def streamed(self) -> tuple[str, ...]:
        """The buffers the decoding layout lays out in one region (:func:`~llmkit.infer.cpu_kernels.one_stream`)."""
        return ("weight", "scales", "minimums") if self.layout == "tiles" else ()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer multiplies by, (out, in) in ``dtype`` (float32 or bfloat16: computed in float32,
        rounded)."""
        if self.layout == "int4pack":
            identity = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.weight.device)
            transposed = torch.ops.aten._weight_int4pack_mm_for_cpu(
                identity, self.weight, self.group_size, self.scales_and_zeros
            )
            return transposed.t()[: self.out_features].float().to(dtype)
        if self.layout == "tiles":
            weight = cpu_kernels.dequantize(
                "int4", self.weight, self.scales, self.minimums, out_features=self.stored_rows, dtype=dtype
            )
            return weight[: self.out_features]
        codes = self.weight
        scales, minimum = self.scales_and_zeros.float().unbind(-1)
        groups = codes.float().view(codes.shape[0], -1, self.group_size)
        weight = (groups * scales[..., None] + minimum[..., None]).view(codes.shape[0], -1)
        return weight[: self.out_features].to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, layout={self.layout}"
        )


def quantize_int8(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (the output head included; a head tied to the token
    embedding gets its own int8 copy, the embedding itself stays) by an :class:`Int8Linear`, in place,
    for inference only. The rest of the model and the activations move to ``dtype`` (default: bfloat16
    when the model is in float32, as the fused kernel is made for 16-bit activations; else its dtype)."""
    weight_dtype = next(model.parameters()).dtype
    dtype = dtype or (torch.bfloat16 if weight_dtype == torch.float32 else weight_dtype)
    model.to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child, dtype).to(child.weight.device))
    return model.eval()


def quantize_int4(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Like :func:`quantize_int8` with :class:`Int4Linear` layers, except the output head (int8) and any
    layer whose input width is not a multiple of the group size (int8 too)."""
    weight_dtype = next(model.parameters()).dtype
    dtype = dtype or (torch.bfloat16 if weight_dtype == torch.float32 else weight_dtype)
    head = getattr(model, "lm_head", None)
    model.to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                four_bit = child is not head and child.in_features % INT4_GROUP_SIZE == 0
                layer = Int4Linear(child, dtype) if four_bit else Int8Linear(child, dtype)
                setattr(parent, name, layer.to(child.weight.device))
    return model.eval()


def quantize(model: nn.Module, kind: Quantization) -> nn.Module:
    """Apply one of :data:`QUANTIZATIONS` in place ("none" leaves the model as it is)."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantize={kind!r}: must be one of {', '.join(QUANTIZATIONS)}")
    if kind == "int8":
        quantize_int8(model)
    elif kind == "int4":
        quantize_int4(model)
    return model


def quantize_field():
    """The ``quantize`` option of every command that loads a model for inference."""
    return field(
        default="none",
        metadata={
            "help": "int8 / int4: 8-bit / 4-bit weights + bfloat16 activations, "
            "faster decoding on CPU (none: the weights as stored)"
        },
    )
