"""The one inference engine: KV-cached decoding, sampling, stop conditions, streaming."""

from llmkit.infer.engine import Completion, Engine
from llmkit.infer.sampling import GenerationConfig

__all__ = ["Completion", "Engine", "GenerationConfig"]
