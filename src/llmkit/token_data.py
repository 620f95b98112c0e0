"""The token-data format that the data stage writes and every training stage reads.

A data directory holds ``train_000.bin``, ``train_001.bin``, ... and ``val_000.bin``, ...: flat
little-endian ``uint16`` (``uint32`` when the vocabulary does not fit) token ids, every document
followed by the ``<|endoftext|>`` id, cut into shards (a document may span two), a copy of the
tokenizer in ``tokenizer/``, and ``manifest.json`` describing them. This module reads it (and names
its constants); :mod:`llmkit.data.shards` writes it. It sits below the training loop, so that the
loop and the stages depend on a format, not on the data stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit.errors import InputError, MismatchError
from llmkit.io import read_json
from llmkit.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FOLDER = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id below ``vocab_size``, little-endian on every machine."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def load_manifest(directory: str | Path) -> dict:
    """Read and check ``manifest.json``: every shard must exist with exactly the size it declares."""
    path = Path(directory) / MANIFEST_FILE
    manifest = read_json(path)
    try:
        if manifest["format_version"] != FORMAT_VERSION:
            raise InputError(
                f"{path}: format_version {manifest['format_version']} is not {FORMAT_VERSION}; prepare the data again"
            )
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split, statistics in manifest["splits"].items():
            for shard in statistics["shards"]:
                shard_path = Path(directory) / shard["file"]
                if not shard_path.is_file():
                    raise InputError(f"{shard_path}: shard listed in {path} is missing")
                expected = shard["tokens"] * itemsize
                if shard_path.stat().st_size != expected:
                    raise InputError(
                        f"{shard_path}: {shard_path.stat().st_size} bytes, "
                        f"{path} says {expected} ({shard['tokens']} tokens)"
                    )
    except (KeyError, TypeError) as error:
        raise InputError(f"{path}: malformed manifest (missing or wrong field {error})") from None
    return manifest


def open_split(directory: str | Path, split: str) -> list[np.memmap]:
    """Read-only memmaps of every shard of ``split``, in order."""
    manifest = load_manifest(directory)
    if split not in manifest["splits"]:
        raise InputError(
            f"{Path(directory) / MANIFEST_FILE}: no split '{split}' (have {', '.join(manifest['splits'])})"
        )
    shards = manifest["splits"][split]["shards"]
    if not any(shard["tokens"] for shard in shards):
        raise InputError(
            f"{Path(directory) / MANIFEST_FILE}: split '{split}' has no tokens (corpus too small or val_fraction 0?)"
        )
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return [
        np.memmap(Path(directory) / shard["file"], dtype=dtype, mode="r", shape=(shard["tokens"],)) for shard in shards
    ]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer a data directory was made with (its own copy), checked against the manifest."""
    manifest = load_manifest(directory)
    tokenizer = Tokenizer.load(Path(directory) / manifest["tokenizer"]["path"])
    check_tokenizer(manifest, tokenizer)
    return tokenizer


def check_tokenizer(manifest: dict, tokenizer: Tokenizer) -> None:
    """Refuse to train on data tokenized by a different tokenizer."""
    data_sha256, data_vocab = manifest["tokenizer"]["sha256"], manifest["vocab_size"]
    if data_sha256 != tokenizer.sha256 or data_vocab != tokenizer.vocab_size:
        raise MismatchError(
            f"data was tokenized with tokenizer sha256 {data_sha256[:12]} "
            f"(vocab {data_vocab}, {manifest['tokenizer']['path']}), "
            f"but the tokenizer given is sha256 {tokenizer.sha256[:12]} (vocab {tokenizer.vocab_size})"
        )
