"""The one inference engine: a continuous-batching scheduler over KV-cache slots, sampling, stop
conditions, tool calls, log-probabilities, streaming."""

from llmkit.infer.completion import Completion
from llmkit.infer.engine import Engine, EngineConfig
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.scheduler import Event, Request, Scheduler

__all__ = ["Completion", "Engine", "EngineConfig", "Event", "GenerationConfig", "Request", "Scheduler"]
