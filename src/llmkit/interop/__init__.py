"""Interoperability: llmkit checkpoints to and from Hugging Face directories, and to GGUF for llama.cpp.

``llmkit export`` and ``llmkit import`` run :func:`export_checkpoint` and :func:`import_checkpoint`;
the work is in :mod:`.hf` (both directions) and :mod:`.gguf` (export only). Only layouts that a
Hugging Face or llama.cpp architecture computes exactly are converted; everything else is refused with
an error naming the config field and value (see :mod:`.layouts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.interop.hf import export_hf, import_hf

__all__ = ["ExportConfig", "ImportConfig", "export_checkpoint", "import_checkpoint", "export_hf", "import_hf"]


@dataclass
class ExportConfig:
    """``llmkit export``: a checkpoint as a Hugging Face directory or a GGUF file."""

    checkpoint: str = field(default="runs/base", metadata={"help": "run directory or checkpoint folder"})
    format: Literal["hf", "gguf"] = field(default="hf", metadata={"help": "hf: a Hugging Face directory; gguf: one file for llama.cpp"})
    out: str = field(default="runs/export", metadata={"help": "output directory (hf) or file (gguf)"})
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(
        default=None, metadata={"help": "weight precision (default: as stored for hf, float32 for gguf; gguf has no bfloat16)"})

    def __post_init__(self) -> None:
        check(self.format in ("hf", "gguf"), "format", self.format, "must be 'hf' or 'gguf'")
        check(self.dtype in (None, "float32", "float16", "bfloat16"), "dtype", self.dtype, "must be float32, float16 or bfloat16")
        check(not (self.format == "gguf" and self.dtype == "bfloat16"), "dtype", self.dtype, "GGUF export writes float32 or float16")


@dataclass
class ImportConfig:
    """``llmkit import``: a local Hugging Face model directory as an llmkit checkpoint."""

    source: str = field(default="", metadata={"help": "local Hugging Face directory (config.json, model.safetensors, tokenizer)"})
    out: str = field(default="runs/imported", metadata={"help": "output checkpoint directory"})
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(
        default="float32", metadata={"help": "weight precision of the checkpoint (None keeps the source's)"})

    def __post_init__(self) -> None:
        check(bool(self.source), "source", self.source, "give the Hugging Face model directory")
        check(self.dtype in (None, "float32", "float16", "bfloat16"), "dtype", self.dtype, "must be float32, float16 or bfloat16")


def export_checkpoint(config: ExportConfig) -> dict:
    if config.format == "hf":
        return export_hf(config.checkpoint, config.out, config.dtype)
    try:  # imported on use: only GGUF export needs the optional package
        from llmkit.interop.gguf import export_gguf
    except ImportError as error:
        raise ConfigError("format", "gguf", f"needs the 'gguf' package: pip install 'llmkit[interop]' ({error})") from None
    return export_gguf(config.checkpoint, config.out, config.dtype)


def import_checkpoint(config: ImportConfig) -> dict:
    return import_hf(config.source, config.out, config.dtype)
