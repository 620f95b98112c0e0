"""The logits processors against distributions worked by hand, row-wise sampling against one row at a
time, and the reported log-probabilities against log-softmax computed by hand."""

import math

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.infer.sampling import (
    TOP_P_CANDIDATES,
    GenerationConfig,
    SeenTokens,
    draw,
    frequency_presence_filter,
    logprobs_of,
    min_p_filter,
    most_likely,
    next_tokens,
    process_logits,
    repetition_penalty_filter,
    sample_rows,
    top_k_filter,
    top_p_filter,
)

# Five tokens with probabilities 0.5, 0.2, 0.15, 0.1, 0.05: logits are their logarithms.
PROBABILITIES = [0.5, 0.2, 0.15, 0.1, 0.05]
LOGITS = torch.tensor([PROBABILITIES]).log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    counts = torch.tensor([[1.0, 0.0, 3.0, 2.0, 0.0]])  # tokens 0, 2 and 3 were seen
    penalised = repetition_penalty_filter(logits, counts, 2.0)
    assert penalised.tolist() == [[1.0, 1.0, 0.0, -2.0, -2.0]]


def test_frequency_and_presence_penalties_follow_the_openai_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0, 3.0]])
    penalised = frequency_presence_filter(logits, counts, frequency=0.5, presence=0.25)
    # 2 - 2*0.5 - 0.25, unchanged, 0 - 0.5 - 0.25, unchanged, -2 - 3*0.5 - 0.25
    assert penalised.tolist() == [[0.75, 1.0, -0.75, -1.0, -3.75]]


def test_top_k_keeps_the_k_most_likely():
    assert kept(top_k_filter(LOGITS, 2)) == {0, 1}
    assert kept(top_k_filter(LOGITS, 9)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("p, expected", [(0.45, {0}), (0.6, {0, 1}), (0.75, {0, 1, 2}), (0.9, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, expected):
    # cumulative: 0.5, 0.7, 0.85, 0.95, 1.0
    assert kept(top_p_filter(LOGITS, p)) == expected


def naive_nucleus(probabilities: list[float], p: float) -> set[int]:
    kept, mass = set(), 0.0
    for token in sorted(range(len(probabilities)), key=lambda token: -probabilities[token]):
        kept.add(token)
        mass += probabilities[token]
        if mass >= p:
            return kept
    return kept


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    # Row 0 is peaked (its nucleus lies among the first candidates), row 1 is flat (it needs the whole
    # vocabulary ranked); both in one batch, so the batch takes the slow path, and row 0 alone the fast one.
    torch.manual_seed(0)
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.stack([torch.randn(vocab) * 4, torch.randn(vocab) * 0.1])
    for rows in ([0], [0, 1]):
        filtered = top_p_filter(logits[rows], 0.9)
        for index, row in enumerate(rows):
            expected = naive_nucleus(logits[row].double().softmax(-1).tolist(), 0.9)
            assert set(torch.isfinite(filtered[index]).nonzero().flatten().tolist()) == expected
    assert len(naive_nucleus(logits[0].double().softmax(-1).tolist(), 0.9)) < TOP_P_CANDIDATES
    assert len(naive_nucleus(logits[1].double().softmax(-1).tolist(), 0.9)) > TOP_P_CANDIDATES


@pytest.mark.parametrize("min_p, expected", [(0.25, {0, 1, 2}), (0.35, {0, 1}), (0.5, {0}), (0.09, {0, 1, 2, 3, 4})])
def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely(min_p, expected):
    # thresholds min_p * 0.5: 0.125 keeps 0.15; 0.175 drops it; 0.25 keeps only 0.5; 0.045 keeps all
    assert kept(min_p_filter(LOGITS, min_p)) == expected


def test_temperature_is_applied_before_min_p():
    # Temperature 2 flattens the distribution to sqrt(p) / sum sqrt(p) = 0.340, 0.215, 0.186, 0.152, 0.107,
    # so min-p 0.5 (threshold 0.170) keeps three tokens instead of one.
    assert kept(process_logits(LOGITS, GenerationConfig(temperature=1.0, min_p=0.5), None)) == {0}
    assert kept(process_logits(LOGITS, GenerationConfig(temperature=2.0, min_p=0.5), None)) == {0, 1, 2}


def test_greedy_still_applies_the_penalties():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, -3.0]])
    plain = GenerationConfig(temperature=0)
    assert next_tokens(logits, plain, None, [[0]]).tolist() == [0]
    # 2 / 2 = 1 < 1.5: the repeated token loses its lead.
    assert next_tokens(logits, GenerationConfig(temperature=0, repetition_penalty=2.0), None, [[0]]).tolist() == [1]
    # 2 - 0.4 * 2 = 1.2 < 1.5 once token 0 was seen twice, but 1.6 > 1.5 once.
    assert next_tokens(logits, GenerationConfig(temperature=0, frequency_penalty=0.4), None, [[0, 0]]).tolist() == [1]
    assert next_tokens(logits, GenerationConfig(temperature=0, frequency_penalty=0.4), None, [[0, 3]]).tolist() == [0]


def test_penalties_change_exactly_the_seen_tokens_by_the_formulas():
    torch.manual_seed(0)
    vocab, histories = 30, [[3, 3, 7, 29], [], [0, 0, 0, 12]]
    logits = torch.randn(3, vocab) * 3
    counts = torch.zeros(3, vocab)
    for row, history in enumerate(histories):
        for token in history:
            counts[row, token] += 1
    config = GenerationConfig(temperature=0, repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=-0.5)
    dense = frequency_presence_filter(repetition_penalty_filter(logits, counts, 1.7), counts, 0.3, -0.5)
    processed = process_logits(logits, config, SeenTokens.of(histories, vocab, "cpu"))
    torch.testing.assert_close(processed, dense)
    assert torch.equal(processed[counts == 0], logits[counts == 0])


