"""The inference engine against naive references: full-forward greedy decoding, per-row sampling filters,
one-at-a-time generation for batches of different prompt lengths, and text-level stop strings and streaming."""

import pytest
import torch
from helpers import naive_greedy, tiny_config

from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import InputError
from llmkit.infer import Engine, EngineConfig, GenerationConfig
from llmkit.infer.sampling import next_tokens, top_k_filter, top_p_filter
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "0123456789 (){}[]:;,'\"\n"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT[::-1])
    out = folder / "tokenizer"
    train_tokenizer(TokenizerConfig(source=str(folder), out=str(out), kind="char", vocab_size=200, held_out_fraction=0))
    tokenizer = Tokenizer.load(out)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=64))
    return Engine(model, tokenizer)


def test_greedy_decoding_matches_a_full_forward_loop(engine):
    prompt = engine.tokenizer.encode("the lazy")
    config = GenerationConfig(max_new_tokens=20, temperature=0, stop_at_end_of_text=False)
    assert engine.generate_ids([prompt], config)[0].token_ids == naive_greedy(engine.model, prompt, 20)


def test_cache_and_no_cache_sample_the_same_tokens(engine):
    prompt = engine.tokenizer.encode("quick")
    sample = dict(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=3, stop_at_end_of_text=False)
    cached = engine.generate_ids([prompt], GenerationConfig(**sample))[0].token_ids
    uncached = engine.generate_ids([prompt], GenerationConfig(**sample, use_cache=False))[0].token_ids
    assert cached == uncached and len(cached) == 15


def test_batch_of_different_lengths_decodes_each_row_as_alone(engine):
    prompts = [engine.tokenizer.encode(text) for text in ("fox", "over the lazy", "0123")]
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_at_end_of_text=False)
    for prompt, completion in zip(prompts, engine.generate_ids(prompts, config)):
        assert completion.token_ids == naive_greedy(engine.model, prompt, 12)


def test_top_k_and_top_p_match_a_naive_filter():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    for row in range(4):
        kept_k = set(torch.topk(logits[row], 5).indices.tolist())
        assert set(torch.isfinite(top_k_filter(logits, 5)[row]).nonzero().flatten().tolist()) == kept_k
        probabilities = logits[row].softmax(-1)
        order = probabilities.argsort(descending=True).tolist()
        kept_p, mass = set(), 0.0
        for index in order:  # smallest prefix whose mass reaches 0.7
            kept_p.add(index)
            mass += float(probabilities[index])
            if mass >= 0.7:
                break
        assert set(torch.isfinite(top_p_filter(logits, 0.7)[row]).nonzero().flatten().tolist()) == kept_p


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, GenerationConfig(temperature=2.0), generator)
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(frequencies, (logits[0] / 2.0).softmax(-1), atol=0.015, rtol=0)


def test_stop_string_truncates_and_streaming_matches(engine):
    config = dict(max_new_tokens=30, temperature=0)
    full = engine.generate("the ", GenerationConfig(**config))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[6:9]
    stopped = engine.generate("the ", GenerationConfig(**config, stop=[stop]))[0]
    assert stopped.text == full.text[: full.text.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(engine.stream("the ", GenerationConfig(**config, stop=[stop]))) == stopped.text
    assert "".join(engine.stream("the ", GenerationConfig(**config))) == full.text


def test_end_of_text_stops_a_row(engine):
    eot = engine.tokenizer.eot_id

    def favour_end_of_text(module, inputs, logits):
        logits[..., eot] += 100.0
        return logits

    hook = engine.model.lm_head.register_forward_hook(favour_end_of_text)
    try:
        completion = engine.generate("fox", GenerationConfig(max_new_tokens=10, temperature=0))[0]
    finally:
        hook.remove()
    assert completion.finish_reason == "stop" and completion.text == "" and completion.token_ids == []


def test_generation_is_limited_by_the_context(engine):
    prompt = engine.tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 2)[:60]
    config = GenerationConfig(max_new_tokens=50, temperature=0, stop_at_end_of_text=False)
    completion = engine.generate_ids([prompt], config)[0]
    assert len(completion.token_ids) == 64 - 60 and completion.finish_reason == "length"
    with pytest.raises(InputError, match="context"):
        engine.generate_ids([list(range(64))], GenerationConfig(temperature=0))


def test_empty_prompt_generates_a_new_document(engine):
    completion = engine.generate("", GenerationConfig(max_new_tokens=8, temperature=0))[0]
    expected = naive_greedy(engine.model, [engine.tokenizer.eot_id], 8)
    assert completion.prompt_tokens == 1 and completion.token_ids == expected[: len(completion.token_ids)]


def test_decoding_layout_keeps_logits_parameters_and_ties(monkeypatch):
    """The column-major layout (llmkit's CPU kernels tile float32 layers instead, tests/test_cpu_kernels.py)."""
    from llmkit.infer.cpu_kernels import TiledLinear

    monkeypatch.setattr(TiledLinear, "fits", staticmethod(lambda linear: False))
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=True)).eval()
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        before = model(ids)
    parameters = [id(p) for p in model.parameters()]
    from llmkit.infer.engine import use_decoding_layout

    use_decoding_layout(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert [id(p) for p in model.parameters()] == parameters
    assert model.lm_head.weight is model.token_embedding.weight and not model.lm_head.weight.is_contiguous()


def test_checkpoint_with_a_different_tokenizer_is_refused(tmp_path, engine):
    from llmkit.errors import MismatchError
    from llmkit.model.checkpoint import write_model

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_model(
        checkpoint, engine.model.state_dict(), engine.model.config, {"tokenizer_sha256": engine.tokenizer.sha256}
    )
    engine.tokenizer.save(checkpoint)
    assert Engine.from_config(EngineConfig(checkpoint=str(checkpoint))).tokenizer.sha256 == engine.tokenizer.sha256
    (tmp_path / "other.txt").write_text("completely different characters: ÆØÅ€ " * 5)
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "other.txt"), out=str(checkpoint), kind="char", vocab_size=60, held_out_fraction=0
        )
    )
    with pytest.raises(MismatchError, match="not the one the model was trained with"):
        Engine.from_config(EngineConfig(checkpoint=str(checkpoint)))
