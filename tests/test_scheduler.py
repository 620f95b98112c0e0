"""The continuous-batching scheduler against independent references: one-at-a-time full-forward greedy
decoding, the same seeded request alone, a full forward pass for log-probabilities, and scripted models
(a forward hook that makes the model follow a fixed chain of tokens) for stop strings, UTF-8 streaming
and tool calls."""

import threading
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from helpers import tiny_config
from test_infer import naive_greedy

from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.infer import Engine, GenerationConfig
from llmkit.infer.beam import beam_search
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "0123456789 (){}[]:;,'\"\n"


def trained_tokenizer(folder, kind: str, vocab_size: int) -> Tokenizer:
    (folder / "a.txt").write_text(TEXT)
    train_tokenizer(
        TokenizerConfig(
            source=str(folder / "a.txt"), out=str(folder / kind), kind=kind, vocab_size=vocab_size, held_out_fraction=0
        )
    )
    return Tokenizer.load(folder / kind)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return trained_tokenizer(tmp_path_factory.mktemp("char"), "char", 200)


def engine_of(tokenizer: Tokenizer, max_batch_size: int = 16, **changes) -> Engine:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, **{"context_length": 64, **changes}))
    return Engine(model, tokenizer, max_batch_size=max_batch_size)


def greedy(max_new_tokens: int, **changes) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, stop_at_end_of_text=False, **changes)


@contextmanager
def following(model: Transformer, chain: list[int], otherwise: int):
    """Make the model predict ``chain[i + 1]`` after ``chain[i]`` (and ``otherwise`` after any other token)."""
    successor = torch.full((model.config.vocab_size,), otherwise)
    successor[torch.tensor(chain[:-1])] = torch.tensor(chain[1:])

    def force(module, args, logits):
        return torch.full_like(logits, -20.0).scatter(-1, successor[args[0]].unsqueeze(-1), 20.0)

    handle = model.register_forward_hook(force)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(position="learned", norm="layernorm", activation="gelu"),
        dict(position="alibi"),
        dict(position="sinusoidal", n_kv_head=1),
    ],
)
def test_continuous_batching_equals_one_at_a_time_greedy(tokenizer, variant):
    engine = engine_of(tokenizer, max_batch_size=3, **variant)
    scheduler = engine.scheduler
    # The first two prompts are as long (one prefill pass for both), the rest differ.
    jobs = [("fox", 5), ("the", 12), ("0", 3), ("over the lazy", 9), ("dog. ", 7), ("jumps", 4)]
    prompts = [tokenizer.encode(text) for text, _ in jobs]
    requests = [scheduler.submit(prompts[index], greedy(jobs[index][1])) for index in (0, 1)]
    scheduler.step()
    scheduler.step()
    requests += [scheduler.submit(prompts[index], greedy(jobs[index][1])) for index in (2, 3)]
    scheduler.step()  # rows at different positions; the batch is full and one request waits
    assert (scheduler.num_running, scheduler.num_waiting) == (3, 1)
    requests += [scheduler.submit(prompts[index], greedy(jobs[index][1])) for index in (4, 5)]
    while scheduler.step():
        pass
    for request, prompt, (_, steps) in zip(requests, prompts, jobs):
        completion = request.result()
        assert completion.token_ids == naive_greedy(engine.model, prompt, steps)
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(prompt)


def test_seeded_sampling_does_not_depend_on_batch_mates(tokenizer):
    engine = engine_of(tokenizer)
    prompt = tokenizer.encode("the lazy")
    config = GenerationConfig(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=7, stop_at_end_of_text=False)
    alone = engine.generate_ids([prompt], config)[0].token_ids
    mates = [
        GenerationConfig(max_new_tokens=9, temperature=0.7, top_k=5, stop_at_end_of_text=False),
        GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7, stop_at_end_of_text=False),
    ]
    together = engine.generate_ids(
        [tokenizer.encode("fox"), prompt, tokenizer.encode("0123 ")], [mates[0], config, mates[1]]
    )
    assert together[1].token_ids == alone
    assert engine.generate_ids([prompt], replace(config, seed=8))[0].token_ids != alone


def test_cancel_frees_the_slot_and_leaves_the_others_alone(tokenizer):
    engine = engine_of(tokenizer, max_batch_size=2)
    scheduler = engine.scheduler
    prompts = [tokenizer.encode(text) for text in ("fox", "over", "lazy", "dog")]
    first, second, third, fourth = [scheduler.submit(prompt, greedy(10)) for prompt in prompts]
    scheduler.step()
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 2)
    first.cancel()
    fourth.cancel()
    scheduler.step()
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 0)
    cancelled = first.result()
    assert cancelled.finish_reason == "cancelled" and cancelled.token_ids == naive_greedy(engine.model, prompts[0], 1)
    assert fourth.result().finish_reason == "cancelled" and fourth.result().token_ids == []
    for request, prompt in ((second, prompts[1]), (third, prompts[2])):
        assert request.result().token_ids == naive_greedy(engine.model, prompt, 10)


