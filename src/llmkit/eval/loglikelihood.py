"""Log-likelihoods of texts under a model: of a continuation given a context, and of whole documents.

Both are sums of :mod:`llmkit.infer.scoring` log-probabilities: evaluation and the lm-evaluation-harness
adapter (:mod:`llmkit.eval.harness`) share one scoring path and agree to the last bit; the engine's echo
log-probs (a whole sequence at once) agree with them to float32 rounding, since a continuation is scored
after its context's cached keys and values (each context once for all its continuations).

Tokenisation follows lm-evaluation-harness's Hugging Face model (``HFLM``: ``TemplateLM._encode_pair``
and ``prefix_token_id``) so numbers are comparable with published ones and with ``lm_eval --model hf``
on an exported checkpoint: trailing whitespace of the context moves to the continuation, then
``context + continuation`` is encoded as one string and split at the length of the encoded context
(a token merging across the boundary is counted with the continuation). Both encodings add what the
tokenizer's own files add (a ``tokenizer.json`` post-processor that prepends bos, as Llama's do; the
``Tokenizer.encode`` of the rest of llmkit never adds a token). An empty context is replaced by the
prefix token (:func:`prefix_token_id`): the tokenizer's bos when it names one, else its end-of-text
(for llmkit's own tokenizers both are ``<|endoftext|>``, the token every training document follows;
for SmolLM2 it is ``<|im_start|>``). Too long a pair loses tokens from the left of the context.

Documents longer than the context window are scored in rolling windows (lm-eval's
``get_rolling_token_windows``): the document (encoded without special tokens) is preceded by the prefix
token, every token is scored exactly once, and each window after the first ends ``stride`` tokens after the previous
one, so consecutive full windows overlap by ``context_length - stride`` tokens of pure context. The default
stride, ``context_length - 1``, makes windows overlap by the single token the next prediction needs
(lm-eval's default); a smaller stride buys every token more context for more compute. A window is
one scored sequence of at most ``context_length`` tokens whose first token is context only, so a
prediction sees at most ``context_length - 1`` tokens, one fewer than a model fed ``context_length``
inputs could use (``score_sequences`` scores tokens inside the sequence it is given).
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from llmkit.config import check
from llmkit.errors import InputError, MismatchError
from llmkit.infer.scoring import TokenScores, score_continuations, score_sequences
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer


def check_compatible(model: Transformer, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MismatchError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")


def score_in_batches(
    model: Transformer, sequences: list[list[int]], scored: list[int], batch_size: int, description: str
) -> list[TokenScores]:
    """``score_sequences`` of the last ``scored[i]`` tokens of every sequence i, shortest first in batches
    (little padding), with a progress bar."""
    check(batch_size > 0, "batch_size", batch_size, "must be positive")
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    results: list[TokenScores | None] = [None] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc=description, unit=" batches", leave=False):
        chosen = order[start : start + batch_size]
        batch = score_sequences(
            model, [sequences[index] for index in chosen], batch_size, scored=[scored[index] for index in chosen]
        )
        for index, scores in zip(chosen, batch):
            results[index] = scores
    return results


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """The token an empty context becomes and every rolling document follows: the tokenizer's bos when its
    config names one in the vocabulary (lm-eval's ``HFLM.prefix_token_id``, which reads the exported
    ``tokenizer_config.json``), else its end-of-text (``eot_id``)."""
    bos = tokenizer.config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    bos_id = tokenizer.backend.token_to_id(bos) if isinstance(bos, str) else None
    return tokenizer.eot_id if bos_id is None else bos_id


def _encode_as_model(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` with the special tokens the tokenizer's own post-processor adds (what ``transformers``'
    ``tokenizer.encode`` gives lm-eval)."""
    return tokenizer.backend.encode(text, add_special_tokens=True).ids


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-evaluation-harness splits them (see the module notes)."""
    if context == "":
        prefix = prefix_token_id(tokenizer)
        continuation_ids = tokenizer.encode(continuation)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = _encode_as_model(tokenizer, context)
    return context_ids, _encode_as_model(tokenizer, context + continuation)[len(context_ids) :]


def loglikelihoods(
    model: Transformer, tokenizer: Tokenizer, requests: list[tuple[str, str]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)``: log p(continuation | context) in nats, and whether greedy
    decoding from the context would produce exactly the continuation's tokens."""
    check_compatible(model, tokenizer)
    window = model.config.context_length
    pairs = []
    for index, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise InputError(f"request {index}: continuation {continuation!r} encodes to no tokens after the context")
        if len(continuation_ids) >= window:
            raise InputError(
                f"request {index}: a continuation of {len(continuation_ids)} tokens leaves no context "
                f"in the model's window of {window} tokens"
            )
        pairs.append((context_ids, continuation_ids))
    # A pair that fits the window is scored after its context, which runs once for all the continuations
    # that share it (a question's choices); a longer one loses tokens from the left of its context.
    whole = [index for index, (context, continuation) in enumerate(pairs) if len(context) + len(continuation) <= window]
    cut = sorted(set(range(len(pairs))) - set(whole))
    scores: list[TokenScores | None] = [None] * len(pairs)
    check(batch_size > 0, "batch_size", batch_size, "must be positive")
    slice_size = batch_size * 4
    for start in tqdm(range(0, len(whole), slice_size), desc="loglikelihood", unit=" slices", leave=False):
        chosen = whole[start : start + slice_size]
        for index, result in zip(chosen, score_continuations(model, [pairs[index] for index in chosen], batch_size)):
            scores[index] = result
    sequences = [(pairs[index][0] + pairs[index][1])[-window:] for index in cut]
    counts = [len(pairs[index][1]) for index in cut]
    for index, result in zip(cut, score_in_batches(model, sequences, counts, batch_size, "loglikelihood (cut)")):
        scores[index] = result
    return [(float(result.logprobs.sum()), bool(result.greedy.all())) for result in scores]


