"""Weight-only int8 quantization for decoding.

One-token decoding reads every weight once per step and does little arithmetic with it, so its speed is
the memory bandwidth divided by the weights' bytes (float32 GPT-2-124M: 0.5 GB a token). Storing each
linear layer's weight as int8 with one scale per output channel (absmax, symmetric; the "weight-only"
scheme of LLM.int8()'s baseline and of gpt-fast) reads a quarter of float32's bytes; activations stay in
16-bit floating point. Per-channel absmax keeps the relative error of each output row near 1/255 of its
largest weight, which leaves greedy decoding of a trained model almost unchanged (tests check the logits).

On CPU the matrix-vector products of decoding use PyTorch's fused int8 x 16-bit kernel
(``torch._weight_int8pack_mm``); it needs the input width to be a multiple of 16, and it is slower than a
16-bit matrix product once many rows come at once, so prompt processing (and any other shape or device)
dequantizes the weight to the activations' dtype and multiplies as usual.
"""

from __future__ import annotations

import typing
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Int8Linear", "QUANTIZATIONS", "Quantization", "quantize_field", "quantize_int8"]

Quantization = typing.Literal["none", "int8"]
QUANTIZATIONS = typing.get_args(Quantization)

FUSED_KERNEL_MAX_ROWS = 8  # beyond this the fused kernel loses to dequantize + 16-bit matmul (measured on AVX-512)
FUSED_KERNEL_WIDTH_MULTIPLE = 16


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (out, in) and one scale per output channel."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if (x.device.type == "cpu" and rows.shape[0] <= FUSED_KERNEL_MAX_ROWS
                and self.in_features % FUSED_KERNEL_WIDTH_MULTIPLE == 0):
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer multiplies by, in float32."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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


def quantize_field():
    """The ``quantize`` option of every command that loads a model for inference."""
    return field(default="none", metadata={"help": "int8: int8 weights + bfloat16 activations, about 2x faster "
                                                   "one-token decoding on CPU (none: the weights as stored)"})
