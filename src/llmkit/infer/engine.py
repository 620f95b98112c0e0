"""Engine: a model and its tokenizer, generating through one continuous-batching scheduler.

``generate``, ``generate_ids`` and ``stream`` submit requests to the engine's
:class:`~llmkit.infer.scheduler.Scheduler` (KV-cache slots, per-request settings, stop strings, tool calls,
log-probabilities); so do evaluation, RL rollouts and the HTTP server. Requests of one call share decode
steps, and requests from several threads share them too once the scheduler runs in the background.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from llmkit.config import check
from llmkit.errors import MismatchError
from llmkit.infer.completion import Completion, Tools
from llmkit.infer.cpu_kernels import TiledLinear, available, decode_attention, one_stream
from llmkit.infer.quantize import QUANTIZATIONS, Int4Linear, Int8Linear, Quantization, quantize_field
from llmkit.infer.quantize import quantize as quantize_model
from llmkit.infer.runner import ModelRunner
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.scheduler import Request, Scheduler
from llmkit.model.checkpoint import DTYPES, load_checkpoint
from llmkit.model.transformer import Attention, Transformer
from llmkit.tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "EngineConfig", "use_decoding_attention", "use_decoding_layout"]


@dataclass
class EngineConfig:
    """How a command that generates or scores loads its model: the ``engine`` section of generate, chat,
    serve, eval and self-improve (``--engine.checkpoint``, ``--engine.quantize``, ...)."""

    checkpoint: str = field(default="runs/sft", metadata={"help": "run directory or checkpoint folder"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "weights' dtype"})
    quantize: Quantization = quantize_field()
    max_batch_size: int = field(
        default=16, metadata={"help": "requests decoding together (KV-cache slots); more wait for a slot"}
    )
    compile: bool = field(
        default=False, metadata={"help": "the decoding step as one torch.compile graph (the first step compiles)"}
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads of torch in this process (default: torch's choice; 1 on a busy shared machine)"},
    )

    def __post_init__(self) -> None:
        check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be at least 1")
        check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be at least 1")


def use_decoding_layout(model: Transformer) -> None:
    """Lay the linear weights out for one-token decoding, in place. bfloat16 and float32 layers on an x86 CPU with
    llmkit's kernels become :class:`~llmkit.infer.cpu_kernels.TiledLinear` (their weights buffers, one after another
    in one region in forward order with the tiles, scales and minimums of int8 and int4 layers:
    :func:`~llmkit.infer.cpu_kernels.one_stream`; a head tied to the embedding gets its own tiled copy); other linear
    weights (out, in) are stored in column-major order (same values,
    same Parameter objects, tied weights stay tied), so ``F.linear`` hands BLAS a contiguous (in, out) matrix and the
    matrix-vector products run about 1.3x faster in float32 (benchmarks/decode_speed.py). Only for models that are
    not being trained at the same time."""
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and TiledLinear.fits(child):
                    setattr(parent, name, TiledLinear(child))
        one_stream([module for module in model.modules() if isinstance(module, (TiledLinear, Int8Linear, Int4Linear))])
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()


def use_decoding_attention(model: Transformer) -> None:
    """Attend one new token per row with llmkit's CPU kernel (:func:`~llmkit.infer.cpu_kernels.decode_attention`)
    where it runs: a float32 or bfloat16 model on an x86 CPU with the kernels, head size a multiple of 8. It reads the
    cache and changes no weight, and serves only eval-mode forwards with a cache, so a model trained between
    rollouts (PPO, GRPO) keeps it."""
    weight = model.token_embedding.weight
    if (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and model.config.head_dim % 8 == 0
        and available()
    ):
        for module in model.modules():
            if isinstance(module, Attention):
                module.decode_attention = decode_attention


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        decoding_layout: bool = False,
        max_batch_size: int = 16,
        quantize: Quantization = "none",
        compile: bool = False,
    ):
        """``decoding_layout``: re-lay the weights for faster decoding (see :func:`use_decoding_layout`);
        leave it off when the model is also being trained (PPO/GRPO rollouts). ``max_batch_size``: how
        many requests decode together; more wait for a free slot. ``quantize="int8"`` / ``"int4"``: 8-bit /
        4-bit weights and bfloat16 activations (:mod:`llmkit.infer.quantize`), in place. ``compile``: the
        decoding step as one ``torch.compile`` graph (:mod:`llmkit.infer.runner`; the first step compiles)."""
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize={quantize!r}: must be one of {', '.join(QUANTIZATIONS)}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise MismatchError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        # Counted before quantizing and tiling make weights buffers: the model's own size, for reports (lm-eval's).
        self.parameter_count = model.num_parameters()
        quantize_model(model, quantize)
        if decoding_layout:
            use_decoding_layout(model)
        use_decoding_attention(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.token_embedding.weight.device
        self.runner = ModelRunner(model, compile)
        self.scheduler = Scheduler(self, max_batch_size)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        """The engine of a checkpoint (loaded by :func:`llmkit.model.checkpoint.load_checkpoint`, which
        refuses a tokenizer other than the one the model was trained with), laid out for decoding."""
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        loaded = load_checkpoint(config.checkpoint, device=config.device, dtype=DTYPES[config.dtype])
        return cls(
            loaded.model,
            loaded.tokenizer,
            decoding_layout=True,
            max_batch_size=config.max_batch_size,
            quantize=config.quantize,
            compile=config.compile,
        )

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts a new document (unconditional generation)."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    def generate(
        self,
        prompts: str | list[str],
        config: GenerationConfig | list[GenerationConfig] | None = None,
        tools: Tools | None = None,
    ) -> list[Completion]:
        """Complete each prompt (one config for all, or one per prompt); completions in prompt order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.generate_ids([self.encode(prompt) for prompt in prompts], config, tools)

    def generate_ids(
        self,
        prompts: list[list[int]],
        config: GenerationConfig | list[GenerationConfig] | None = None,
        tools: Tools | None = None,
    ) -> list[Completion]:
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
