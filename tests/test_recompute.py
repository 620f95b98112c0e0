"""Activation recomputation (Korthikanti et al. 2022): selective recomputation of the attention core and full
recomputation of whole blocks train the model of storing everything, and selective keeps the activations of
storing everything less the attention core's s²-sized ones."""

import pytest
import torch
import yaml
from helpers import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.config import build
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.model.transformer import Attention
from llmkit.train.config import TrainConfig


def loss_and_gradients(mode: str, monkeypatch, **inputs) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The loss, every parameter's gradient and the attention cores run (forward and recomputed) of one step
    of the same model under ``mode``. Dropout is on: a recomputed core must draw the masks it drew first."""
    calls = []
    attend = Attention._attend
    monkeypatch.setattr(Attention, "_attend", lambda self, *args: calls.append(1) or attend(self, *args))
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_head=4, n_kv_head=2, dropout=0.1, context_length=24))
    model.activation_checkpointing = mode
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss = model(ids, targets=ids.roll(-1, dims=1), **inputs).mean()
    loss.backward()
    return loss.detach(), [parameter.grad for parameter in model.parameters()], len(calls)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
def test_recomputation_gives_the_loss_and_gradients_of_storing_everything(monkeypatch, packed):
    inputs = {"document_ids": torch.tensor([[0] * 10 + [1] * 14, [0] * 24])} if packed else {}
    stored, stored_gradients, stored_calls = loss_and_gradients("none", monkeypatch, **inputs)
    spans = 3 if packed else 1  # the packed rows' cores run document by document: 2 in the first row, 1 in the second
    assert stored_calls == 2 * spans  # 2 layers
    for mode in ("selective", "full"):
        loss, gradients, calls = loss_and_gradients(mode, monkeypatch, **inputs)
        assert calls == 2 * stored_calls  # every core once more in the backward pass
        torch.testing.assert_close(loss, stored, rtol=1e-6, atol=0)
        for got, expected in zip(gradients, stored_gradients):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_recomputation_is_for_training_only(monkeypatch):
    calls = []
    attend = Attention._attend
    monkeypatch.setattr(Attention, "_attend", lambda self, *args: calls.append(1) or attend(self, *args))
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 61, (1, 8))
    reference = model(ids)
    model.activation_checkpointing = "selective"
    cache = model.new_cache(1)
    torch.testing.assert_close(model(ids[:, :5], cache=cache)[:, -1], reference[:, 4])
    torch.testing.assert_close(model(ids[:, 5:6], cache=cache)[:, -1], reference[:, 5])
    assert len(calls) == 3 * model.config.n_layer
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        model.activation_checkpointing = "some"


def saved_bytes(model: Transformer, ids: torch.Tensor) -> int:
    """Bytes the autograd graph of one forward keeps for the backward pass, each storage counted once and the
    weights not at all: every tensor an operation saves passes through the pack hook (a checkpoint's own
    inputs too; what runs inside a checkpoint is saved by its own hooks, and recomputed instead)."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, targets=ids)
    return sum(storages.values())


def test_selective_recomputation_keeps_everything_but_the_attention_scores():
    """A 512-token sequence through the math attention path (the path without a fused kernel, which
    materialises the scores): storing everything keeps, per layer and head, three float32 s x s tensors,
    the softmax output, dropout's scaled keep-mask and the dropped-out probabilities (Korthikanti et al.'s
    5·a·s²·b bytes are the same three in 16 bits with a 1-byte mask); selective recomputation keeps all the
    rest, full recomputation only each block's input and the head's."""
    s, heads, layers = 512, 2, 2
    config = tiny_config(context_length=s, n_head=heads, n_layer=layers, dropout=0.1)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (1, s))
    saved = {}
    with sdpa_kernel(SDPBackend.MATH):
        for mode in ("none", "selective", "full"):
            model.activation_checkpointing = mode
            saved[mode] = saved_bytes(model, ids)
    scores = layers * heads * s * s * 3 * 4
    assert saved["none"] - saved["selective"] == pytest.approx(scores, rel=0.01)
    assert saved["full"] < saved["selective"] / 5
    # The rest is O(s·h): in Korthikanti et al.'s closed form selective keeps 34 / (34 + 5·a·s/h) of storing
    # everything, 0.096 here; this model (float32, a SwiGLU MLP, RMSNorm, RoPE, 4-byte dropout masks) 0.12.
    korthikanti = 34 / (34 + 5 * heads * s / config.n_embd)
    assert saved["selective"] / saved["none"] == pytest.approx(korthikanti, rel=0.4)


def test_the_field_is_a_choice_and_reads_the_booleans_of_older_configs():
    assert TrainConfig().activation_checkpointing == "none"
    for old, new in (("true", "full"), ("false", "none"), ("selective", "selective")):
        text = f"activation_checkpointing: {old}"
        assert build(TrainConfig, yaml.safe_load(text)).activation_checkpointing == new
    with pytest.raises(ConfigError, match="'activation_checkpointing' = 'some'.*none, selective, full"):
        build(TrainConfig, {"activation_checkpointing": "some"})
    with pytest.raises(ConfigError, match="'activation_checkpointing' = 'some'.*none, selective, full"):
        TrainConfig(activation_checkpointing="some")
