"""Shared pieces of the reward-model and DPO tests: a character tokenizer, a tiny base checkpoint and
an easy synthetic preference (the chosen reply repeats the prompt's digit, the rejected one does not)."""

import json
import random
import string
from pathlib import Path

import helpers
import torch
from helpers import tiny_config

from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.tokenizer import Tokenizer


def char_tokenizer(folder: Path) -> Tokenizer:
    return helpers.char_tokenizer(folder, (string.ascii_letters + string.digits + string.punctuation + " \n") * 20, 200)


def write_base(folder: Path, tokenizer: Tokenizer, seed: int = 0, **changes) -> Path:
    """An untrained tiny language-model checkpoint with the tokenizer."""
    torch.manual_seed(seed)
    options = dict(vocab_size=tokenizer.vocab_size, context_length=32, n_embd=32, tie_embeddings=False)
    model = Transformer(tiny_config(**{**options, **changes}))
    folder.mkdir(parents=True, exist_ok=True)
    write_model(folder, model.state_dict(), model.config, {"stage": "pretrain", "tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(folder)
    return folder


def repeat_digit_pairs(count: int, seed: int) -> list[dict]:
    """``{"prompt": "Repeat 3", "chosen": "3", "rejected": "7"}`` rows with random digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        right, wrong = rng.sample(string.digits, 2)
        rows.append({"prompt": f"Repeat {right}", "chosen": right, "rejected": wrong})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
