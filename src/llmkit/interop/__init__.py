"""Interoperability: llmkit checkpoints to and from Hugging Face directories, to GGUF for llama.cpp, and
sharded checkpoints to one ``model.safetensors``.

``llmkit export`` and ``llmkit import`` run :func:`export_checkpoint` and :func:`import_checkpoint`;
the work is in :mod:`.hf` (both directions), :mod:`.gguf` (export), :mod:`.gguf_import` (import) and
:mod:`.consolidate` (export to llmkit's full format).
Only layouts that a Hugging Face or llama.cpp architecture computes exactly are converted; everything
else is refused with an error naming the config field (or GGUF key) and value (see :mod:`.layouts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.interop.consolidate import export_full
from llmkit.interop.hf import export_hf, import_hf

__all__ = [
    "ExportConfig",
    "ImportConfig",
    "export_checkpoint",
    "import_checkpoint",
    "export_full",
    "export_hf",
    "import_hf",
]


@dataclass
class ExportConfig:
    """``llmkit export``: a checkpoint as a Hugging Face directory, a GGUF file or an llmkit checkpoint folder
    of the full format (a sharded checkpoint consolidated)."""

    checkpoint: str = field(default="runs/base", metadata={"help": "run directory or checkpoint folder"})
    format: Literal["hf", "gguf", "llmkit"] = field(
        default="hf",
        metadata={
            "help": "hf: a Hugging Face directory; gguf: one file for llama.cpp; llmkit: a checkpoint folder "
            "with one model.safetensors (a sharded checkpoint consolidated)"
        },
    )
    out: str = field(default="runs/export", metadata={"help": "output directory (hf) or file (gguf)"})
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(
        default=None,
        metadata={"help": "weight precision (default: as stored for hf, float32 for gguf; gguf has no bfloat16)"},
    )

    def __post_init__(self) -> None:
        check(self.format in ("hf", "gguf", "llmkit"), "format", self.format, "must be 'hf', 'gguf' or 'llmkit'")
        check(
            self.dtype in (None, "float32", "float16", "bfloat16"),
            "dtype",
            self.dtype,
            "must be float32, float16 or bfloat16",
        )
        check(
            not (self.format == "gguf" and self.dtype == "bfloat16"),
            "dtype",
            self.dtype,
            "GGUF export writes float32 or float16",
        )


@dataclass
class ImportConfig:
    """``llmkit import``: a local Hugging Face model directory or a GGUF file as an llmkit checkpoint."""

    source: str = field(
        default="",
        metadata={
            "help": "local Hugging Face directory (config.json, model.safetensors, "
            "tokenizer) or a GGUF file (llama, qwen2, qwen3, gpt2)"
        },
    )
    out: str = field(default="runs/imported", metadata={"help": "output checkpoint directory"})
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(
        default="float32",
        metadata={
            "help": "weight precision of the checkpoint (None keeps the source's; "
            "float32 for GGUF, whose tensors are dequantized)"
        },
    )

    def __post_init__(self) -> None:
        check(bool(self.source), "source", self.source, "give the Hugging Face model directory or GGUF file")
        check(
            self.dtype in (None, "float32", "float16", "bfloat16"),
            "dtype",
            self.dtype,
            "must be float32, float16 or bfloat16",
        )


def export_checkpoint(config: ExportConfig) -> dict:
    if config.format == "hf":
        return export_hf(config.checkpoint, config.out, config.dtype)
    if config.format == "llmkit":
        return export_full(config.checkpoint, config.out, config.dtype)
    try:  # imported on use: only GGUF export needs the optional package
        from llmkit.interop.gguf import export_gguf
    except ImportError as error:
        raise ConfigError(
            "format", "gguf", f"needs the 'gguf' package: pip install 'llmkit[interop]' ({error})"
        ) from None
    return export_gguf(config.checkpoint, config.out, config.dtype)


def import_checkpoint(config: ImportConfig) -> dict:
    """A file (GGUF: checked by its magic) or a name ending in .gguf is read as GGUF; a directory as Hugging Face."""
    source = Path(config.source)
    if not (source.is_file() or source.suffix.lower() == ".gguf"):
        return import_hf(source, config.out, config.dtype)
    try:  # imported on use: only GGUF needs the optional package
        from llmkit.interop.gguf_import import import_gguf
    except ImportError as error:
        raise ConfigError(
            "source", config.source, f"a GGUF file needs the 'gguf' package: pip install 'llmkit[interop]' ({error})"
        ) from None
    return import_gguf(source, config.out, config.dtype)
