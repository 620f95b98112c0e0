"""Scoring against a naive reference: each sequence alone, unpadded, log-softmax by hand."""

import pytest
import torch
from helpers import tiny_config

from llmkit.infer.scoring import score_continuations, score_sequences
from llmkit.model import Transformer


def test_batched_scores_equal_each_sequence_scored_alone():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    sequences = [[5, 9, 2, 7, 7, 1], [3], [4, 4, 4, 8, 60, 0, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1, 2]]
    scores = score_sequences(model, sequences, batch_size=3, top=4)
    for sequence, score in zip(sequences, scores):
        with torch.no_grad():
            logits = model(torch.tensor([sequence]))[0].double()
        expected = [float(logits[i].log_softmax(-1)[sequence[i + 1]]) for i in range(len(sequence) - 1)]
        assert torch.allclose(score.logprobs.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
        assert score.greedy.tolist() == [int(logits[i].argmax()) == sequence[i + 1] for i in range(len(sequence) - 1)]
        assert score.top_ids.shape == (len(sequence) - 1, 4)
        for i in range(len(sequence) - 1):
            best = logits[i].log_softmax(-1).topk(4)
            assert score.top_ids[i].tolist() == best.indices.tolist()
            assert torch.allclose(score.top_logprobs[i].double(), best.values, atol=1e-5)


def test_scoring_the_last_tokens_equals_the_tail_of_the_whole_scores():
    """Continuations after a context: the head runs on their positions only, with the same numbers."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(logit_softcap=20.0)).eval()
    sequences = [[5, 9, 2, 7, 7, 1], [3, 4], [4, 4, 4, 8, 60, 0, 12, 13, 14], [1, 2, 3]]
    counts = [2, 1, 5, 0]
    whole = score_sequences(model, sequences, batch_size=3, top=2)
    tails = score_sequences(model, sequences, batch_size=3, top=2, scored=counts)
    for all_tokens, tail, count in zip(whole, tails, counts):
        assert tail.logprobs.shape == (count,)
        torch.testing.assert_close(
            tail.logprobs, all_tokens.logprobs[len(all_tokens.logprobs) - count :], atol=1e-5, rtol=0
        )
        assert tail.greedy.tolist() == all_tokens.greedy[len(all_tokens.greedy) - count :].tolist()
        assert tail.top_ids.tolist() == all_tokens.top_ids[len(all_tokens.top_ids) - count :].tolist()
    with pytest.raises(ValueError, match="cannot score its last 2"):
        score_sequences(model, [[1, 2]], scored=[2])


@pytest.mark.parametrize("changes", [dict(), dict(position="alibi"), dict(position="learned", n_kv_head=1)])
def test_continuations_after_a_shared_cached_context_score_as_the_whole_sequences(changes):
    """Choices sharing their question, one-token contexts, and pairs that fill the 16-token window: each
    continuation scored after its context's cached keys and values equals scoring context + continuation."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**changes)).eval()
    question, other = [5, 9, 2, 7, 7], [3, 4, 4, 8, 60, 0, 12, 13, 14, 15]
    pairs = [(question, [1]), (question, [8, 9, 10]), (other, [2, 3, 4, 5, 6]), (question, [11, 12])]
    pairs += [([6], [7, 8]), (other, [1, 2, 3, 4, 5, 6]), ([6], [9]), (list(range(1, 15)), [20, 21])]
    expected = score_sequences(
        model, [context + continuation for context, continuation in pairs], scored=[len(c) for _, c in pairs]
    )
    for batch_size in (1, 3, 16):  # every pair alone, batches split mid-question and by the window, one batch
        for (_, continuation), ours, theirs in zip(
            pairs, score_continuations(model, pairs, batch_size=batch_size), expected
        ):
            assert ours.logprobs.shape == (len(continuation),)
            torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-5, rtol=0)
            assert ours.greedy.tolist() == theirs.greedy.tolist()
    with pytest.raises(ValueError, match="pair 0: 0 context"):
        score_continuations(model, [([], [1])])
    with pytest.raises(ValueError, match="context_length=16"):
        score_continuations(model, [(list(range(10)), list(range(7)))])


def test_a_sequence_longer_than_the_context_is_refused():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="context_length=16"):
        score_sequences(model, [[1] * 17])
