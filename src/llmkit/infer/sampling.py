"""Generation settings and the chain of logits processors that turns logits into the next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.config import check


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int | None = field(default=None, metadata={"help": "sample only among the k most likely tokens"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set with this much probability (Holtzman et al. 2020)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "strings that end generation (not included in the output)"})
    stop_at_end_of_text: bool = field(default=True, metadata={"help": "stop at the end-of-text/end-of-turn tokens"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    use_cache: bool = field(default=True, metadata={"help": "reuse keys/values of past tokens (KV cache)"})

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")
        check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        check(self.top_k is None or self.top_k > 0, "top_k", self.top_k, "must be positive")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "stop strings must be non-empty")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first reaches ``p`` (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids: temperature, then top-k, then top-p, then a draw."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
