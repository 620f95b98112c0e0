"""LoRA against hand computations: outputs unchanged at init, merged weights equal W + (alpha/r) B A and
compute the adapted model's logits, gradients reach the adapters alone, adapters round-trip through files."""

import json

import pytest
import torch
from helpers import tiny_config

from llmkit.errors import ConfigError, MismatchError
from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.model.lora import LoRAConfig, LoRALinear, apply_lora, load_adapters, lora_layers, merge_lora, save_adapters
from llmkit.train.optim import build_optimizer

ALL_TARGETS = ["qkv", "out", "up", "down", "lm_head"]


def base_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(tie_embeddings=False, **changes)).eval()


def adapted(config: LoRAConfig, seed: int = 1, **changes) -> Transformer:
    """A LoRA model whose B matrices are random (as after some training), so the adapters matter."""
    model = apply_lora(base_model(**changes), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))


def test_adapters_leave_the_outputs_unchanged_at_init():
    expected = base_model()(tokens())
    model = apply_lora(base_model(), LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    layers = lora_layers(model)
    # every projection of both blocks, and the head
    assert len(layers) == 2 * 4 + 1 and all(layer.lora_A.abs().sum() > 0 for layer in layers.values())
    assert torch.equal(model(tokens()), expected)


def test_merged_weights_equal_base_plus_scaled_product_and_compute_the_same_logits():
    config = LoRAConfig(rank=3, alpha=6.0, targets=ALL_TARGETS)
    model = adapted(config)
    adapted_logits = model(tokens())
    base = base_model()
    base_weights = {name: base.get_submodule(name).weight.detach().clone() for name in lora_layers(model)}
    layer = model.blocks[1].attention.qkv
    by_hand = base_weights["blocks.1.attention.qkv"] + (6.0 / 3) * layer.lora_B.detach() @ layer.lora_A.detach()
    products = {name: layer.lora_B.detach() @ layer.lora_A.detach() for name, layer in lora_layers(model).items()}
    merge_lora(model)
    assert not lora_layers(model) and type(model.blocks[1].attention.qkv) is torch.nn.Linear
    torch.testing.assert_close(model.blocks[1].attention.qkv.weight.detach(), by_hand)
    for name, product in products.items():
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), base_weights[name] + 2.0 * product)
    torch.testing.assert_close(model(tokens()), adapted_logits, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_an_adapted_layer_and_its_gradients_equal_the_written_out_formula():
    """y = x Wᵀ + b + (alpha/r) (x Aᵀ) Bᵀ, and the gradients of x, A and B, against autograd on that formula."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 20), rank=3, alpha=5.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 12, requires_grad=True)
    weights = torch.randn(2, 7, 20)
    ours = layer(x)
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    theirs = x @ layer.weight.detach().T + layer.bias.detach() + (5.0 / 3) * (x @ A.T) @ B.T
    torch.testing.assert_close(ours, theirs)
    gradients = torch.autograd.grad((ours * weights).sum(), [x, layer.lora_A, layer.lora_B])
    for mine, reference in zip(gradients, torch.autograd.grad((theirs * weights).sum(), [x, A, B])):
        torch.testing.assert_close(mine, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), theirs, atol=0.05, rtol=0.02)


def test_only_the_adapters_get_gradients_and_optimizer_slots():
    model = adapted(LoRAConfig(rank=2, targets=["qkv", "down"])).train()
    logits = model(tokens())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens().flatten()).backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert (parameter.grad is not None) == is_adapter, name
    optimized = {
        id(p)
        for group in build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), fused=False).param_groups
        for p in group["params"]
    }
    assert optimized == {id(layer.lora_A) for layer in lora_layers(model).values()} | {
        id(layer.lora_B) for layer in lora_layers(model).values()
    }


def test_adapters_round_trip_through_files_and_check_their_base(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, dropout=0.1, targets=["out", "up"])
    model = adapted(config)
    expected = model(tokens())
    base_folder = tmp_path / "base"
    base_folder.mkdir()
    base = base_model()
    write_model(base_folder, base.state_dict(), base.config, {})
    save_adapters(model, tmp_path / "adapters", base_checkpoint=base_folder)
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert saved["lora"] == {"rank": 2, "alpha": 4, "dropout": 0.1, "targets": ["out", "up"]}
    assert saved["base"]["model"]["n_embd"] == 16 and len(saved["base"]["sha256"]) == 64
    restored = load_adapters(base_model(), tmp_path / "adapters", base_checkpoint=base_folder).eval()
    assert isinstance(restored.blocks[0].attention.out, LoRALinear)
    torch.testing.assert_close(restored(tokens()), expected)

    with pytest.raises(MismatchError, match="n_layer"):
        load_adapters(base_model(n_layer=3), tmp_path / "adapters")
    other = tmp_path / "other"
    other.mkdir()
    changed = base_model()
    with torch.no_grad():
        changed.lm_head.weight.add_(1.0)
    write_model(other, changed.state_dict(), changed.config, {})
    with pytest.raises(MismatchError, match="sha256"):
        load_adapters(base_model(), tmp_path / "adapters", base_checkpoint=other)


def test_bad_targets_are_refused():
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(rank=2, targets=["q_proj"])
    torch.manual_seed(0)
    tied = Transformer(tiny_config(tie_embeddings=True))
    with pytest.raises(ConfigError, match="tie_embeddings"):
        apply_lora(tied, LoRAConfig(rank=2, targets=["lm_head"]))
    with pytest.raises(ConfigError, match="already"):
        apply_lora(apply_lora(base_model(), LoRAConfig(rank=2)), LoRAConfig(rank=2))
