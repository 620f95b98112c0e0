"""Text <-> token ids: train a tokenizer, save it as Hugging Face files, load and use it.

Two kinds:

* ``bpe``: byte-level BPE (GPT-2 style). Text is first mapped to its UTF-8
  bytes, every one of the 256 bytes is in the vocabulary, so any string
  round-trips exactly (``decode(encode(text)) == text``).
* ``char``: one token per character seen in training (capped at the vocabulary
  size, most frequent first). A character outside the vocabulary encodes to
  ``<|unk|>`` and decodes as that literal string, so char mode is lossless only
  on text made of known characters.

Both reserve the same special tokens at the same ids (``SPECIAL_TOKENS`` order,
``<|endoftext|>`` = 0) so the chat and tool stages need no vocabulary change.
Special-token strings that appear in input text are encoded as their ids (the
Hugging Face default), and ``decode`` keeps them unless asked to skip them.

A tokenizer directory holds ``tokenizer.json`` (loadable unchanged by
``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``)
and ``tokenizer_config.json`` (kind, special ids, chat template, statistics;
``transformers.AutoTokenizer`` reads it too).
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from llmkit import __version__
from llmkit.config import check
from llmkit.data.sources import iter_documents, is_held_out
from llmkit.errors import InputError
from llmkit.io import atomic_write_bytes, atomic_write_json, read_json

ENDOFTEXT = "<|endoftext|>"  # document boundary; also the bos/eos token
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of a chat turn
TOOL_CALL = "<|tool_call|>"
TOOL_RESULT = "<|tool_result|>"
UNK = "<|unk|>"  # a character the char tokenizer never saw; byte-level BPE never emits it
RESERVED = [f"<|reserved_{index}|>" for index in range(8)]
# The position in this list is the token's id in every llmkit tokenizer.
SPECIAL_TOKENS = [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT, UNK, *RESERVED]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass
class TokenizerConfig:
    source: str = field(default="stdlib", metadata={"help": "text source(s), comma-separated: 'stdlib', a file, a folder, .jsonl or .parquet"})
    out: str = field(default="runs/tokenizer", metadata={"help": "output directory for tokenizer.json and tokenizer_config.json"})
    kind: Literal["bpe", "char"] = field(default="bpe", metadata={"help": "byte-level BPE or character-level"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size including special tokens (an upper bound for char)"})
    min_frequency: int = field(default=2, metadata={"help": "BPE: a pair must occur this often to be merged"})
    text_field: str = field(default="text", metadata={"help": "JSONL key / Parquet column holding the text"})
    max_bytes: int | None = field(default=None, metadata={"help": "read at most this many UTF-8 bytes of text (quick runs)"})
    held_out_fraction: float = field(default=0.01, metadata={"help": "fraction of documents held out to measure bytes/token"})

    def __post_init__(self) -> None:
        check(self.kind in ("bpe", "char"), "kind", self.kind, "must be 'bpe' or 'char'")
        # BPE needs every byte plus the specials before it can merge anything.
        minimum = 256 + len(SPECIAL_TOKENS) if self.kind == "bpe" else len(SPECIAL_TOKENS) + 1
        check(self.vocab_size >= minimum, "vocab_size", self.vocab_size, f"must be at least {minimum} for kind '{self.kind}'")
        check(self.min_frequency >= 1, "min_frequency", self.min_frequency, "must be at least 1")
        check(self.max_bytes is None or self.max_bytes > 0, "max_bytes", self.max_bytes, "must be positive")
        check(0 <= self.held_out_fraction < 1, "held_out_fraction", self.held_out_fraction, "must be in [0, 1)")


class Tokenizer:
    """An llmkit tokenizer: a Hugging Face ``tokenizers.Tokenizer`` plus llmkit's metadata."""

    def __init__(self, tokenizer_json: bytes, config: dict):
        # Keep the exact bytes: the sha256 identifies the tokenizer across data dirs and checkpoints.
        self.tokenizer_json = tokenizer_json
        self.config = config
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.special_ids = {token: self.backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, token_id in self.special_ids.items() if token_id is None]
        if missing:
            raise InputError(f"tokenizer lacks the reserved special tokens {', '.join(missing)}")
        self.kind: str = config.get("kind", "bpe")
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = self.special_ids[ENDOFTEXT]
        self.pad_id: int = self.special_ids[PAD]
        self.sha256: str = hashlib.sha256(tokenizer_json).hexdigest()

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        tokenizer_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
        if not tokenizer_path.is_file():
            raise InputError(f"{tokenizer_path}: file not found (train one with 'llmkit tokenizer train')")
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise InputError(f"{config_path}: expected a JSON object")
        try:
            return cls(tokenizer_path.read_bytes(), config)
        except InputError as error:
            raise InputError(f"{tokenizer_path}: {error}") from None
        except Exception as error:  # the Rust parser raises a plain Exception on a corrupt file
            raise InputError(f"{tokenizer_path}: not a valid tokenizer.json ({error})") from None

    def save(self, directory: str | Path) -> None:
        """Write both files into ``directory`` (e.g. a checkpoint), byte-identical so the sha256 is kept.

        A config without a chat template gets llmkit's (``llmkit.chat.CHAT_TEMPLATE``), and the
        bos/eos/pad tokens transformers reads, so ``apply_chat_template`` renders llmkit's chat format."""
        from llmkit.chat import CHAT_TEMPLATE  # llmkit.chat imports this module

        directory = Path(directory)
        config = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, **self.config}
        config["chat_template"] = config.get("chat_template") or CHAT_TEMPLATE
        atomic_write_bytes(directory / TOKENIZER_FILE, self.tokenizer_json)
        atomic_write_json(directory / CONFIG_FILE, config)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression: UTF-8 bytes of ``texts`` divided by the number of tokens they encode to."""
        texts = list(texts)
        total_bytes = sum(len(text.encode("utf-8")) for text in texts)
        total_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        if total_tokens == 0:
            raise InputError("bytes_per_token needs at least one non-empty text")
        return total_bytes / total_tokens


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
    held_out_ids = [token_id for encoding in backend.encode_batch(held_out, add_special_tokens=False) for token_id in encoding.ids]
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
        # Vocabulary coverage: how much of the vocabulary the held-out text uses, and how often char mode fell back to <|unk|>.
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
