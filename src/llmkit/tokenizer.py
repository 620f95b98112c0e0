"""Text <-> token ids: an llmkit tokenizer saved as Hugging Face files, loaded and used (trained by
:mod:`llmkit.data.tokenizer_training`).

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

import hashlib
from pathlib import Path
from typing import Iterable

import tokenizers

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


class Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` plus its ``tokenizer_config.json``.

    Two kinds of tokenizer, told apart by their special tokens. **llmkit's own** (trained here, or
    imported from a model without a chat format) holds every one of :data:`SPECIAL_TOKENS`: the chat
    format is llmkit's (:mod:`llmkit.chat`), documents end with ``<|endoftext|>``, turns with
    ``<|end|>``. **A model's own** (an imported chat model) keeps its vocabulary unchanged: its chat
    template renders conversations, and its eos token (plus the end-of-turn ids its files name,
    ``eos_token_ids``) ends documents and generation.
    """

    def __init__(self, tokenizer_json: bytes, config: dict):
        # Keep the exact bytes: the sha256 identifies the tokenizer across data dirs and checkpoints.
        self.tokenizer_json = tokenizer_json
        self.config = config
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        found = {token: self.backend.token_to_id(token) for token in SPECIAL_TOKENS}
        self.special_ids = {token: token_id for token, token_id in found.items() if token_id is not None}
        self.llmkit_format = len(self.special_ids) == len(SPECIAL_TOKENS)
        self.kind: str = config.get("kind", "bpe")
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        self.sha256: str = hashlib.sha256(tokenizer_json).hexdigest()
        model_ends = self._model_stop_ids()
        if self.llmkit_format:
            self.eot_id: int = self.special_ids[ENDOFTEXT]
            self.pad_id: int = self.special_ids[PAD]
            self.stop_ids: list[int] = list(dict.fromkeys([self.special_ids[END], self.eot_id, *model_ends]))
        else:
            if not model_ends:
                raise InputError(
                    "a model without llmkit's special tokens needs an end-of-turn token, and "
                    f"{CONFIG_FILE} names no eos_token (or eos_token_ids) in its vocabulary"
                )
            self.stop_ids = model_ends
            self.eot_id = model_ends[0]
            self.pad_id = self._id_of(config.get("pad_token")) or self.eot_id
        self.chat_template: str | None = config.get("chat_template")

    def _id_of(self, token) -> int | None:
        """The id of a token named in the config (a string, or transformers' ``{"content": ...}``)."""
        text = token.get("content") if isinstance(token, dict) else token
        return self.backend.token_to_id(text) if isinstance(text, str) else None

    def _model_stop_ids(self) -> list[int]:
        """The eos the config names first, then every other end-of-turn id it lists (``eos_token_ids``)."""
        ids = [self._id_of(self.config.get("eos_token"))] + [int(i) for i in self.config.get("eos_token_ids") or []]
        return list(dict.fromkeys(i for i in ids if i is not None))

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

        The config gets the bos/eos/pad tokens transformers reads where it names none; its chat template
        is the one it was given (llmkit's, :data:`llmkit.chat.CHAT_TEMPLATE`, for tokenizers llmkit trains)."""
        directory = Path(directory)
        config = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, **self.config}
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
