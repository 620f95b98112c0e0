"""Tokenizer files across the llmkit / Hugging Face boundary.

An llmkit tokenizer is already a Hugging Face ``tokenizer.json``; export copies it byte for byte and
writes the ``tokenizer_config.json`` and ``generation_config.json`` that ``AutoTokenizer`` and
``generate`` read. Import goes the other way. A model with a chat format of its own (a chat template)
keeps its tokenizer and vocabulary unchanged: every stage renders its conversations with that template
and stops at its end-of-turn ids (:class:`llmkit.tokenizer.Tokenizer`). A model without one gets
llmkit's chat format: its special tokens (``<|endoftext|>``, ``<|pad|>``, the chat roles, ...) are
added at the end of the vocabulary (the source's own ids stay as they are), and :func:`grow_embeddings`
gives them the mean of the existing embedding rows, which keeps the new tokens' initial logits near
the average instead of random (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language
Models"), ready to be learned by fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
import torch

from llmkit import __version__
from llmkit.chat import CHAT_TEMPLATE
from llmkit.errors import InputError
from llmkit.io import read_json
from llmkit.model.config import ModelConfig
from llmkit.tokenizer import CONFIG_FILE, ENDOFTEXT, PAD, SPECIAL_TOKENS, TOKENIZER_FILE, UNK, Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
LLMKIT_DEFAULTS = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, "unk_token": UNK}


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's own template, else llmkit's chat format (tokenizers saved before it existed)."""
    return tokenizer.config.get("chat_template") or CHAT_TEMPLATE


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """bos/eos/pad/unk token strings: the ones the tokenizer config names, llmkit's otherwise."""
    return {role: tokenizer.config.get(role) or default for role, default in LLMKIT_DEFAULTS.items()}


def hf_tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict:
    """``tokenizer_config.json`` for ``AutoTokenizer``: llmkit's own keys kept, the Hugging Face ones set."""
    return {
        **tokenizer.config,
        **special_tokens(tokenizer),
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers would otherwise "clean up" spaces before punctuation and break round trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": chat_template(tokenizer),
    }


def generation_token_ids(tokenizer: Tokenizer) -> dict:
    """bos, pad and the end-of-generation ids: the declared eos plus the ones llmkit's engine stops at."""
    ids = {role: tokenizer.backend.token_to_id(token) for role, token in special_tokens(tokenizer).items()}
    ends = [ids["eos_token"], *tokenizer.stop_ids]
    return {"bos": ids["bos_token"], "eos": [i for i in dict.fromkeys(ends) if i is not None], "pad": ids["pad_token"]}


def _token_string(value) -> str | None:
    # Older transformers save special tokens as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _load_backend(directory: Path) -> tuple[tokenizers.Tokenizer, bytes]:
    """The source's fast tokenizer and its file's bytes."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(
            f"{path}: file not found (llmkit imports fast tokenizers; transformers writes one with "
            "AutoTokenizer.from_pretrained(directory).save_pretrained(directory))"
        )
    data = path.read_bytes()
    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8")), data
    except Exception as error:  # the Rust parser raises a plain Exception
        raise InputError(f"{path}: not a valid tokenizer.json ({error})") from None


def import_tokenizer(directory: Path) -> tuple[Tokenizer, list[str], int]:
    """The source's tokenizer (:func:`imported_tokenizer`); its end-of-turn ids are the eos of its
    ``generation_config.json`` (one id or a list), as ``generate`` reads them."""
    backend, original = _load_backend(directory)
    source_config = read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    template = source_config.get("chat_template")
    if not template and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    generation_path = directory / "generation_config.json"
    ends = read_json(generation_path).get("eos_token_id") if generation_path.is_file() else None
    ends = [ends] if isinstance(ends, int) else list(ends or [])
    return imported_tokenizer(backend, original, {**source_config, "chat_template": template}, str(directory), ends)


def imported_tokenizer(
    backend: tokenizers.Tokenizer,
    original: bytes,
    source_config: dict,
    source: str,
    end_of_turn_ids: list[int],
    extra: dict | None = None,
) -> tuple[Tokenizer, list[str], int]:
    """A :class:`Tokenizer` from a foreign ``backend`` (whose file is ``original``) and the source's
    tokenizer config (bos/eos/pad/unk tokens, chat template, ``kind``, ``clean_up_tokenization_spaces``).
    With a chat template the vocabulary stays the source's and ``end_of_turn_ids`` (besides eos) end
    generation; without one, llmkit's missing special tokens are added after the source's vocabulary.
    ``extra`` keys go into the config as they are. Also returns the added tokens and the source's
    vocabulary size."""
    source_size = backend.get_vocab_size(with_added_tokens=True)
    own_format = bool(source_config.get("chat_template"))
    missing = [] if own_format else [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
    if missing:
        backend.add_special_tokens(missing)
    tokenizer_json = backend.to_str().encode("utf-8") if missing else original  # unchanged: same sha256
    roles = {role: _token_string(source_config.get(role)) for role in SPECIAL_ROLES}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "kind": source_config.get("kind") or type(backend.model).__name__.lower(),  # "bpe", "unigram", ...
        "vocab_size": backend.get_vocab_size(with_added_tokens=True),
        "special_token_ids": {
            token: backend.token_to_id(token) for token in SPECIAL_TOKENS if backend.token_to_id(token) is not None
        },
        # The source's own bos/eos/... stay what its chat template and users expect.
        **(
            {role: token for role, token in roles.items() if token}
            if own_format
            else {role: token or LLMKIT_DEFAULTS[role] for role, token in roles.items()}
        ),
        "clean_up_tokenization_spaces": source_config.get("clean_up_tokenization_spaces", False),
        # A model without a chat format of its own speaks llmkit's, through the tokens added above.
        "chat_template": source_config.get("chat_template") or CHAT_TEMPLATE,
        "source": source,
        "added_special_tokens": missing,
        **({"eos_token_ids": list(dict.fromkeys(end_of_turn_ids))} if own_format and end_of_turn_ids else {}),
        **(extra or {}),
        "llmkit_version": __version__,
    }
    return Tokenizer(tokenizer_json, config), missing, source_size


def grow_embeddings(
    state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer, added: list[str], source_size: int
) -> ModelConfig:
    """Make room for the tokenizer's ids and set the rows of the ``added`` tokens to the mean of the
    source tokens' rows (in place in ``state``); return the config with the new vocabulary size."""
    vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    ids = torch.tensor([tokenizer.special_ids[token] for token in added], dtype=torch.long)
    names = ["token_embedding.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for name in names:
        weight = state[name]
        # Rows past the source tokenizer are padding that was never trained; they do not enter the mean.
        mean = weight[: min(source_size, weight.shape[0])].float().mean(dim=0).to(weight.dtype)
        grown = torch.cat([weight, mean.expand(vocab_size - weight.shape[0], -1)])
        grown[ids] = mean
        state[name] = grown
    return config.replace(vocab_size=vocab_size)
