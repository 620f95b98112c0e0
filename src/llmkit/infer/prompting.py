"""Prompting: in-context learning, chain of thought and self-consistency.

A prompt is an optional instruction, k demonstrations and the query, joined by a separator (Brown et al.
2020). :class:`PromptBuilder` chooses the demonstrations for each query from a pool:

- selection: ``random`` (seeded by the config's seed and the query, so a query always gets the same
  shots whatever order the queries come in), ``bm25`` (lexical overlap with the query's question,
  :class:`llmkit.infer.retrieval.BM25`) or ``embedding`` (cosine similarity of sentence vectors, by
  default the mean-pooled final hidden states of the language model itself, as Liu et al. 2022 "What
  Makes Good In-Context Examples for GPT-3?" use a sentence encoder). A pool example whose question is
  the query itself is never shown: it would hand over the answer.
- ordering: ``given`` (pool order), ``random``, ``similarity_ascending`` (the most similar example
  last, next to the query, Liu et al.'s best order) or ``similarity_descending``.

A template such as ``"Q: {question}\\nA: {answer}"`` renders a demonstration; the query is the same
template cut where the answer begins, so the model continues exactly where a demonstration's answer
would start. Chain of thought (Wei et al. 2022) renders demonstrations with ``cot_template``, whose
``{rationale}`` holds the worked reasoning; zero-shot chain of thought (Kojima et al. 2022) appends "Let's
think step by step." to the query, lets the model reason, then asks a second prompt "... Therefore, the
answer is" and reads the answer from that completion (:mod:`llmkit.infer.answers`).

Self-consistency (Wang et al. 2023) samples several reasoning paths for one question and returns the
majority answer (:mod:`llmkit.align.self_improve` turns confident votes into SFT rows).
"""

from __future__ import annotations

import random
import re
import string
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from llmkit.config import check
from llmkit.errors import ConfigError, InputError
from llmkit.infer.answers import EXTRACTORS, majority_vote
from llmkit.infer.retrieval import BM25
from llmkit.infer.sampling import GenerationConfig
from llmkit.io import iter_jsonl

Selection = Literal["random", "bm25", "embedding"]
Ordering = Literal["given", "random", "similarity_ascending", "similarity_descending"]
ChainOfThought = Literal["none", "few_shot", "zero_shot"]
AnswerFormat = Literal["number", "choice", "text"]
Embed = Callable[[list[str]], torch.Tensor]


@dataclass
class Example:
    question: str
    answer: str
    rationale: str | None = None