def test_the_greedy_choice_is_the_first_maximum_of_each_row():
    """NumPy's argmax on the CPU, PyTorch's elsewhere: the same rule (the first of equal maxima, NaN above
    everything), on a strided view, in float32 and bfloat16."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 1.0, float("nan"), 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert most_likely(logits).tolist() == [1, 0, 0]
    torch.manual_seed(0)
    wide = torch.randn(6, 500)
    for view in (wide, wide[:, ::3], wide.bfloat16()):
        expected = [max(range(view.shape[1]), key=lambda i, row=row: (float(view[row, i]), -i)) for row in range(6)]
        assert most_likely(view).tolist() == expected


def test_a_draw_is_the_inverse_transform_of_each_rows_uniform_number():
    """Against the float64 cumulative distribution of each row worked out alone, on a vocabulary of 1000 with a
    third of the tokens filtered (and rows whose mass lies in the last tenth): every row's token is the one its
    own generator's number falls on."""
    torch.manual_seed(0)
    rows, vocab = 400, 1000
    logits = torch.randn(rows, vocab) * 3
    logits[torch.rand(rows, vocab) < 0.33] = float("-inf")
    logits[:50, :900] = float("-inf")
    tokens = draw(logits, [torch.Generator().manual_seed(row) for row in range(rows)])
    expected = []
    for row in range(rows):
        uniform = torch.rand(1, generator=torch.Generator().manual_seed(row), dtype=torch.float64)
        cumulative = logits[row].double().softmax(dim=-1).cumsum(dim=-1)
        expected.append(int(torch.searchsorted(cumulative, uniform * cumulative[-1], right=True)))
    assert tokens.tolist() == expected
    assert torch.isfinite(logits[torch.arange(rows), tokens]).all()


def test_draws_never_pick_a_filtered_token():
    logits = torch.tensor([[float("-inf"), float("-inf"), 0.0], [0.0, float("-inf"), float("-inf")]]).repeat(500, 1)
    draws = next_tokens(logits, GenerationConfig(temperature=1.0), torch.Generator().manual_seed(0))
    assert draws.view(500, 2).tolist() == [[2, 0]] * 500


def test_draws_follow_the_filtered_distribution():
    rows = 20000
    generator = torch.Generator().manual_seed(0)
    draws = next_tokens(LOGITS.repeat(rows, 1), GenerationConfig(temperature=1.0, min_p=0.25), generator)
    frequencies = torch.bincount(draws, minlength=5).float() / rows
    expected = torch.tensor([0.5, 0.2, 0.15, 0.0, 0.0]) / 0.85  # min-p 0.25 keeps the first three
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_sample_rows_with_mixed_configs_equals_each_row_alone():
    torch.manual_seed(0)
    vocab = 40
    configs = [
        GenerationConfig(temperature=0, repetition_penalty=1.3),
        GenerationConfig(temperature=0.7, top_k=5),
        GenerationConfig(temperature=1.0, top_p=0.8, presence_penalty=1.0),
        GenerationConfig(temperature=0.7, top_k=5),
        GenerationConfig(temperature=1.2, min_p=0.1, frequency_penalty=0.5),
        GenerationConfig(temperature=0.9, repetition_penalty=1.5, top_k=10, top_p=0.9, min_p=0.05),
    ]
    histories = [torch.randint(0, vocab, (length,)).tolist() for length in (3, 0, 8, 5, 12, 6)]
    seeds = [11, 12, 13, 14, 15, 16]
    for _ in range(20):
        logits = torch.randn(len(configs), vocab) * 3
        together = sample_rows(logits, configs, [torch.Generator().manual_seed(s) for s in seeds], histories)
        alone = [
            next_tokens(
                logits[row : row + 1], configs[row], torch.Generator().manual_seed(seeds[row]), [histories[row]]
            )
            for row in range(len(configs))
        ]
        assert together.tolist() == torch.cat(alone).tolist()
        seeds = [seed + 100 for seed in seeds]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 50)
    config = GenerationConfig(temperature=1.0)

    def run(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [token for _ in range(50) for token in next_tokens(logits, config, generator).tolist()]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_logprobs_of_equals_log_softmax_worked_by_hand():
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.0], [0.5, 0.7, -1.0, 4.0]])
    chosen, top_ids, top_logprobs = logprobs_of(logits, torch.tensor([2, 3]), top=2)
    for row, values in enumerate(logits.tolist()):
        normaliser = math.log(sum(math.exp(value) for value in values))
        by_hand = [value - normaliser for value in values]
        assert chosen[row].item() == pytest.approx(by_hand[[2, 3][row]], abs=1e-6)
        order = sorted(range(4), key=lambda token: -values[token])[:2]
        assert top_ids[row].tolist() == order
        assert top_logprobs[row].tolist() == pytest.approx([by_hand[token] for token in order], abs=1e-6)
    assert logprobs_of(logits, torch.tensor([0, 0]), top=0)[1].shape == (2, 0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("num_beams", 0),
        ("length_penalty", float("nan")),
    ],
)
def test_out_of_range_settings_are_refused_with_their_field(field, value):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**{field: value})
