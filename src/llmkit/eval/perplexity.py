"""Perplexity and bits per byte of documents, over rolling windows.

Each document is scored on its own, preceded by the prefix token (the tokenizer's bos, else end-of-text;
:func:`llmkit.eval.loglikelihood.prefix_token_id`), every token exactly once
(:func:`llmkit.eval.loglikelihood.rolling_loglikelihoods`). Three views of the same total:

* nats per token and perplexity = exp(nats per token): comparable only between models that share a
  tokenizer;
* bits per UTF-8 byte = total nats / (ln 2 * bytes): independent of the tokenizer, so models with
  different vocabularies compare fairly (the metric of The Pile, Gao et al. 2020, and lm-eval's
  ``bits_per_byte``).
"""

from __future__ import annotations

import math
from pathlib import Path

from llmkit.errors import InputError
from llmkit.eval.loglikelihood import rolling_loglikelihoods
from llmkit.io import iter_jsonl
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer


def load_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a ``.jsonl``/``.jsonl.gz`` file (one per record, from ``text_field``), or a whole
    text file as one document."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for line_number, record in iter_jsonl(path):
            if not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{line_number}: field '{text_field}' missing or not a string")
            texts.append(record[text_field])
        return texts
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None


def evaluate_perplexity(
    model: Transformer, tokenizer: Tokenizer, texts: list[str], stride: int | None = None, batch_size: int = 16
) -> dict:
    """Corpus-level nats per token, perplexity and bits per byte of ``texts`` (totals over all documents)."""
    texts = list(texts)
    results = rolling_loglikelihoods(model, tokenizer, texts, stride, batch_size)
    total_logprob = sum(logprob for logprob, _ in results)
    tokens = sum(count for _, count in results)
    if tokens == 0:
        raise InputError("perplexity needs at least one non-empty document")
    byte_count = sum(len(text.encode("utf-8")) for text in texts)
    nats_per_token = -total_logprob / tokens
    return {
        "nats_per_token": nats_per_token,
        "perplexity": math.exp(nats_per_token),
        "bits_per_byte": -total_logprob / (math.log(2) * byte_count),
        "tokens": tokens,
        "bytes": byte_count,
        "documents": len(texts),
    }
