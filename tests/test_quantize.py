"""Weight-only int8 quantization against a hand-computed reference: per-channel absmax scales, the fused
CPU kernel and the dequantizing path agree with x @ (q * s)^T, a quantized model's logits stay close to
the float model's, and the engine decodes a quantized model like a naive full-forward loop."""

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import naive_greedy, tiny_config
from llmkit.infer import Engine, GenerationConfig
from llmkit.infer.quantize import FUSED_KERNEL_MAX_ROWS, Int8Linear, quantize_int8
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer


def reference_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization worked out directly: s = max|w| / 127, q = round(w / s)."""
    scales = torch.tensor([max(abs(value) for value in row) / 127 for row in weight.tolist()])
    return torch.round(weight / scales[:, None]), scales


@pytest.mark.parametrize("in_features", [64, 40])  # 64: the fused kernel's width; 40: only the dequantizing path
@pytest.mark.parametrize("rows", [1, FUSED_KERNEL_MAX_ROWS, 3 * FUSED_KERNEL_MAX_ROWS])
def test_int8_linear_equals_the_dequantized_product(in_features, rows):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24, bias=True)
    layer = Int8Linear(linear, torch.bfloat16)
    quantized, scales = reference_int8(linear.weight.detach())
    assert torch.equal(layer.weight.float(), quantized)
    assert torch.allclose(layer.scales.float(), scales, rtol=1e-2)
    x = torch.randn(rows, in_features)
    expected = x.bfloat16().float() @ (quantized * layer.scales.float()[:, None]).T + linear.bias.detach()
    got = layer(x.bfloat16()).float()
    assert got.shape == (rows, 24)
    assert torch.allclose(got, expected, atol=0.03, rtol=0.02)


def test_quantization_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16, bias=False)
    layer = Int8Linear(linear, torch.float32)
    error = (layer.dequantized() - linear.weight.detach()).abs()
    assert bool((error <= layer.scales[:, None] / 2 + 1e-7).all())
    assert bool((layer.weight.abs().amax(dim=1) == 127).all())  # each row's largest weight uses the full range


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


def test_engine_decodes_a_quantized_model_like_a_full_forward_loop():
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "corpus.txt").write_text("abcdefghijklmnopqrstuvwxyz .,\n" * 4)
        train_tokenizer(TokenizerConfig(source=str(Path(directory) / "corpus.txt"), out=str(Path(directory) / "tok"),
                                        kind="char", vocab_size=48, held_out_fraction=0))
        tokenizer = Tokenizer.load(Path(directory) / "tok")
    torch.manual_seed(0)
    engine = Engine(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, n_embd=32, context_length=32)), tokenizer,
                    decoding_layout=True, quantize="int8")
    prompt = tokenizer.encode("hello world")
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_at_end_of_text=False)
    assert engine.generate_ids([prompt], config)[0].token_ids == naive_greedy(engine.model, prompt, 10)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantize='int4'"):
        Engine(Transformer(tiny_config()), None, quantize="int4")  # type: ignore[arg-type]
