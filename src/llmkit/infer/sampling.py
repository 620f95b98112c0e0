"""Generation settings and the chain of logits processors that turns logits into the next token.

The chain runs in the order Hugging Face ``generate`` and vLLM use, so a setting means here what it
means there: the penalties on tokens already seen (repetition, then frequency and presence), then
temperature, top-k, top-p and min-p, then a draw. Temperature 0 is greedy decoding: the penalties still
apply, the filters and the draw do not.

A batch may mix requests with different settings (continuous batching serves many users at once):
:func:`sample_rows` runs the chain once per group of rows that share their settings, and draws each
row's token with that row's own random generator, so a seeded request samples the same tokens whatever
else shares its batch: one uniform number per row, turned into a token through the row's cumulative
distribution, all rows in one vectorised pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from llmkit.config import check

MAX_LOGPROBS = 20  # the OpenAI API's limit on top alternatives per token
TOP_P_CANDIDATES = 256  # top-p first looks for the nucleus among this many most likely tokens


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int | None = field(default=None, metadata={"help": "sample only among the k most likely tokens"})
    top_p: float | None = field(
        default=None,
        metadata={"help": "nucleus sampling: the smallest set with this much probability (Holtzman et al. 2020)"},
    )
    min_p: float | None = field(
        default=None,
        metadata={"help": "drop tokens less likely than min_p times the most likely one (Nguyen et al. 2024)"},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "divide positive / multiply negative logits of tokens already seen (CTRL, Keskar et al. 2019); "
            "1 = off"
        },
    )
    frequency_penalty: float = field(
        default=0.0, metadata={"help": "subtract this times a token's count so far from its logit (OpenAI), -2..2"}
    )
    presence_penalty: float = field(
        default=0.0, metadata={"help": "subtract this from the logit of every token seen so far (OpenAI), -2..2"}
    )
    stop: list[str] = field(
        default_factory=list, metadata={"help": "strings that end generation (not included in the output)"}
    )
    stop_at_end_of_text: bool = field(default=True, metadata={"help": "stop at the end-of-text/end-of-turn tokens"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    use_cache: bool = field(default=True, metadata={"help": "reuse keys/values of past tokens (KV cache)"})
    logprobs: int | None = field(
        default=None,
        metadata={
            "help": f"return the chosen tokens' log-probabilities and this many top alternatives (0..{MAX_LOGPROBS})"
        },
    )
    echo: bool = field(default=False, metadata={"help": "also return the log-probabilities of the prompt tokens"})
    num_beams: int = field(
        default=1,
        metadata={"help": "beam search with this many beams (deterministic; sampling settings are ignored); 1 = off"},
    )
    length_penalty: float = field(
        default=1.0, metadata={"help": "beam search: a hypothesis scores sum(logprob) / length**length_penalty"}
    )
    prompt_lookup: int = field(
        default=0,
        metadata={
            "help": "greedy requests: draft up to this many tokens from an earlier "
            "occurrence of the last n-gram and verify them in one pass "
            "(speculative decoding, same tokens); 0 = off"
        },
    )

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")
        check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        check(self.top_k is None or self.top_k > 0, "top_k", self.top_k, "must be positive")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(self.min_p is None or 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            self.logprobs,
            f"must be in [0, {MAX_LOGPROBS}]",
        )
        check(self.num_beams >= 1, "num_beams", self.num_beams, "must be >= 1")
        check(0 <= self.prompt_lookup <= 64, "prompt_lookup", self.prompt_lookup, "must be in [0, 64]")
        check(self.length_penalty == self.length_penalty, "length_penalty", self.length_penalty, "must be a number")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "stop strings must be non-empty")

    @property
    def penalises_history(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def processor_settings(self) -> tuple:
        """The fields the logits processors read: rows whose settings are equal share one pass."""
        return (
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.frequency_penalty,
            self.presence_penalty,
        )


# ---------------------------------------------------------------------------------------- processors
def repetition_penalty_filter(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019, eq. 2, as Hugging Face applies it): a seen token's logit is divided by
    ``penalty`` when positive and multiplied by it when negative, so penalty > 1 always lowers it."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(counts > 0, penalised, logits)


def frequency_presence_filter(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's penalties: logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first reaches ``p`` (always at least one).

    Sorting a 50k vocabulary costs milliseconds a row on a CPU, about as much as a decoding step of a
    small model; a trained model's nucleus is almost always among its few hundred most likely tokens, so
    those are ranked first, and the whole vocabulary only when some row's nucleus is not complete in them."""
    probabilities = logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    for candidates in sorted({min(TOP_P_CANDIDATES, vocab), vocab}):
        top, order = probabilities.topk(candidates, dim=-1)
        # Drop a token when the tokens before it already reach p.
        drop_sorted = (top.cumsum(dim=-1) - top) >= p
        if bool(drop_sorted[..., -1].all()):  # every row's nucleus ends before the last candidate
            break
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Nguyen et al. 2024: drop tokens with probability below ``min_p`` times the most likely token's, a
    threshold that tightens when the model is confident and loosens when it is not. The most likely
    token always survives (its probability is p_max >= min_p * p_max)."""
    probabilities = logits.softmax(dim=-1)
    threshold = min_p * probabilities.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probabilities < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: SeenTokens | None) -> torch.Tensor:
    """The whole chain on float32 (rows, vocab) logits; ``seen`` lists the tokens of each row's history
    (needed only when ``config`` penalises the history). With temperature 0 the result is the penalised
    logits, whose argmax is the greedy choice."""
    if config.penalises_history:
        # Only the seen tokens change: work on those few entries, not on rows x vocabulary.
        values = logits[seen.rows, seen.tokens]
        if config.repetition_penalty != 1:
            values = repetition_penalty_filter(values, seen.counts, config.repetition_penalty)
        if config.frequency_penalty != 0 or config.presence_penalty != 0:
            values = frequency_presence_filter(values, seen.counts, config.frequency_penalty, config.presence_penalty)
        logits = logits.index_put((seen.rows, seen.tokens), values)
    if config.temperature == 0:
        return logits
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p:
        logits = min_p_filter(logits, config.min_p)
    return logits


class SeenTokens(NamedTuple):
    """Every distinct token of every row's history: its row, its id and how often it occurs there."""

    rows: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor  # float32

    @classmethod
    def of(cls, histories: list[list[int]], vocab_size: int, device) -> "SeenTokens":
        keys = torch.cat(
            [torch.tensor(history, dtype=torch.long) + row * vocab_size for row, history in enumerate(histories)]
        )
        unique, counts = torch.unique(keys.to(device), return_counts=True)
        return cls(unique // vocab_size, unique % vocab_size, counts.float())


# ------------------------------------------------------------------------------------------ drawing
def most_likely(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice of each row, the first of equal maxima. On the CPU through NumPy: PyTorch's argmax over
    SmolLM2's 49,152 logits took 44 us a row (64 rows: 1.7 ms of a decoding step), NumPy's 5."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def draw(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(logits), by inverse transform sampling: one uniform number per row,
    from that row's generator (rows that share one draw in row order), located in the row's cumulative
    distribution (float64, so even a 50k vocabulary's smallest probabilities keep their intervals)."""
    cumulative = logits.double().softmax(dim=-1).cumsum(dim=-1)
    uniforms = torch.empty(logits.shape[0], 1, dtype=cumulative.dtype, device=cumulative.device)
    for rows in rows_by_key([id(generator) for generator in generators]):
        uniforms[rows] = torch.rand(
            len(rows), 1, generator=generators[rows[0]], dtype=uniforms.dtype, device=uniforms.device
        )
    total = cumulative[:, -1:]
    # Token i owns [c_(i-1), c_i), empty for a filtered token. u < 1, but u * total can round up to
    # total, which no token owns: stay strictly below it.
    targets = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, targets, right=True).squeeze(-1)


def rows_by_key(keys: list) -> list[list[int]]:
    """Row indices grouped by equal keys, groups in order of first appearance."""
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def sample_rows(
    logits: torch.Tensor,
    configs: list[GenerationConfig],
    generators: list[torch.Generator | None],
    histories: list[list[int]],
) -> torch.Tensor:
    """(rows, vocab) logits -> (rows,) token ids, row r under ``configs[r]`` with random generator
    ``generators[r]`` (None: torch's global one) and penalties from ``histories[r]`` (the row's prompt and
    generated ids). Rows with equal processor settings run the chain together."""
    if not len(configs) == len(generators) == len(histories) == logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} rows of logits but {len(configs)} configs, {len(generators)} "
            f"generators and {len(histories)} histories"
        )
    logits = logits.float()
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows in rows_by_key([config.processor_settings() for config in configs]):
        config = configs[rows[0]]
        seen = (
            SeenTokens.of([histories[r] for r in rows], logits.shape[-1], logits.device)
            if config.penalises_history
            else None
        )
        processed = process_logits(logits if len(rows) == len(configs) else logits[rows], config, seen)
        if config.temperature == 0:
            tokens[rows] = most_likely(processed)
        else:
            tokens[rows] = draw(processed, [generators[r] for r in rows])
    return tokens


def next_tokens(
    logits: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
    histories: list[list[int]] | None = None,
) -> torch.Tensor:
    """(rows, vocab) logits -> (rows,) token ids, every row under one config and one generator."""
    rows = logits.shape[0]
    return sample_rows(logits, [config] * rows, [generator] * rows, histories or [[] for _ in range(rows)])


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the raw model distribution (before penalties, temperature and filters,
    as the OpenAI API and vLLM report them): ``(chosen (rows,), top_ids (rows, top), top_logprobs (rows, top))``
    for the chosen ``tokens`` (rows,) and the ``top`` most likely tokens, most likely first."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens.view(-1, 1).to(logprobs.device)).squeeze(-1)
    top_logprobs, top_ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return chosen, top_ids, top_logprobs
