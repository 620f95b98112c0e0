"""Every architectural variant of the one Transformer against what theory says it must do:
masks, relative positions, norm placements, Mixture-of-Experts routing, DeepNorm, closed-form sizes."""

import math

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.model import ModelConfig, Transformer
from llmkit.model.config import GATED_ACTIVATIONS, PRESETS, preset
from llmkit.model.moe import MixtureOfExperts
from llmkit.model.transformer import alibi_slopes, deepnorm_constants, sinusoidal_table

VOCAB = 61


def tiny(**changes) -> ModelConfig:
    values = dict(vocab_size=VOCAB, context_length=48, n_layer=2, n_head=4, n_embd=32)
    values.update(changes)
    return ModelConfig(**values)


def model_of(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**changes)).eval()


VARIANTS = [
    dict(position="alibi"),
    dict(position="sinusoidal", embedding_norm=True),
    dict(position="rope", qk_norm=True, activation="relu2", bias=False),
    dict(norm_placement="sandwich", norm="rmsnorm", activation="geglu"),
    dict(norm_placement="deepnorm", n_kv_head=1),
    dict(logit_softcap=5.0, tie_embeddings=False, zero_init_projections=True),
    dict(moe_experts=4, moe_top_k=2, moe_capacity_factor=4.0, position="rope"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_gives_the_same_logits_as_full_forward(variant):
    model = model_of(**variant)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        pieces = [model(ids[:, :7], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [dict(position="alibi"), dict(position="rope", n_kv_head=2), dict(position="learned"), dict(position="sinusoidal")],
)
def test_cached_rows_at_different_positions_decode_as_alone(variant):
    model = model_of(**variant)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        alone = model(ids)
        cache = model.new_cache(2, capacity=12)
        model(ids[:1, :5], cache=cache.rows(0, 1))  # row 0 holds 5 tokens, row 1 holds 3
        model(ids[1:, :3], cache=cache.rows(1, 2))
        two = model(torch.stack([ids[0, 5:7], ids[1, 3:5]]), cache=cache)
        one = model(torch.stack([ids[0, 7:8], ids[1, 5:6]]), cache=cache)
    torch.testing.assert_close(torch.cat([two[0], one[0]]), alone[0, 5:8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([two[1], one[1]]), alone[1, 3:6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_prefix_tokens_see_each_other_and_nothing_later(position):
    model = model_of(position=position)
    ids = torch.randint(0, VOCAB, (1, 12))
    prefix = torch.tensor([5])
    changed_late = ids.clone()
    changed_late[0, 8] = (ids[0, 8] + 1) % VOCAB  # after the prefix
    changed_prefix = ids.clone()
    changed_prefix[0, 4] = (ids[0, 4] + 1) % VOCAB  # last prefix token
    with torch.no_grad():
        base = model(ids, prefix_lengths=prefix)
        late = model(changed_late, prefix_lengths=prefix)
        early = model(changed_prefix, prefix_lengths=prefix)
        causal = model(changed_prefix)
        causal_base = model(ids)
    torch.testing.assert_close(late[:, :8], base[:, :8])  # nothing sees a later token...
    assert not torch.allclose(late[:, 8:], base[:, 8:])
    assert not torch.allclose(early[:, 0], base[:, 0])  # ...but prefix position 0 sees prefix position 4
    torch.testing.assert_close(causal[:, :4], causal_base[:, :4])  # which a causal mask forbids


def test_prefix_mask_per_row_and_zero_prefix_is_causal():
    model = model_of()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        mixed = model(ids, prefix_lengths=torch.tensor([0, 6]))
        torch.testing.assert_close(mixed[0], model(ids[:1])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[1], model(ids[1:], prefix_lengths=torch.tensor([6]))[0])


def shifted_logits(model: Transformer, ids: torch.Tensor, shift: int) -> torch.Tensor:
    """Logits with every absolute position moved by ``shift`` (the model's position lookup, offset)."""
    original = model._positions
    model._positions = lambda start, length: original(start, length) + shift
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        model._positions = original


@pytest.mark.parametrize(
    "position, invariant", [("rope", True), ("alibi", True), ("learned", False), ("sinusoidal", False)]
)
def test_relative_positions_ignore_a_shift_of_absolute_position(position, invariant):
    # RoPE's q.k depends on positions only through their difference (Su et al. 2021, eq. 16); ALiBi's
    # bias is a function of the distance; learned and sinusoidal embeddings are absolute.
    model = model_of(position=position)
    ids = torch.randint(0, VOCAB, (2, 16))
    same = torch.allclose(shifted_logits(model, ids, 0), shifted_logits(model, ids, 23), atol=1e-4)
    assert same == invariant


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2**-k for k in range(1, 9)]
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then the odd 8-head slopes 2^-1, 2^-3
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_sinusoidal_table_is_the_formula():
    table = sinusoidal_table(tiny(position="sinusoidal"), 10)
    position, dimension = 7, 6
    angle = position / 10000 ** (dimension / 32)
    assert table[position, dimension].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[position, dimension + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def block_outputs(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    handles = [
        block.register_forward_hook(lambda module, args, output: outputs.append(output)) for block in model.blocks
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return outputs


def test_post_ln_normalises_the_residual_stream_and_pre_ln_lets_it_grow():
    ids = torch.randint(0, VOCAB, (2, 16))
    deep = dict(n_layer=6, bias=False, init_std=0.2)
    for output in block_outputs(model_of(norm_placement="post", **deep), ids):
        torch.testing.assert_close(output.mean(-1), torch.zeros(output.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(output.var(-1, unbiased=False), torch.ones(output.shape[:2]), atol=1e-3, rtol=0)
    norms = [output.norm(dim=-1).mean().item() for output in block_outputs(model_of(norm_placement="pre", **deep), ids)]
    assert norms[-1] > norms[0] and norms[-1] > math.sqrt(32) * 0.2  # an unnormalised, growing stream


def test_zero_initialised_projections_make_every_block_the_identity():
    model = model_of(zero_init_projections=True, tie_embeddings=False)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        embedded = model.token_embedding(ids) + model.position_embedding(torch.arange(16))
        torch.testing.assert_close(model(ids), model.lm_head(model.final_norm(embedded)))


def test_logit_softcap_is_cap_times_tanh_of_the_raw_logits():
    capped = model_of(logit_softcap=0.5)
    raw = model_of()  # same seed: same weights
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(capped(ids), 0.5 * torch.tanh(raw(ids) / 0.5))
        assert capped(ids).abs().max() < 0.5


def test_deepnorm_scales_residual_and_initialisation():
    alpha, beta = deepnorm_constants(6)
    assert alpha == pytest.approx(12**0.25) and beta == pytest.approx(48**-0.25)
    config = ModelConfig(vocab_size=97, n_layer=6, n_embd=256, n_head=4, norm_placement="deepnorm", init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(config)
    block = model.blocks[3]
    assert block.residual_scale == pytest.approx(alpha)
    q_and_k, values = block.attention.qkv.weight.split([512, 256])
    assert q_and_k.std().item() == pytest.approx(0.02, rel=0.05)
    for weight in (values, block.attention.out.weight, block.feed_forward.up.weight, block.feed_forward.down.weight):
        assert weight.std().item() == pytest.approx(0.02 * beta, rel=0.05)


def naive_mixture(layer: MixtureOfExperts, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalised weights, weighted sum of expert outputs."""
    rows = []
    for token in tokens:
        probabilities = torch.softmax(layer.router(token).float(), dim=-1)
        weights, chosen = probabilities.topk(layer.top_k)
        weights = weights / weights.sum() if layer.top_k > 1 else weights
        rows.append(sum(weight * layer.experts[int(index)](token) for weight, index in zip(weights, chosen)))
    return torch.stack(rows)


def test_mixture_of_experts_routes_each_token_to_k_experts():
    model = model_of(moe_experts=4, moe_top_k=2, moe_capacity_factor=4.0)
    layer = model.blocks[0].feed_forward
    tokens = torch.randn(24, 32)
    seen = []
    handles = [
        expert.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
        for expert in layer.experts
    ]
    with torch.no_grad():
        output = layer(tokens)
    for handle in handles:
        handle.remove()
    assert sum(seen) == 2 * 24  # every token, twice
    torch.testing.assert_close(output, naive_mixture(layer, tokens), atol=1e-5, rtol=1e-5)
    assert layer.utilisation.sum().item() == pytest.approx(1.0)


def test_expert_capacity_drops_overflow_tokens():
    layer = MixtureOfExperts(8, 2, 1, capacity_factor=0.5, make_expert=lambda: torch.nn.Linear(8, 8))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every positive-sum token prefers expert 0
        tokens = torch.rand(10, 8)  # all positive: all choose expert 0
        output = layer(tokens)
    capacity = math.ceil(0.5 * 10 * 1 / 2)
    served = (output.abs().sum(dim=-1) > 0).sum().item()
    assert served == capacity  # the first three tokens; the others pass through the residual only
    assert layer.utilisation.tolist() == pytest.approx([capacity / 10, 0.0])


def test_load_balancing_loss_is_one_for_uniform_routing_and_grows_with_collapse():
    layer = MixtureOfExperts(8, 4, 1, capacity_factor=10.0, make_expert=lambda: torch.nn.Linear(8, 8))
    tokens = torch.randn(64, 8)
    with torch.no_grad():
        layer.router.weight.zero_()  # every probability 1/4
        layer(tokens)
        uniform = layer.aux_loss.item()
        layer.router.weight.normal_()
        layer(tokens)
        random_routing = layer.aux_loss.item()
        layer.router.weight.zero_()
        layer.router.weight[2] = 50.0
        layer(tokens.abs())  # positive tokens: expert 2's logit is far above the others
        collapsed = layer.aux_loss.item()
    assert uniform == pytest.approx(1.0)
    assert uniform <= random_routing < collapsed
    assert collapsed == pytest.approx(4.0, rel=0.05)


def test_moe_aux_loss_reaches_the_model_and_trains_the_router():
    model = model_of(moe_experts=4, moe_top_k=1, moe_aux_loss_weight=0.5).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    logits = model(ids)
    layers = [block.feed_forward for block in model.blocks]
    assert model.aux_loss.item() == pytest.approx(0.5 * sum(layer.aux_loss.item() for layer in layers))
    assert model.expert_utilisation.shape == (2, 4)
    (logits.mean() + model.aux_loss).backward()
    assert model.blocks[0].feed_forward.router.weight.grad.abs().sum() > 0
    assert model_of()(ids).shape == logits.shape and model_of().aux_loss.item() == 0.0


def test_moe_flops_count_active_experts_only():
    dense = Transformer(tiny(ffn_hidden=64))
    sparse = Transformer(tiny(ffn_hidden=64, moe_experts=4, moe_top_k=1))
    router = 2 * 32 * 4  # two layers of a 32 -> 4 router
    assert sparse.flops_per_token() - dense.flops_per_token() == 6 * router
    assert sparse.num_parameters() - dense.num_parameters() == router + 2 * 3 * (32 * 64 + 64 + 64 * 32 + 32)


def closed_form_parameters(c: ModelConfig) -> int:
    """The parameter count worked out from the config alone."""
    d, heads, kv_heads, head_dim, hidden = c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    qkv = (heads + 2 * kv_heads) * head_dim
    attention = d * qkv + d * d + (qkv + d if c.bias else 0) + (2 * head_dim if c.qk_norm else 0)
    up = hidden * (2 if c.activation in GATED_ACTIVATIONS else 1)
    expert = d * up + hidden * d + (up + d if c.bias else 0)
    feed_forward = c.moe_experts * expert + d * c.moe_experts if c.moe_experts else expert
    block = attention + feed_forward + norm * (4 if c.norm_placement == "sandwich" else 2)
    embeddings = c.vocab_size * d + (c.context_length * d if c.position == "learned" else 0)
    final = norm if c.norm_placement in ("pre", "sandwich") else 0
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return embeddings + c.n_layer * block + final + (norm if c.embedding_norm else 0) + head


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_the_closed_form_count(name):
    config = preset(name)
    with torch.device("meta"):
        assert Transformer(config).num_parameters() == closed_form_parameters(config)


@pytest.mark.parametrize("variant", VARIANTS + [dict(norm="rmsnorm", bias=False, n_kv_head=2)])
def test_variants_match_the_closed_form_count(variant):
    config = tiny(**variant)
    assert Transformer(config).num_parameters() == closed_form_parameters(config)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(moe_experts=4, moe_top_k=5), "moe_top_k"),
        (dict(moe_experts=-1), "moe_experts"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(position="sinusoidal", n_embd=33, n_head=3), "n_embd"),
    ],
)
def test_invalid_variant_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny(**changes)