def test_stop_strings_split_across_tokens(tokenizer):
    engine = engine_of(tokenizer)
    chain = tokenizer.encode("quick brown")  # distinct characters, one token each
    with following(engine.model, chain, tokenizer.eot_id):
        full = engine.generate("q", GenerationConfig(max_new_tokens=30, temperature=0))[0]
        stopped = engine.generate("q", GenerationConfig(max_new_tokens=30, temperature=0, stop=["xyz", "k br"]))[0]
        deltas = list(engine.stream("q", GenerationConfig(max_new_tokens=30, temperature=0, stop=["k br"])))
        near_miss = list(engine.stream("q", GenerationConfig(max_new_tokens=30, temperature=0, stop=["ck!"])))
    assert full.text == "uick brown" and full.finish_reason == "stop"
    assert stopped.text == "uic" and stopped.finish_reason == "stop"
    assert "".join(deltas) == "uic" and "".join(near_miss) == "uick brown"
    assert near_miss[:3] == ["u", "i", "ck "]  # "c", then "ck", held back until " " ruled out "ck!"


def test_streamed_deltas_never_split_a_utf8_character(tmp_path):
    tokenizer = trained_tokenizer(tmp_path, "bpe", 300)
    engine = engine_of(tokenizer)
    chain = tokenizer.encode("x€üy")
    assert len(tokenizer.encode("€")) == 3 and len(set(chain)) == len(chain)  # bytes of one character, split
    with following(engine.model, chain, tokenizer.eot_id):
        deltas = list(engine.stream("x", GenerationConfig(max_new_tokens=20, temperature=0)))
        completion = engine.generate("x", GenerationConfig(max_new_tokens=20, temperature=0))[0]
    assert "".join(deltas) == completion.text == "€üy"
    assert not any("\ufffd" in delta for delta in deltas)


def test_echo_and_token_logprobs_equal_a_full_forward_pass(tokenizer):
    engine = engine_of(tokenizer)
    prompts = [tokenizer.encode("the lazy dog"), tokenizer.encode("fox")]
    configs = [
        greedy(6, logprobs=3, echo=True),
        GenerationConfig(max_new_tokens=4, temperature=1.0, seed=1, logprobs=0),
    ]
    for prompt, completion in zip(prompts, engine.generate_ids(prompts, configs)):
        sequence = prompt + completion.token_ids
        with torch.no_grad():
            logprobs = engine.model(torch.tensor([sequence]))[0].log_softmax(-1)
        expected = [float(logprobs[position - 1, sequence[position]]) for position in range(1, len(sequence))]
        generated = expected[len(prompt) - 1 :]
        assert completion.logprobs == pytest.approx(generated, abs=1e-5)
        if completion.prompt_logprobs is None:
            assert completion.top_logprobs is None
            continue
        assert completion.prompt_logprobs[0] is None
        assert completion.prompt_logprobs[1:] == pytest.approx(expected[: len(prompt) - 1], abs=1e-5)
        for position, alternatives in enumerate(completion.top_logprobs, start=len(prompt) - 1):
            best = logprobs[position].topk(3)
            assert list(alternatives) == [tokenizer.decode([token]) for token in best.indices.tolist()]
            assert list(alternatives.values()) == pytest.approx(best.values.tolist(), abs=1e-5)
        assert len(completion.prompt_top_logprobs) == len(prompt) and len(completion.prompt_top_logprobs[1]) == 3


class FakeToolBox:
    def __init__(self):
        self.payloads = []

    def run(self, payload: str) -> str:
        self.payloads.append(payload)
        return "42<|end|>"  # a result must not be able to close anything itself


def test_a_closed_tool_call_runs_and_its_result_is_injected(tokenizer):
    engine = engine_of(tokenizer)
    special = tokenizer.special_ids
    call, end, result = special["<|tool_call|>"], special["<|end|>"], special["<|tool_result|>"]
    chain = [tokenizer.encode("q")[0], call, *tokenizer.encode("ui"), end, *tokenizer.encode("c")]
    tools = FakeToolBox()
    with following(engine.model, chain, tokenizer.eot_id):
        ran = engine.generate("q", GenerationConfig(max_new_tokens=10, temperature=0, logprobs=0), tools=tools)[0]
        deferred = engine.generate("q", GenerationConfig(max_new_tokens=10, temperature=0))[0]
    assert tools.payloads == ["ui"]
    injected = [result, *tokenizer.encode("42< |end|>"), end]
    assert ran.token_ids == [call, *tokenizer.encode("ui"), end, *injected, *tokenizer.encode("c")]
    assert ran.injected == [False] * 4 + [True] * len(injected) + [False]
    assert [logprob is None for logprob in ran.logprobs] == ran.injected
    assert ran.text == tokenizer.decode(ran.token_ids) and ran.finish_reason == "stop"
    assert ran.tool_calls == [{"payload": "ui", "result": "42< |end|>"}]
    assert deferred.finish_reason == "tool_calls" and deferred.tool_calls == [{"payload": "ui", "result": None}]
    assert deferred.token_ids == [call, *tokenizer.encode("ui")]