@dataclass(frozen=True)
class Window:
    """Positions ``start:end`` of the prefix-token-led token stream form one scored sequence;
    only its last ``scored`` tokens count (the rest is context already scored by earlier windows)."""

    start: int
    end: int
    scored: int


def rolling_windows(token_count: int, context_length: int, stride: int | None = None) -> list[Window]:
    """Windows over a stream of ``token_count + 1`` positions (the prefix token, then the document) that
    score positions 1..token_count exactly once each, with as much left context as the window allows."""
    stride = context_length - 1 if stride is None else stride
    check(context_length >= 2, "context_length", context_length, "must be at least 2 to score anything")
    check(
        1 <= stride <= context_length - 1,
        "stride",
        stride,
        f"must be in [1, {context_length - 1}] (context_length - 1: windows must overlap by at least one token)",
    )
    if token_count == 0:
        return []
    end = min(context_length, token_count + 1)
    windows = [Window(0, end, end - 1)]
    while end < token_count + 1:
        scored = min(stride, token_count + 1 - end)
        end += scored
        windows.append(Window(max(0, end - context_length), end, scored))
    return windows


def rolling_loglikelihoods(
    model: Transformer, tokenizer: Tokenizer, texts: list[str], stride: int | None = None, batch_size: int = 16
) -> list[tuple[float, int]]:
    """For each document: (total log-likelihood in nats, number of tokens scored), every document on its
    own (no document sees another as context); the windows of all documents share batches."""
    check_compatible(model, tokenizer)
    context_length = model.config.context_length
    prefix = prefix_token_id(tokenizer)
    sequences, owners, scored = [], [], []
    for document, ids in enumerate(tokenizer.encode_batch(list(texts))):
        stream = [prefix] + ids
        for window in rolling_windows(len(ids), context_length, stride):
            sequences.append(stream[window.start : window.end])
            owners.append(document)
            scored.append(window.scored)
    totals = [[0.0, 0] for _ in texts]
    for owner, count, result in zip(
        owners, scored, score_in_batches(model, sequences, scored, batch_size, "rolling loglikelihood")
    ):
        totals[owner][0] += float(result.logprobs.sum())
        totals[owner][1] += count
    return [(total, count) for total, count in totals]


def rolling_loglikelihood(
    model: Transformer, tokenizer: Tokenizer, text: str, stride: int | None = None
) -> tuple[float, int]:
    """(total log-likelihood in nats, tokens) of one document over rolling windows."""
    return rolling_loglikelihoods(model, tokenizer, [text], stride)[0]
