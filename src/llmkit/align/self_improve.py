"""Self-improvement (Huang et al. 2022, "Large Language Models Can Self-Improve", LMSI): the reasoning
paths that agree with a confident self-consistency vote on unlabeled questions become supervised
fine-tuning rows for ``llmkit sft`` (``llmkit self-improve``). A post-training stage built on the
inference engine's prompting (:mod:`llmkit.infer.prompting`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.infer.engine import Engine, EngineConfig
from llmkit.infer.prompting import (
    PromptBuilder,
    PromptConfig,
    SelfConsistencyConfig,
    hidden_state_embedder,
    load_examples,
    self_consistency,
)
from llmkit.io import atomic_write_jsonl, iter_jsonl


def self_improvement_dataset(
    engine, builder: PromptBuilder, questions: list[str], config: SelfConsistencyConfig, min_vote_share: float = 0.5
) -> list[dict]:
    """Huang et al. 2022 (LMSI): for unlabeled questions, the reasoning paths that reach the majority
    answer of a confident vote (share >= ``min_vote_share``) become SFT rows in the ``messages`` format.
    A path sampled twice with the same text is kept once: a copy adds weight, not information."""
    check(0 < min_vote_share <= 1, "min_vote_share", min_vote_share, "must be in (0, 1]")
    rows = []
    for question in tqdm(questions, desc="self-improvement", unit="question", dynamic_ncols=True):
        vote = self_consistency(engine, builder, question, config)
        if vote.answer is None or vote.vote_share < min_vote_share:
            continue
        agreeing = dict.fromkeys(path.text for path in vote.paths if path.answer == vote.answer)
        rows += [
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}]}
            for text in agreeing
        ]
    return rows


def write_self_improvement(path: str | Path, rows: list[dict]) -> None:
    """The rows as JSONL, written atomically (the input of ``llmkit sft``)."""
    atomic_write_jsonl(path, rows)


@dataclass
class SelfImproveConfig:
    """``llmkit self-improve``: voted chain-of-thought paths on unlabeled questions, as an SFT dataset."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(checkpoint="runs/base"))
    questions: str = field(
        default="", metadata={"help": "JSONL of unlabeled questions (field 'question'; other fields are ignored)"}
    )
    demonstrations: str | None = field(
        default=None,
        metadata={"help": "JSONL pool of demonstrations (question, answer, optional rationale; GSM8K format works)"},
    )
    out: str = field(
        default="runs/self_improve.jsonl",
        metadata={"help": "output JSONL of SFT rows (messages format), the input of llmkit sft"},
    )
    min_vote_share: float = field(
        default=0.5,
        metadata={"help": "keep a question only when its majority answer has at least this share of the paths"},
    )
    # Zero-shot CoT by default: it needs no demonstrations, and self-improvement needs reasoning paths.
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(chain_of_thought="zero_shot"))
    consistency: SelfConsistencyConfig = field(default_factory=SelfConsistencyConfig)

    def __post_init__(self) -> None:
        check(bool(self.questions), "questions", self.questions, "name a JSONL file of questions")
        check(0 < self.min_vote_share <= 1, "min_vote_share", self.min_vote_share, "must be in (0, 1]")
        check(
            self.prompt.chain_of_thought != "none",
            "prompt.chain_of_thought",
            self.prompt.chain_of_thought,
            "self-improvement trains on reasoning paths: use few_shot (with --demonstrations and --prompt.shots) or "
            "zero_shot",
        )


def run_self_improvement(config: SelfImproveConfig) -> dict:
    """Load the model, vote on every question, write the agreeing paths; returns a summary."""
    questions = []
    for line_number, record in iter_jsonl(config.questions):
        if not isinstance(record.get("question"), str):
            raise InputError(f"{config.questions}:{line_number}: expected a string field 'question'")
        questions.append(record["question"])
    pool = load_examples(config.demonstrations) if config.demonstrations else []
    engine = Engine.from_config(config.engine)
    embed = hidden_state_embedder(engine.model, engine.tokenizer) if config.prompt.selection == "embedding" else None
    builder = PromptBuilder(config.prompt, pool, embed)
    rows = self_improvement_dataset(engine, builder, questions, config.consistency, config.min_vote_share)
    write_self_improvement(config.out, rows)
    kept = {row["messages"][0]["content"] for row in rows}
    return {"questions": len(questions), "questions_kept": len(kept), "rows": len(rows), "out": config.out}
