"""The Transformer against independent computations: Hugging Face's GPT-2 and LLaMA, the closed-form
parameter count, and its own uncached forward pass for the KV cache."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from llmkit.errors import ConfigError
from llmkit.model import ModelConfig, Transformer, preset

transformers = pytest.importorskip("transformers")


def tiny(**changes) -> ModelConfig:
    values = dict(vocab_size=97, context_length=32, n_layer=2, n_head=4, n_embd=32)
    values.update(changes)
    return ModelConfig(**values)


def test_matches_huggingface_gpt2_logits():
    config = tiny(activation="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    theirs = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    ).eval()
    state = {
        "transformer.wte.weight": ours.token_embedding.weight,
        "transformer.wpe.weight": ours.position_embedding.weight,
        "transformer.ln_f.weight": ours.final_norm.weight,
        "transformer.ln_f.bias": ours.final_norm.bias,
    }
    for index, block in enumerate(ours.blocks):
        prefix = f"transformer.h.{index}."
        # GPT-2 stores linear layers as Conv1D: weight transposed.
        state.update(
            {
                prefix + "ln_1.weight": block.attention_norm.weight,
                prefix + "ln_1.bias": block.attention_norm.bias,
                prefix + "attn.c_attn.weight": block.attention.qkv.weight.T,
                prefix + "attn.c_attn.bias": block.attention.qkv.bias,
                prefix + "attn.c_proj.weight": block.attention.out.weight.T,
                prefix + "attn.c_proj.bias": block.attention.out.bias,
                prefix + "ln_2.weight": block.feed_forward_norm.weight,
                prefix + "ln_2.bias": block.feed_forward_norm.bias,
                prefix + "mlp.c_fc.weight": block.feed_forward.up.weight.T,
                prefix + "mlp.c_fc.bias": block.feed_forward.up.bias,
                prefix + "mlp.c_proj.weight": block.feed_forward.down.weight.T,
                prefix + "mlp.c_proj.bias": block.feed_forward.down.bias,
            }
        )
    theirs.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_matches_huggingface_llama_logits_with_gqa():
    config = tiny(
        norm="rmsnorm",
        norm_eps=1e-6,
        position="rope",
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
        n_kv_head=2,
        ffn_hidden=48,
    )
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    theirs = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
    ).eval()
    state = {
        "model.embed_tokens.weight": ours.token_embedding.weight,
        "model.norm.weight": ours.final_norm.weight,
        "lm_head.weight": ours.lm_head.weight,
    }
    for index, block in enumerate(ours.blocks):
        prefix = f"model.layers.{index}."
        q, k, v = block.attention.qkv.weight.split([32, 16, 16])
        gate, up = block.feed_forward.up.weight.chunk(2)
        state.update(
            {
                prefix + "input_layernorm.weight": block.attention_norm.weight,
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.o_proj.weight": block.attention.out.weight,
                prefix + "post_attention_layernorm.weight": block.feed_forward_norm.weight,
                prefix + "mlp.gate_proj.weight": gate,
                prefix + "mlp.up_proj.weight": up,
                prefix + "mlp.down_proj.weight": block.feed_forward.down.weight,
            }
        )
    missing, unexpected = theirs.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2),
        dict(position="rope", n_kv_head=1, tie_embeddings=False),
        dict(norm_placement="post", activation="relu"),
    ],
)
def test_kv_cache_gives_the_same_logits_as_full_forward(variant):
    torch.manual_seed(0)
    model = Transformer(tiny(**variant)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    grouped = Transformer(tiny(n_kv_head=2)).eval()
    full = Transformer(tiny()).eval()
    full.load_state_dict({k: v for k, v in grouped.state_dict().items() if "qkv" not in k}, strict=False)
    for g_block, f_block in zip(grouped.blocks, full.blocks):
        q, k, v = g_block.attention.qkv.weight.split([32, 16, 16])
        qb, kb, vb = g_block.attention.qkv.bias.split([32, 16, 16])

        def repeat(w):
            return w.view(2, 8, *w.shape[1:]).repeat_interleave(2, dim=0).reshape(32, *w.shape[1:])

        with torch.no_grad():
            f_block.attention.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
            f_block.attention.qkv.bias.copy_(torch.cat([qb, repeat(kb), repeat(vb)]))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids), full(ids), atol=1e-5, rtol=1e-5)


def test_grouped_heads_in_packed_rows_compute_each_document_alone_and_whole_row_documents_attend_in_one_call():
    """Grouped keys and values are read unrepeated (enable_gqa) span by span; a batch whose rows are one document
    each is plain causal attention over the whole batch, with the same values and gradients."""
    from llmkit.model.transformer import DocumentSpans

    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=2)).train()
    ids = torch.randint(0, 97, (2, 20))
    documents = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    weights = torch.randn(2, 20, 32)
    packed = model.hidden_states(ids, document_ids=documents)
    pieces = [(0, 0, 8), (0, 8, 20), (1, 0, 20)]
    alone = [model.hidden_states(ids[row : row + 1, start:end])[0] for row, start, end in pieces]
    for (row, start, end), hidden in zip(pieces, alone):
        torch.testing.assert_close(packed[row, start:end], hidden, atol=1e-5, rtol=1e-5)
    parameters = list(model.parameters())
    mine = torch.autograd.grad((packed * weights).sum(), parameters)
    theirs = sum((hidden * weights[row, start:end]).sum() for (row, start, end), hidden in zip(pieces, alone))
    for ours, reference in zip(mine, torch.autograd.grad(theirs, parameters)):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    positions = torch.arange(20)
    assert isinstance(model._attention_mask(positions, 0, 20, None, documents)[0], DocumentSpans)
    assert model._attention_mask(positions, 0, 20, None, torch.zeros_like(documents)) == (None, True)
    torch.testing.assert_close(
        model.hidden_states(ids, document_ids=torch.zeros_like(documents)), model.hidden_states(ids)
    )


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt3-125m", "gpt3-175b", "gpt1"])
def test_gpt_presets_equal_the_closed_form_count(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    layers, width, vocab = config.n_layer, config.n_embd, config.vocab_size
    closed_form = layers * (12 * width**2 + 13 * width) + vocab * width
    positions = config.context_length * width
    final_norm = 2 * width if config.norm_placement == "pre" else 0
    assert model.num_parameters() == closed_form + positions + final_norm


def test_meta_count_equals_materialised_count():
    config = preset("cpu-small", vocab_size=1000)
    with torch.device("meta"):
        meta = Transformer(config)
    assert meta.num_parameters() == sum(p.numel() for p in Transformer(config).parameters())


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny(**changes)


def test_post_ln_has_no_final_norm_and_preset_replace_recomputes_ffn():
    assert isinstance(Transformer(tiny(norm_placement="post")).final_norm, torch.nn.Identity)
    config = preset("llama-7b")
    assert config.ffn_hidden == 11008
    assert config.replace(n_embd=5120, n_head=40).ffn_hidden == 13824
    assert dataclasses.asdict(config.replace())["ffn_hidden"] == 11008


def test_chunked_token_losses_equal_the_full_cross_entropy_and_its_gradients():
    """Only the positions with a target go through the head; the others are 0, with no gradient."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=61, context_length=64, logit_softcap=30.0))
    ids, targets = torch.randint(0, 61, (3, 40)), torch.randint(0, 61, (3, 40))
    targets[0, :5] = targets[2, 10:31] = -100  # a prompt at a row's start and one inside a packed row
    chunked = model.token_losses(model.hidden_states(ids), targets, chunk_tokens=7)  # chunks cross rows
    full = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none").view_as(
        targets
    )
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    assert chunked[0, :5].eq(0).all()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for ours, theirs in zip(
        torch.autograd.grad(chunked.sum(), parameters), torch.autograd.grad(full.sum(), parameters)
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    nothing = model.token_losses(model.hidden_states(ids), torch.full_like(targets, -100))
    assert nothing.shape == targets.shape and nothing.eq(0).all()
    gradients = torch.autograd.grad(nothing.sum(), parameters, materialize_grads=True)
    assert all(gradient.eq(0).all() for gradient in gradients)


def test_the_losses_softmax_gradient_equals_pytorchs_cross_entropy_even_where_the_probability_underflows():
    """The head's cross-entropy takes its gradient from one softmax in the forward pass; a target whose
    probability is below float32's smallest normal (here e^-150 and e^-105) gets its loss from the log-sum-exp."""
    from llmkit.model.transformer import _CrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    targets = torch.tensor([0, 7, 49, 3, 3, 20])
    logits[4, 3], logits[5, 20] = logits[4].max() - 150.0, logits[5].max() - 105.0
    weights = torch.rand(6)
    mine, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = _CrossEntropy.apply(mine, targets)
    reference = F.cross_entropy(theirs, targets, reduction="none")
    assert torch.isfinite(ours).all() and ours[4] > 149.0
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-6)


