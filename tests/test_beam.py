"""Beam search against brute force: every sequence of a small vocabulary scored by full forward passes,
on a random tiny Transformer (which also checks that the cache rows follow their beams) and on a
Transformer wired into a known bigram table where greedy decoding walks into a trap."""

import itertools
import math

import pytest
import torch
from helpers import naive_greedy, tiny_config

from llmkit.errors import InputError
from llmkit.infer.beam import beam_search
from llmkit.infer.scoring import score_sequences
from llmkit.model import Transformer


def random_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    # A wide init makes the distributions peaked enough that the best sequences are far apart.
    return Transformer(tiny_config(vocab_size=vocab_size, context_length=16, init_std=0.5)).eval()


def bigram_model(probabilities: list[list[float]]) -> Transformer:
    """A Transformer whose next-token distribution is ``probabilities[last token]``: blocks that start as
    the identity (zero projections), one-hot embeddings, and a head holding the log-probability table
    (scaled by the final RMSNorm's gain on a one-hot vector, sqrt(width))."""
    vocab, width = len(probabilities), 8
    model = Transformer(tiny_config(vocab_size=vocab, n_embd=width, zero_init_projections=True, tie_embeddings=False))
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.token_embedding.weight[:, :vocab] = torch.eye(vocab)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = torch.tensor(probabilities).log().T / math.sqrt(width)
    return model.eval()


def generated_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    return float(score_sequences(model, [prompt + tokens])[0].logprobs[len(prompt) - 1 :].sum())


def brute_force(model, prompt: list[int], length: int, end_ids: set[int], length_penalty: float) -> list[tuple]:
    """Every hypothesis of at most ``length`` new tokens, as (score, token ids without the end token,
    summed log-prob), best first: a sequence that closes with an end token, or one of exactly ``length``
    tokens with no end token in it."""
    vocab = model.config.vocab_size
    sequences = [
        list(s)
        for n in range(1, length + 1)
        for s in itertools.product(range(vocab), repeat=n)
        if not end_ids & set(s[:-1]) and (n == length or s[-1] in end_ids)
    ]
    scores = score_sequences(model, [prompt + s for s in sequences], batch_size=256)
    hypotheses = []
    for sequence, score in zip(sequences, scores):
        logprob = float(score.logprobs[len(prompt) - 1 :].sum())
        tokens = sequence[:-1] if sequence[-1] in end_ids else sequence
        hypotheses.append((logprob / len(sequence) ** length_penalty, tokens, logprob))
    return sorted(hypotheses, key=lambda hypothesis: -hypothesis[0])


def test_width_one_is_greedy_decoding():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = [5, 17, 3, 40]
    best = beam_search(model, prompt, num_beams=1, max_new_tokens=10)
    assert best[0].token_ids == naive_greedy(model, prompt, 10)
    assert best[0].logprob == pytest.approx(generated_logprob(model, prompt, best[0].token_ids), abs=1e-4)


def test_enough_width_finds_the_exact_best_sequences():
    model, prompt = random_model(6), [1, 2, 3]
    expected = brute_force(model, prompt, 3, set(), length_penalty=1.0)
    # 36 beams hold every 2-token prefix, so the last step ranks all 216 sequences.
    found = beam_search(model, prompt, num_beams=36, max_new_tokens=3)
    assert [h.token_ids for h in found] == [tokens for _, tokens, _ in expected[:36]]
    for hypothesis, (score, _, logprob) in zip(found, expected):
        assert hypothesis.logprob == pytest.approx(logprob, abs=1e-4)
        assert hypothesis.score == pytest.approx(score, abs=1e-4)
        assert hypothesis.finish_reason == "length"


@pytest.mark.parametrize("length_penalty", [1.0, 2.0, -0.5])
def test_end_tokens_and_length_penalty_rank_like_brute_force(length_penalty):
    model, prompt = random_model(4), [2, 1]
    expected = brute_force(model, prompt, 3, {0}, length_penalty)
    # 64 beams never drop a candidate: all 1 + 3 + 36 hypotheses come back, ranked.
    found = beam_search(
        model, prompt, num_beams=64, max_new_tokens=3, length_penalty=length_penalty, end_ids=frozenset({0})
    )
    assert [h.token_ids for h in found] == [tokens for _, tokens, _ in expected]
    assert [h.score for h in found] == pytest.approx([score for score, _, _ in expected], abs=1e-4)
    assert {h.finish_reason for h in found if len(h.token_ids) < 3} == {"stop"}


def test_beam_search_avoids_the_greedy_trap():
    # From token 0, token 1 is the likeliest (0.5) but leads to a flat distribution; token 2 (0.4) leads
    # to 3 (0.9) and then 4 (0.8): 0.288 against greedy's 0.5 * 0.21 * 0.5 = 0.0525.
    model = bigram_model(
        [
            [0.02, 0.5, 0.4, 0.04, 0.04],
            [0.21, 0.2, 0.2, 0.2, 0.19],
            [0.02, 0.02, 0.02, 0.9, 0.04],
            [0.05, 0.05, 0.05, 0.05, 0.8],
            [0.8, 0.05, 0.05, 0.05, 0.05],
        ]
    )
    greedy = beam_search(model, [0], num_beams=1, max_new_tokens=3)[0]
    assert greedy.token_ids == naive_greedy(model, [0], 3) == [1, 0, 1]
    best = beam_search(model, [0], num_beams=2, max_new_tokens=3)[0]
    assert best.token_ids == [2, 3, 4] == brute_force(model, [0], 3, set(), 1.0)[0][1]
    assert best.logprob == pytest.approx(math.log(0.4 * 0.9 * 0.8), abs=1e-3)


def test_search_stops_once_no_open_beam_can_win():
    # The end token 0 has probability 0.9 after every token. The two best hypotheses are [] (0.9) and
    # [1] (0.04 * 0.9); any longer one has at most 0.04 * 0.04. Without a length penalty the search can
    # stop after the second step.
    row = [0.9, 0.04, 0.03, 0.02, 0.01]
    model = bigram_model([row] * 5)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    found = beam_search(model, [3], num_beams=2, max_new_tokens=10, length_penalty=0.0, end_ids=frozenset({0}))
    assert [h.token_ids for h in found] == [[], [1]]
    assert [h.logprob for h in found] == pytest.approx([math.log(0.9), math.log(0.036)], abs=1e-3)
    assert len(calls) == 2  # the prompt and one decoding step


def test_a_prompt_that_fills_the_context_is_refused():
    model = Transformer(tiny_config()).eval()
    with pytest.raises(InputError, match="context"):
        beam_search(model, list(range(16)), num_beams=2, max_new_tokens=4)