def _fields_of(template: str, name: str) -> list[str]:
    """The placeholder names of ``template`` in order; only plain ``{name}`` placeholders are allowed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(
            name, template, f"not a valid template ({error}); write a literal brace as {{{{ or }}}}"
        ) from None
    for _, placeholder, format_spec, conversion in parsed:
        if placeholder is not None and (format_spec or conversion):
            raise ConfigError(
                name, template, f"placeholder {{{placeholder}}} may not carry a format spec or conversion"
            )
    return [placeholder for _, placeholder, _, _ in parsed if placeholder is not None]


def _check_template(template: str, name: str, required: tuple[str, ...]) -> None:
    placeholders = _fields_of(template, name)
    check(
        sorted(placeholders) == sorted(required),
        name,
        template,
        f"needs each of {', '.join('{' + p + '}' for p in required)} exactly once and nothing else",
    )
    check(placeholders[0] == "question", name, template, "{question} must come before the answer")


@dataclass
class PromptConfig:
    shots: int = field(default=0, metadata={"help": "demonstrations in the prompt (k-shot)"})
    selection: Selection = field(
        default="random",
        metadata={"help": "how demonstrations are chosen: random, bm25 or embedding similarity to the query"},
    )
    ordering: Ordering = field(
        default="given",
        metadata={
            "help": "given (pool order), random, similarity_ascending (most similar last) or similarity_descending"
        },
    )
    template: str = field(
        default="Q: {question}\nA: {answer}",
        metadata={"help": "a demonstration; the query is this cut where {answer} begins"},
    )
    cot_template: str = field(
        default="Q: {question}\nA: {rationale} The answer is {answer}.",
        metadata={"help": "a chain-of-thought demonstration (few-shot CoT)"},
    )
    separator: str = field(
        default="\n\n", metadata={"help": "between the instruction, the demonstrations and the query"}
    )
    instruction: str = field(default="", metadata={"help": "text placed before the demonstrations"})
    seed: int = field(default=0, metadata={"help": "seed of random selection and ordering"})
    chain_of_thought: ChainOfThought = field(
        default="none",
        metadata={"help": "none, few_shot (demonstrations with rationales) or zero_shot ('Let's think step by step.')"},
    )
    zero_shot_trigger: str = field(
        default="Let's think step by step.",
        metadata={"help": "zero-shot CoT: appended to the query (Kojima et al. 2022)"},
    )
    answer_trigger: str = field(
        default="Therefore, the answer is",
        metadata={"help": "zero-shot CoT: the second prompt that asks for the answer"},
    )

    def __post_init__(self) -> None:
        check(self.shots >= 0, "shots", self.shots, "must be >= 0")
        for name, kind in (("selection", Selection), ("ordering", Ordering), ("chain_of_thought", ChainOfThought)):
            check(
                getattr(self, name) in typing.get_args(kind),
                name,
                getattr(self, name),
                f"must be one of {typing.get_args(kind)}",
            )
        check(
            not (self.ordering.startswith("similarity") and self.selection == "random"),
            "ordering",
            self.ordering,
            "similarity orderings need a similarity: use selection bm25 or embedding",
        )
        check(
            not (self.chain_of_thought == "zero_shot" and self.shots),
            "shots",
            self.shots,
            "zero-shot chain of thought has no demonstrations; use chain_of_thought few_shot",
        )
        check(bool(self.separator), "separator", self.separator, "must not be empty")
        _check_template(self.template, "template", ("question", "answer"))
        _check_template(self.cot_template, "cot_template", ("question", "rationale", "answer"))


def _join(text: str, continuation: str) -> str:
    """``continuation`` after ``text`` with one space between them, unless ``text`` ends in whitespace."""
    return text + continuation if not text or text[-1].isspace() else f"{text} {continuation}"


class PromptBuilder:
    """Prompts for questions, with demonstrations chosen from ``pool``. ``embed`` maps texts to vectors
    (one row each) for ``selection="embedding"``; see :func:`hidden_state_embedder`."""

    def __init__(self, config: PromptConfig, pool: list[Example] = (), embed: Embed | None = None):
        self.config, self.pool, self.embed = config, list(pool), embed
        if len(self.pool) < config.shots:
            raise InputError(f"{config.shots} shots requested but the demonstration pool has {len(self.pool)} examples")
        if config.chain_of_thought == "few_shot" and config.shots:
            for index, example in enumerate(self.pool):
                if not example.rationale:
                    raise InputError(
                        f"demonstration {index} ({example.question[:60]!r}) has no rationale; "
                        "few-shot chain of thought needs one for every example"
                    )
        if config.selection == "embedding" and config.shots and embed is None:
            raise ConfigError(
                "selection", "embedding", "needs an embed function, e.g. hidden_state_embedder(model, tokenizer)"
            )
        self.bm25 = (
            BM25([example.question for example in self.pool]) if config.selection == "bm25" and config.shots else None
        )
        self._pool_vectors: torch.Tensor | None = None
        self.template = config.cot_template if config.chain_of_thought == "few_shot" else config.template
        question_prefix = next(iter(string.Formatter().parse(self.template)))[0].rstrip()
        # A model that starts a new demonstration has finished its answer.
        self.stop = [config.separator + question_prefix]

    # ------------------------------------------------------------------ selection
    def similarities(self, question: str) -> list[float]:
        """Similarity of ``question`` to every pool question: its BM25 score, or the cosine of embeddings."""
        if self.bm25 is not None:
            return self.bm25.scores(question)
        if self._pool_vectors is None:
            self._pool_vectors = torch.nn.functional.normalize(
                self.embed([example.question for example in self.pool]).float(), dim=-1
            )
        query = torch.nn.functional.normalize(self.embed([question]).float(), dim=-1)
        return (self._pool_vectors @ query[0]).tolist()

    def select(self, question: str) -> list[Example]:
        """The demonstrations for ``question``, in prompt order."""
        config = self.config
        if not config.shots:
            return []
        generator = random.Random(f"{config.seed}:{question}")
        candidates = [index for index, example in enumerate(self.pool) if example.question != question]
        similarity = None
        if config.selection == "random":
            chosen = generator.sample(candidates, min(config.shots, len(candidates)))
        else:
            similarity = self.similarities(question)
            chosen = sorted(candidates, key=lambda index: (-similarity[index], index))[: config.shots]
        if config.ordering in ("given", "random"):
            chosen.sort()
            if config.ordering == "random":
                generator.shuffle(chosen)
        else:
            chosen.sort(key=lambda index: (-similarity[index], index))
            if config.ordering == "similarity_ascending":
                chosen.reverse()
        return [self.pool[index] for index in chosen]

    # ------------------------------------------------------------------ rendering
    def demonstration(self, example: Example) -> str:
        return self.template.format(question=example.question, answer=example.answer, rationale=example.rationale)

    def query(self, question: str) -> str:
        """The template up to where the answer begins (trailing spaces dropped: byte-level BPE puts a
        word's leading space into the word's token, so the model writes " 42" itself)."""
        head = ""
        for literal, placeholder, _, _ in string.Formatter().parse(self.template):
            head += literal
            if placeholder != "question":
                break
            head += question
        head = head.rstrip(" ")
        return _join(head, self.config.zero_shot_trigger) if self.config.chain_of_thought == "zero_shot" else head

    def prompt(self, question: str) -> str:
        parts = [self.config.instruction] if self.config.instruction else []
        parts += [self.demonstration(example) for example in self.select(question)]
        parts.append(self.query(question))
        return self.config.separator.join(parts)

    def answer_prompt(self, prompt: str, reasoning: str) -> str:
        """Zero-shot CoT's second prompt (Kojima et al. 2022, answer extraction): the first prompt, the
        generated reasoning, then the answer trigger."""
        return _join(_join(prompt, reasoning.strip()), self.config.answer_trigger)


def hidden_state_embedder(model: torch.nn.Module, tokenizer, batch_size: int = 16) -> Embed:
    """Texts -> (n, n_embd) mean-pooled final hidden states of ``model``, read with a forward hook on
    ``model.final_norm`` (the input of the language-model head) so the model is used unchanged. Texts
    longer than the context keep their first tokens; rows are right-padded, which under causal
    attention changes nothing at the real positions, and only those are averaged."""
    context = model.config.context_length
    device = model.token_embedding.weight.device

    @torch.inference_mode()
    def embed(texts: list[str]) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = model.final_norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
        vectors = []
        try:
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="embedding", unit="batch", disable=len(starts) < 8, dynamic_ncols=True):
                encoded = [
                    tokenizer.encode(text)[:context] or [tokenizer.eot_id] for text in texts[start : start + batch_size]
                ]
                longest = max(len(ids) for ids in encoded)
                ids = torch.tensor([row + [tokenizer.eot_id] * (longest - len(row)) for row in encoded], device=device)
                real = torch.tensor([[1.0] * len(row) + [0.0] * (longest - len(row)) for row in encoded], device=device)
                captured.clear()
                model(ids)
                hidden = captured[0].float()
                vectors.append((hidden * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True))
        finally:
            handle.remove()
        return torch.cat(vectors).cpu()

    return embed


def load_examples(path: str | Path) -> list[Example]:
    """Demonstrations from JSONL: ``question`` and ``answer``, with an optional ``rationale``. A GSM8K
    answer ("worked solution\\n#### 72") splits into rationale and answer; its ``<<48/2=24>>`` calculator
    annotations are dropped and its lines joined into one paragraph, like the hand-written chains of
    Wei et al. 2022 (and so a blank line inside a rationale never looks like the prompt's separator)."""
    examples = []
    for line_number, record in iter_jsonl(path):
        for name in ("question", "answer"):
            if not isinstance(record.get(name), str):
                raise InputError(f"{path}:{line_number}: expected a string field '{name}'")
        answer, rationale = record["answer"], record.get("rationale")
        if "####" in answer and rationale is None:
            rationale, answer = answer.rsplit("####", 1)
            rationale = " ".join(
                line.strip() for line in re.sub(r"<<[^>]*>>", "", rationale).splitlines() if line.strip()
            )
        examples.append(Example(record["question"], answer.strip(), rationale))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


# ---------------------------------------------------------------------- reasoning and voting
@dataclass
class SelfConsistencyConfig:
    paths: int = field(
        default=10, metadata={"help": "reasoning paths sampled per question (Wang et al. 2023 sample 40)"}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature of the paths (> 0, or every path is the same)"}
    )
    top_k: int | None = field(
        default=40, metadata={"help": "sample the paths among the k most likely tokens (Wang et al. 2023 use 40)"}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens of reasoning per path at most"})
    answer_max_new_tokens: int = field(
        default=16, metadata={"help": "zero-shot CoT: tokens of the extracted answer at most"}
    )
    answer_format: AnswerFormat = field(
        default="number", metadata={"help": "how answers are read and compared: number, choice (a letter) or text"}
    )
    sampling_seed: int = field(default=0, metadata={"help": "path i is sampled with seed sampling_seed + i"})

    def __post_init__(self) -> None:
        check(self.paths >= 1, "paths", self.paths, "must be >= 1")
        check(
            self.temperature > 0,
            "temperature",
            self.temperature,
            "must be > 0: greedy decoding gives every path the same text",
        )
        check(
            self.answer_format in EXTRACTORS,
            "answer_format",
            self.answer_format,
            f"must be one of {sorted(EXTRACTORS)}",
        )

    def generation(self) -> list[GenerationConfig]:
        """One sampling config per path, each with its own seed, so path i is reproducible on its own."""
        return [
            GenerationConfig(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                seed=self.sampling_seed + path,
            )
            for path in range(self.paths)
        ]


@dataclass
class ReasoningPath:
    text: str  # what the model answered after the question: its reasoning and its answer sentence
    answer: str | None  # the canonical extracted answer; None when the text gives none


@dataclass
class Vote:
    answer: str | None
    vote_share: float  # votes for ``answer`` / all paths
    paths: list[ReasoningPath]


def reason(
    engine,
    builder: PromptBuilder,
    questions: list[str],
    generation: GenerationConfig | list[GenerationConfig],
    answer_format: str = "number",
    answer_max_new_tokens: int = 16,
) -> list[ReasoningPath]:
    """Answer each question (one generate call; a second one for zero-shot CoT's answer prompt) with
    ``generation`` (one config for all, or one per question), and extract the answers."""
    extract = EXTRACTORS[answer_format]
    configs = generation if isinstance(generation, list) else [generation] * len(questions)
    if len(configs) != len(questions):
        raise ValueError(f"{len(configs)} generation configs for {len(questions)} questions")
    prompts = [builder.prompt(question) for question in questions]
    completions = engine.generate(prompts, [replace(config, stop=config.stop + builder.stop) for config in configs])
    if builder.config.chain_of_thought != "zero_shot":
        # A direct reply is the answer itself (its first number counts); a reasoning path states its
        # answer after "The answer is", or failing that, last.
        direct = builder.config.chain_of_thought == "none"
        return [
            ReasoningPath(completion.text.strip(), extract(completion.text, marked=direct))
            for completion in completions
        ]
    # Kojima et al. 2022: the answer is read greedily from a second prompt, up to the end of its line.
    answer_prompts = [
        builder.answer_prompt(prompt, completion.text) for prompt, completion in zip(prompts, completions)
    ]
    answer_config = GenerationConfig(max_new_tokens=answer_max_new_tokens, temperature=0, stop=["\n", *builder.stop])
    answers = engine.generate(answer_prompts, answer_config)
    trigger, answer_trigger = builder.config.zero_shot_trigger, builder.config.answer_trigger
    return [
        ReasoningPath(
            _join(_join(_join(trigger, completion.text.strip()), answer_trigger), answer.text.strip()),
            extract(answer.text, marked=True),
        )
        for completion, answer in zip(completions, answers)
    ]


def self_consistency(engine, builder: PromptBuilder, question: str, config: SelfConsistencyConfig) -> Vote:
    """Wang et al. 2023: sample ``config.paths`` reasoning paths in one batch, vote on their answers."""
    paths = reason(
        engine,
        builder,
        [question] * config.paths,
        config.generation(),
        config.answer_format,
        config.answer_max_new_tokens,
    )
    answer, share = majority_vote([path.answer for path in paths])
    return Vote(answer, share, paths)
