"""Engine: a model and its tokenizer, generating through one continuous-batching scheduler.

``generate``, ``generate_ids`` and ``stream`` submit requests to the engine's
:class:`~llmkit.infer.scheduler.Scheduler` (KV-cache slots, per-request settings, stop strings, tool calls,
log-probabilities); so do evaluation, RL rollouts and the HTTP server. Requests of one call share decode
steps, and requests from several threads share them too once the scheduler runs in the background.
"""

from __future__ import annotations

from typing import Iterator

import torch

from llmkit.errors import MismatchError
from llmkit.infer.completion import Completion, Tools
from llmkit.infer.quantize import QUANTIZATIONS, Quantization, quantize as quantize_model
from llmkit.infer.runner import ModelRunner
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.scheduler import Request, Scheduler
from llmkit.model.checkpoint import load_model, resolve_checkpoint
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "use_decoding_layout"]


def use_decoding_layout(model: Transformer) -> None:
    """Store every linear weight (out, in) in column-major order, in place (same values, same Parameter
    objects, tied weights stay tied). ``F.linear`` then hands BLAS a contiguous (in, out) matrix, and the
    matrix-vector products of one-token decoding run about 1.3x faster in float32
    (benchmarks/decode_speed.py). Only for models that are not being trained at the same time."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, decoding_layout: bool = False, max_batch_size: int = 16,
                 quantize: Quantization = "none", compile: bool = False):
        """``decoding_layout``: re-lay the weights for faster decoding (see :func:`use_decoding_layout`);
        leave it off when the model is also being trained (PPO/GRPO rollouts). ``max_batch_size``: how
        many requests decode together; more wait for a free slot. ``quantize="int8"`` / ``"int4"``: 8-bit /
        4-bit weights and bfloat16 activations (:mod:`llmkit.infer.quantize`), in place. ``compile``: the
        decoding step as one ``torch.compile`` graph (:mod:`llmkit.infer.runner`; the first step compiles)."""
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize={quantize!r}: must be one of {', '.join(QUANTIZATIONS)}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise MismatchError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
        quantize_model(model, quantize)
        if decoding_layout:
            use_decoding_layout(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.token_embedding.weight.device
        self.runner = ModelRunner(model, compile)
        self.scheduler = Scheduler(self, max_batch_size)

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None, quantize: Quantization = "none",
                        compile: bool = False) -> "Engine":
        """Model and tokenizer from a checkpoint; refuses a tokenizer other than the one it was trained with."""
        model, config = load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.load(resolve_checkpoint(path))
        expected = config.get("tokenizer_sha256")
        if expected and expected != tokenizer.sha256:
            raise MismatchError(f"{path}: tokenizer.json (sha256 {tokenizer.sha256[:12]}) is not the one the model "
                                f"was trained with (sha256 {expected[:12]})")
        return cls(model, tokenizer, decoding_layout=True, quantize=quantize, compile=compile)

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts a new document (unconditional generation)."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    def generate(self, prompts: str | list[str], config: GenerationConfig | list[GenerationConfig] | None = None,
                 tools: Tools | None = None) -> list[Completion]:
        """Complete each prompt (one config for all, or one per prompt); completions in prompt order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.generate_ids([self.encode(prompt) for prompt in prompts], config, tools)

    def generate_ids(self, prompts: list[list[int]], config: GenerationConfig | list[GenerationConfig] | None = None,
                     tools: Tools | None = None) -> list[Completion]:
        """Complete token-id prompts, all decoding together (``max_batch_size`` at a time)."""
        configs = config if isinstance(config, list) else [config or GenerationConfig()] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(configs)} generation configs for {len(prompts)} prompts")
        requests: list[Request] = []
        try:
            for prompt, prompt_config in zip(prompts, configs):
                requests.append(self.scheduler.submit(prompt, prompt_config, tools))
            return [request.result() for request in requests]
        finally:
            for request in requests:
                if request.completion is None:
                    request.cancel()  # a prompt was refused or the caller interrupted: free the others' slots

    def stream(self, prompt: str, config: GenerationConfig | None = None, tools: Tools | None = None) -> Iterator[str]:
        """Text deltas of one completion as they become final (never half a UTF-8 character, never a stop
        string or a prefix of one); closing the iterator early cancels the request."""
        request = self.scheduler.submit(self.encode(prompt), config, tools)
        try:
            for event in request.events():
                if event.text:
                    yield event.text
        finally:
            if request.completion is None:
                request.cancel()
