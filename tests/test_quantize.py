"""Weight-only int8 and int4 quantization against hand-computed references: per-channel absmax scales and
Q4_1 groups; the CPU kernels (llmkit's, which also quantize the activations to int8 per 4 inputs, or
PyTorch's) and the dequantizing path agree with x @ (q * s)^T; a quantized model's logits stay close to
the float model's, and the engine decodes a quantized model like a naive full-forward loop."""

import copy

import numpy as np
import pytest
import torch
from helpers import char_tokenizer, naive_greedy, reference_activations, tiny_config
from torch import nn

from llmkit.infer import Engine, GenerationConfig, cpu_kernels
from llmkit.infer.quantize import FUSED_KERNEL_MAX_ROWS, Int4Linear, Int8Linear, quantize_int4, quantize_int8
from llmkit.model import Transformer


def reference_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization worked out directly: s = max|w| / 127, q = round(w / s)."""
    scales = torch.tensor([max(abs(value) for value in row) / 127 for row in weight.tolist()])
    return torch.round(weight / scales[:, None]), scales


@pytest.mark.parametrize("in_features", [64, 40])  # 64: the kernels' widths; 40: only the dequantizing path
@pytest.mark.parametrize("rows", [1, FUSED_KERNEL_MAX_ROWS, 3 * FUSED_KERNEL_MAX_ROWS])
def test_int8_linear_equals_the_dequantized_product(in_features, rows):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24, bias=True)
    layer = Int8Linear(linear, torch.bfloat16)
    quantized, scales = reference_int8(linear.weight.detach())
    assert torch.equal(layer.codes().float(), quantized)
    assert torch.allclose(layer.scales.float(), scales, rtol=1e-2)
    x = torch.randn(rows, in_features).bfloat16().float()
    if layer.tiled and rows <= cpu_kernels.MAX_ROWS:
        x = reference_activations(x)
    expected = x @ (quantized * layer.scales.float()[:, None]).T + linear.bias.detach()
    got = layer(x.bfloat16()).float()
    assert got.shape == (rows, 24)
    assert torch.allclose(got, expected, atol=0.03, rtol=0.02)


def test_quantization_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16, bias=False)
    layer = Int8Linear(linear, torch.float32)
    error = (layer.dequantized() - linear.weight.detach()).abs()
    assert bool((error <= layer.scales[:, None] / 2 + 1e-7).all())
    assert bool((layer.codes().abs().amax(dim=1) == 127).all())  # each row's largest weight uses the full range


def test_leading_dimensions_are_kept():
    layer = Int8Linear(nn.Linear(16, 8), torch.bfloat16)
    assert layer(torch.randn(2, 3, 16).bfloat16()).shape == (2, 3, 8)


def test_quantized_model_keeps_its_logits_and_unties_the_head():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_embd=32, tie_embeddings=True)).eval()
    quantized = quantize_int8(copy.deepcopy(model))
    assert all(type(module) is not nn.Linear for module in quantized.modules())
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.token_embedding, nn.Embedding)
    assert quantized.token_embedding.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, logits = model(ids), quantized(ids).float()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_engine_decodes_a_quantized_model_like_a_full_forward_loop(tmp_path):
    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    engine = Engine(
        Transformer(tiny_config(vocab_size=tokenizer.vocab_size, n_embd=32, context_length=32)),
        tokenizer,
        decoding_layout=True,
        quantize="int8",
    )
    prompt = tokenizer.encode("hello world")
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_at_end_of_text=False)
    assert engine.generate_ids([prompt], config)[0].token_ids == naive_greedy(engine.model, prompt, 10)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantize=.int2."):
        Engine(Transformer(tiny_config()), None, quantize="int2")  # type: ignore[arg-type]


def reference_int4(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Asymmetric 4-bit groups worked out directly, GGUF Q4_1's rule: per group of ``group`` weights of a
    row, d = (max - min) / 15 and m = min, both as float16, q = round((w - m) / d), w' = q * d + m."""
    rows = []
    for row in weight.tolist():
        dequantized = []
        for start in range(0, len(row), group):
            block = row[start : start + group]
            lowest, high = min(block), max(block)
            low, step = float(np.float16(lowest)), float(np.float16((high - lowest) / 15)) if high > lowest else 1.0
            dequantized += [min(max(round((value - low) / step), 0), 15) * step + low for value in block]
        rows.append(dequantized)
    return torch.tensor(rows)


@pytest.mark.parametrize("out_features", [48, 20])  # 20: padded to the kernel's 16-row tiles
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_linear_equals_the_dequantized_product(out_features, rows):
    torch.manual_seed(0)
    linear = nn.Linear(64, out_features, bias=True)
    reference = reference_int4(linear.weight.detach())
    layer = Int4Linear(linear, torch.float32)
    assert torch.allclose(layer.dequantized(), reference, atol=1e-5)
    error = (reference - linear.weight.detach()).abs().max()
    assert error <= (linear.weight.abs().max() * 2) / 15 / 2 + 1e-6  # half a step of the widest group
    x = torch.randn(rows, 64)
    expected = x @ reference.T + linear.bias.detach()
    if layer.layout == "tiles" and rows <= cpu_kernels.MAX_ROWS:
        # code · x' per group times its scale, plus the group's minimum times the plain sum of x
        quantized = reference_activations(x)
        minimums = linear.weight.detach().view(out_features, -1, 32).amin(-1).half().float()
        group_sums = (x - quantized).view(rows, -1, 32).sum(-1)
        expected = quantized @ reference.T + group_sums @ minimums.T + linear.bias.detach()
    assert torch.allclose(layer(x), expected, atol=1e-4)
    bf16 = Int4Linear(linear, torch.bfloat16)(x.bfloat16()).float()
    assert torch.allclose(bf16, expected, atol=0.05, rtol=0.02)
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, out_features)


def test_int4_model_keeps_its_logits_with_an_int8_head():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_embd=64, n_head=4, tie_embeddings=True)).eval()
    quantized = quantize_int4(copy.deepcopy(model))
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.blocks[0].feed_forward.up, Int4Linear)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, logits = model(ids), quantized(ids).float()
    # 4-bit groups: ~1/30 of each group's range per weight; the stated tolerance is 10 % of the largest logit.
    assert (logits - reference).abs().max() < 0.10 * reference.abs().max()
