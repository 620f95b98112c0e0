"""Engine: a model and its tokenizer, decoding batches of sequences with a KV cache.

Prompts of different lengths are left-padded into one batch; the cache's padding mask keeps the pad
positions out of attention and the position ids, so every row decodes exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llmkit.errors import InputError, MismatchError
from llmkit.infer.sampling import GenerationConfig, next_tokens
from llmkit.model.checkpoint import load_model, resolve_checkpoint
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    prompt_tokens: int


class _TextTracker:
    """Incremental detokenisation of one row: finds stop strings and emits only text that is final
    (no half-decoded UTF-8 character, no prefix of a stop string that may still complete)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        for stop in self.stop:
            position = self.text.find(stop)
            if position != -1:
                self.text, self.stopped = self.text[:position], True
        safe = len(self.text)
        if not self.stopped:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            for stop in self.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:size]):
                        safe -= size
                        break
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def finish(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


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
    def __init__(self, model: Transformer, tokenizer: Tokenizer, decoding_layout: bool = False):
        """``decoding_layout``: re-lay the weights for faster decoding (see :func:`use_decoding_layout`);
        leave it off when the model is also being trained (PPO/GRPO rollouts)."""
        if tokenizer.vocab_size > model.config.vocab_size:
            raise MismatchError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
        if decoding_layout:
            use_decoding_layout(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.token_embedding.weight.device
        self.end_ids = {tokenizer.eot_id, tokenizer.special_ids.get("<|end|>", tokenizer.eot_id)}

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> "Engine":
        """Model and tokenizer from a checkpoint; refuses a tokenizer other than the one it was trained with."""
        model, config = load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.load(resolve_checkpoint(path))
        expected = config.get("tokenizer_sha256")
        if expected and expected != tokenizer.sha256:
            raise MismatchError(f"{path}: tokenizer.json (sha256 {tokenizer.sha256[:12]}) is not the one the model "
                                f"was trained with (sha256 {expected[:12]})")
        return cls(model, tokenizer, decoding_layout=True)

    # ------------------------------------------------------------------ token level
    @torch.inference_mode()
    def decode_steps(self, prompts: list[list[int]], config: GenerationConfig) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step after step, until ``max_new_tokens`` or the context is
        full. Rows are not retired here; callers decide when a row is done."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        context = self.model.config.context_length
        longest = max(len(prompt) for prompt in prompts)
        if longest >= context:
            raise InputError(f"a prompt of {longest} tokens leaves no room in the model's context of {context} tokens")
        steps = min(config.max_new_tokens, context - longest)
        generator = torch.Generator(device=self.device).manual_seed(config.seed) if config.seed is not None else None
        padded = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
        valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        if not config.use_cache:
            yield from self._decode_without_cache(padded, valid, steps, config, generator)
            return
        cache = self.model.new_cache(len(prompts), capacity=longest + steps)
        if not bool(valid.all()):
            cache.padding = torch.ones(len(prompts), longest + steps, dtype=torch.bool, device=self.device)
            cache.padding[:, :longest] = valid
        logits = self.model(padded, cache=cache)[:, -1]
        for step in range(steps):
            token = next_tokens(logits, config, generator)
            yield token
            if step + 1 < steps:
                logits = self.model(token.unsqueeze(1), cache=cache)[:, -1]

    def _decode_without_cache(self, padded, valid, steps, config, generator) -> Iterator[torch.Tensor]:
        """The reference path: re-run the whole sequence every step (what the KV cache saves)."""
        sequence = padded
        for _ in range(steps):
            cache = None
            if not bool(valid.all()):
                cache = self.model.new_cache(sequence.shape[0], capacity=sequence.shape[1])
                cache.padding = valid
            token = next_tokens(self.model(sequence, cache=cache)[:, -1], config, generator)
            yield token
            sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)

    # ------------------------------------------------------------------- text level
    def stream(self, prompt: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are decided."""
        for row, delta in self._run([prompt], config or GenerationConfig(), results=None):
            yield delta

    def generate(self, prompts: str | list[str], config: GenerationConfig | None = None) -> list[Completion]:
        """Complete each prompt; one batch, one decode loop."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        results: list[Completion] = []
        for _ in self._run(prompts, config or GenerationConfig(), results):
            pass
        return results

    def _run(self, prompts: list[str], config: GenerationConfig, results: list[Completion] | None):
        # An empty prompt starts a new document: unconditional generation.
        encoded = [self.tokenizer.encode(prompt) or [self.tokenizer.eot_id] for prompt in prompts]
        trackers = [_TextTracker(self.tokenizer, config.stop) for _ in prompts]
        finish = ["length"] * len(prompts)
        done = [False] * len(prompts)
        for tokens in self.decode_steps(encoded, config):
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if config.stop_at_end_of_text and token in self.end_ids:
                    done[row], finish[row] = True, "stop"
                    continue
                delta = trackers[row].add(token)
                if delta:
                    yield row, delta
                if trackers[row].stopped:
                    done[row], finish[row] = True, "stop"
            if all(done):
                break
        for row, tracker in enumerate(trackers):
            tail = tracker.finish()
            if tail:
                yield row, tail
            if results is not None:
                results.append(Completion(tracker.text, tracker.ids, finish[row], len(encoded[row])))