def test_one_chunk_of_positions_runs_the_head_once_and_more_chunks_recompute_it():
    """Recomputing a chunk's logits in the backward pass saves memory only when there is more than one chunk:
    one chunk's head runs once, with the same losses and gradients as the whole cross-entropy."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=61, context_length=64))
    ids, targets = torch.randint(0, 61, (3, 40)), torch.randint(0, 61, (3, 40))
    targets[0, :5] = -100
    calls = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    full = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    expected = torch.autograd.grad(full.sum(), parameters)
    # 115 positions have a target; the backward pass recomputes the last chunk first
    for chunk_tokens, head_calls in [(115, [115]), (100, [100, 15, 15, 100])]:
        calls.clear()
        losses = model.token_losses(model.hidden_states(ids), targets, chunk_tokens=chunk_tokens)
        gradients = torch.autograd.grad(losses.sum(), parameters)
        assert calls == head_calls
        torch.testing.assert_close(losses, full.view_as(targets), rtol=0, atol=1e-5)
        for ours, theirs in zip(gradients, expected):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_frozen_head_gives_the_full_cross_entropys_gradients_without_recomputing_logits():
    """LoRA's case: the head has nothing to train, so each chunk's gradient with respect to the hidden states
    is worked out in the forward pass and scaled in the backward pass, here by unequal weights per position
    (as DPO's sums per sequence give)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=61, context_length=64, logit_softcap=30.0))
    model.lm_head.weight.requires_grad_(False)
    ids, targets, weights = torch.randint(0, 61, (3, 40)), torch.randint(0, 61, (3, 40)), torch.rand(3, 40)
    targets[1, 3:20] = -100
    ours = model.token_losses(model.hidden_states(ids), targets, chunk_tokens=7)
    full = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(ours, full.view_as(targets), rtol=0, atol=1e-5)
    steps, seen = [ours.grad_fn], set()
    while steps:  # the autograd graph holds the frozen head's function, not a recomputation
        step = steps.pop()
        if step is not None and step not in seen:
            seen.add(step)
            steps += [following for following, _ in step.next_functions]
    assert "_FrozenHeadLossesBackward" in {type(step).__name__ for step in seen}
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for mine, theirs in zip(
        torch.autograd.grad((ours * weights).sum(), parameters),
        torch.autograd.grad((full.view_as(targets) * weights).sum(), parameters),
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_chunked_token_logprobs_equal_the_full_log_softmax_entropy_and_their_gradients():
    """What PPO and GRPO train on: log p(token) and the entropy at a sampling temperature, against the log-softmax
    of the whole (batch, length, vocab) logits."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=61, context_length=64, logit_softcap=30.0))
    ids, tokens = torch.randint(0, 61, (3, 40)), torch.randint(0, 61, (3, 40))
    logprobs, entropy = model.token_logprobs(model.hidden_states(ids), tokens, temperature=0.7, chunk_tokens=7)
    log_distribution = F.log_softmax(model(ids) / 0.7, dim=-1)
    full_logprobs = log_distribution.gather(-1, tokens[..., None]).squeeze(-1)
    full_entropy = -(log_distribution.exp() * log_distribution).sum(-1)
    torch.testing.assert_close(logprobs, full_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=1e-5)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    objective, full_objective = (logprobs + 0.1 * entropy).sum(), (full_logprobs + 0.1 * full_entropy).sum()
    for ours, theirs in zip(
        torch.autograd.grad(objective, parameters), torch.autograd.grad(full_objective, parameters)
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    # A rollout's actions only (a prompt, then a completion, then padding): 0 elsewhere, the same gradients.
    actions = torch.zeros_like(tokens, dtype=torch.bool)
    actions[0, 5:30], actions[1, 12:13], actions[2, 39] = True, True, True
    logprobs, entropy = model.token_logprobs(
        model.hidden_states(ids), tokens, temperature=0.7, chunk_tokens=7, positions=actions
    )
    torch.testing.assert_close(logprobs, torch.where(actions, full_logprobs, 0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, torch.where(actions, full_entropy, 0.0), rtol=0, atol=1e-5)
    log_distribution = F.log_softmax(model(ids) / 0.7, dim=-1)  # the graph above was spent by its gradients
    full_logprobs = log_distribution.gather(-1, tokens[..., None]).squeeze(-1)
    full_entropy = -(log_distribution.exp() * log_distribution).sum(-1)
    objective = (logprobs + 0.1 * entropy).sum()
    full_objective = torch.where(actions, full_logprobs + 0.1 * full_entropy, 0.0).sum()
    for ours, theirs in zip(
        torch.autograd.grad(objective, parameters), torch.autograd.grad(full_objective, parameters)
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
