"""The one decoder-only Transformer and its configuration."""

from llmkit.model.config import PRESETS, ModelConfig, preset
from llmkit.model.transformer import KVCache, Transformer

__all__ = ["PRESETS", "ModelConfig", "preset", "KVCache", "Transformer"]
