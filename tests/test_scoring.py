"""Scoring against a naive reference: each sequence alone, unpadded, log-softmax by hand."""

import pytest
import torch
from helpers import tiny_config

from llmkit.infer.scoring import score_sequences
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


def test_a_sequence_longer_than_the_context_is_refused():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="context_length=16"):
        score_sequences(model, [[1] * 17])