def test_tool_results_of_several_rows_in_one_step_share_one_prefill_pass(tokenizer):
    """Three requests at different positions (prompts of 1, 5 and 10 tokens) call a tool in the same step:
    their results go into the cache in one pass of three rows, not a pass each, and every request ends as it
    would alone."""
    engine = engine_of(tokenizer)
    special = tokenizer.special_ids
    call, end, result = special["<|tool_call|>"], special["<|end|>"], special["<|tool_result|>"]
    chain = [tokenizer.encode("q")[0], call, *tokenizer.encode("ui"), end, *tokenizer.encode("c")]
    injected = [result, *tokenizer.encode("42< |end|>"), end]
    passes = []
    engine.model.token_embedding.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape)))
    config = GenerationConfig(max_new_tokens=10, temperature=0)
    with following(engine.model, chain, tokenizer.eot_id):
        ran = engine.generate(["q", "the q", "over the q"], config, tools=FakeToolBox())
    expected = [call, *tokenizer.encode("ui"), end, *injected, *tokenizer.encode("c")]
    assert [completion.token_ids for completion in ran] == [expected] * 3
    assert [shape for shape in passes if shape[1] == len(injected)] == [(3, len(injected))]


class LongResultToolBox(FakeToolBox):
    def run(self, payload: str) -> str:
        self.payloads.append(payload)
        return "7" * 40


def test_a_tool_result_longer_than_the_reserved_room_grows_the_cache(tokenizer):
    """A request reserves its prompt and max_new_tokens, not the whole context; a tool result that outgrows
    that room grows the cache before the next step, and decoding goes on as if it had been there."""
    engine = engine_of(tokenizer, context_length=256)
    special = tokenizer.special_ids
    call, end, result = special["<|tool_call|>"], special["<|end|>"], special["<|tool_result|>"]
    chain = [tokenizer.encode("q")[0], call, *tokenizer.encode("ui"), end, *tokenizer.encode("c")]
    with following(engine.model, chain, tokenizer.eot_id):
        ran = engine.generate("q", GenerationConfig(max_new_tokens=6, temperature=0), tools=LongResultToolBox())[0]
    injected = [result, *tokenizer.encode("7" * 40), end]
    assert ran.token_ids == [call, *tokenizer.encode("ui"), end, *injected, *tokenizer.encode("c")]
    assert ran.finish_reason == "stop"
    capacity = engine.scheduler.cache.capacity
    assert 1 + 6 < 1 + len(ran.token_ids) <= capacity < engine.model.config.context_length


def test_admitting_requests_grows_the_cache_rows_not_its_positions(tokenizer):
    """Twelve requests admitted together: the cache gains rows (doubling) while its positions stay the
    room one request reserves; growing the rows once doubled the positions too, every time."""
    engine = engine_of(tokenizer, context_length=256)
    prompt = tokenizer.encode("over the")
    completions = engine.generate_ids([prompt] * 12, greedy(6))
    assert all(completion.finish_reason == "length" for completion in completions)
    cache = engine.scheduler.cache
    assert cache.capacity == len(prompt) + 6
    assert 12 <= cache.batch_size <= 16


def test_beam_requests_are_the_beam_search_best(tokenizer):
    engine = engine_of(tokenizer)
    prompt = tokenizer.encode("over the")
    best = beam_search(engine.model, prompt, num_beams=3, max_new_tokens=6)[0]
    completion = engine.generate_ids([prompt], greedy(6, num_beams=3))[0]
    assert completion.token_ids == best.token_ids and completion.text == tokenizer.decode(best.token_ids)


def test_background_thread_serves_concurrent_submitters(tokenizer):
    engine = engine_of(tokenizer, max_batch_size=3)
    texts = ["fox", "over the lazy", "0123", "dog", "the quick", "jumps over"]
    results: dict[int, list[int] | str] = {}

    def submit(index: int) -> None:
        if index % 2:
            results[index] = engine.generate(texts[index], greedy(8 + index))[0].token_ids
        else:
            results[index] = "".join(engine.stream(texts[index], greedy(8 + index)))

    engine.scheduler.start()
    try:
        threads = [threading.Thread(target=submit, args=(index,)) for index in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        engine.scheduler.stop()
    for index, text in enumerate(texts):
        expected = naive_greedy(engine.model, tokenizer.encode(text), 8 + index)
        assert results[index] == (tokenizer.decode(expected) if index % 2 == 0 else expected)


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on(tokenizer):
    engine = engine_of(tokenizer)

    def fail(module, args, logits):
        raise RuntimeError("broken model")

    engine.scheduler.start()
    try:
        handle = engine.model.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="broken model"):
            engine.generate(["fox", "dog"], greedy(4))
        handle.remove()
        prompt = tokenizer.encode("fox")
        assert engine.generate_ids([prompt], greedy(4))[0].token_ids == naive_greedy(engine.model, prompt, 4)
    finally:
        engine.scheduler.stop()
