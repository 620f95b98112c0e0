"""Train a tokenizer on a corpus (``llmkit tokenizer train``): the data stage's step that turns text
sources into the :class:`llmkit.tokenizer.Tokenizer` every later stage loads.

A fraction of the documents (by a hash of their id, as the data split) is held out to measure
compression (bytes per token) and vocabulary coverage honestly.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from llmkit import __version__
from llmkit.chat import CHAT_TEMPLATE
from llmkit.config import check
from llmkit.data.sources import is_held_out, iter_documents
from llmkit.errors import InputError
from llmkit.tokenizer import ENDOFTEXT, PAD, SPECIAL_TOKENS, UNK, Tokenizer


@dataclass
class TokenizerConfig:
    source: str = field(
        default="stdlib",
        metadata={"help": "text source(s), comma-separated: 'stdlib', a file, a folder, .jsonl or .parquet"},
    )
    out: str = field(
        default="runs/tokenizer", metadata={"help": "output directory for tokenizer.json and tokenizer_config.json"}
    )
    kind: Literal["bpe", "char"] = field(default="bpe", metadata={"help": "byte-level BPE or character-level"})
    vocab_size: int = field(
        default=8192, metadata={"help": "vocabulary size including special tokens (an upper bound for char)"}
    )
    min_frequency: int = field(default=2, metadata={"help": "BPE: a pair must occur this often to be merged"})
    text_field: str = field(default="text", metadata={"help": "JSONL key / Parquet column holding the text"})
    max_bytes: int | None = field(
        default=None, metadata={"help": "read at most this many UTF-8 bytes of text (quick runs)"}
    )
    held_out_fraction: float = field(
        default=0.01, metadata={"help": "fraction of documents held out to measure bytes/token"}
    )

    def __post_init__(self) -> None:
        check(self.kind in ("bpe", "char"), "kind", self.kind, "must be 'bpe' or 'char'")
        # BPE needs every byte plus the specials before it can merge anything.
        minimum = 256 + len(SPECIAL_TOKENS) if self.kind == "bpe" else len(SPECIAL_TOKENS) + 1
        check(
            self.vocab_size >= minimum,
            "vocab_size",
            self.vocab_size,
            f"must be at least {minimum} for kind '{self.kind}'",
        )
        check(self.min_frequency >= 1, "min_frequency", self.min_frequency, "must be at least 1")
        check(self.max_bytes is None or self.max_bytes > 0, "max_bytes", self.max_bytes, "must be positive")
        check(0 <= self.held_out_fraction < 1, "held_out_fraction", self.held_out_fraction, "must be in [0, 1)")


def train_tokenizer(config: TokenizerConfig) -> dict:
    """Train on ``config.source`` minus a held-out set, write ``config.out``, return a summary."""
    start = time.perf_counter()
    held_out: list[str] = []
    training = {"documents": 0, "bytes": 0}

    def training_texts() -> Iterator[str]:
        documents = iter_documents(config.source, config.text_field, config.max_bytes)
        for document in tqdm(documents, desc="tokenizer: reading", unit=" docs"):
            if is_held_out(document.id, config.held_out_fraction):
                held_out.append(document.text)
                continue
            training["documents"] += 1
            training["bytes"] += len(document.text.encode("utf-8"))
            yield document.text

    if config.kind == "bpe":
        backend = _train_bpe(training_texts(), config)
    else:
        backend = _train_char(training_texts(), config)
    if training["documents"] == 0:
        raise InputError(f"{config.source}: every document fell in the held-out set; lower held_out_fraction")

    special_ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    held_out_bytes = sum(len(text.encode("utf-8")) for text in held_out)
    held_out_ids = [
        token_id for encoding in backend.encode_batch(held_out, add_special_tokens=False) for token_id in encoding.ids
    ]
    # No held-out document (tiny corpus): there is nothing honest to report.
    bytes_per_token = held_out_bytes / len(held_out_ids) if held_out_ids else None
    tokenizer_config = {
        # Lets transformers.AutoTokenizer.from_pretrained load the directory as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "kind": config.kind,
        "vocab_size": vocab_size,
        "special_token_ids": special_ids,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "unk_token": UNK,
        # transformers would otherwise "clean up" spaces before punctuation and break round trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,  # transformers' apply_chat_template renders llmkit's chat format
        "source": config.source,
        "bytes_per_token": bytes_per_token,
        "llmkit_version": __version__,
    }
    tokenizer = Tokenizer(backend.to_str().encode("utf-8"), tokenizer_config)
    tokenizer.save(config.out)
    return {
        "out": str(config.out),
        "kind": config.kind,
        "vocab_size": vocab_size,
        "training_documents": training["documents"],
        "training_bytes": training["bytes"],
        "held_out_documents": len(held_out),
        "held_out_bytes": held_out_bytes,
        "bytes_per_token": bytes_per_token,
        # Vocabulary coverage: how much of the vocabulary the held-out text uses, and how often char mode fell back to
        # <|unk|>.
        "held_out_vocab_used": len(set(held_out_ids)) / vocab_size,
        "held_out_unknown_tokens": held_out_ids.count(special_ids[UNK]),
        "sha256": tokenizer.sha256,
        "seconds": time.perf_counter() - start,
    }


def _train_bpe(texts: Iterator[str], config: TokenizerConfig) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    # GPT-2's regex split, no leading space added: the text is kept exactly as given.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,  # given first, so they take ids 0..len-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones: lossless
        show_progress=False,  # the tqdm bar over documents already reports progress
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _train_char(texts: Iterator[str], config: TokenizerConfig) -> tokenizers.Tokenizer:
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text)
    capacity = config.vocab_size - len(SPECIAL_TOKENS)
    # Over capacity, keep the most frequent characters (ties by code point) so rare ones become <|unk|>.
    kept = sorted(counts, key=lambda character: (-counts[character], character))[:capacity]
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(kept):
        vocabulary[character] = len(vocabulary)
    # A BPE model with no merges yields exactly one token per known character.
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    backend.add_special_tokens(SPECIAL_TOKENS)
    return backend
