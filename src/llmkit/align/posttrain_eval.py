"""The before/after evaluation of the post-training chain: every stage's model on the same held-out
arithmetic problems, with the calculator and without, its reward-model score and its KL to the SFT model.

**Calculator on** is the ``arithmetic`` task's prompt (a system prompt asking for ``calculator(...)``
calls) decoded with the calculator running, as the RL stages evaluate (:func:`llmkit.align.rl_stage.evaluate`);
**calculator off** is the ``arithmetic_plain`` prompt (inline arithmetic) decoded with no tools, so the
model must do the arithmetic itself. Decoding is greedy; an answer is correct when
:func:`llmkit.tasks.arithmetic.check_answer` accepts the number after its last ``####``.

**The pretrained base** has never seen the chat format, so it gets a plain-text few-shot prompt
(Brown et al. 2020), the way GSM8K is evaluated on base models (Cobbe et al. 2021; the lm-eval
``gsm8k`` task)::

    <|endoftext|>Question: Maya saves $5 every week for 4 weeks. ...
    Answer: Money saved: 5*4 = 20
    Money left: 20-7 = 13
    #### 13

    Question: <the held-out question>
    Answer:

and its answer ends at the first blank line. The demonstrations are training problems in the same
solution form as the chat stages' (calculator calls as the special-token stream the engine runs, or
inline arithmetic), the shortest first, as many as ``shots`` and the context allow: with a 256-token
context and room for the answer that is usually one. A tiny base model answers almost none correctly;
the row is there to show what post-training adds, not to flatter the base.

**Records.** Every answer is written to ``<records>/<stage>_<calculator|plain>.jsonl`` (question, the
right answer, the completion, the parsed answer, correct or not, the reward), so every number of the
table can be recomputed from them.

**Reward** is the trained reward model's mean score of the calculator-on answers, each rendered as the
assistant's reply to the chat prompt (the base's answers too, so the column compares like with like).
**KL** is KL(stage || SFT) per completion: one completion sampled at temperature 1 per held-out
calculator prompt, scored by both models (the k1 estimate the RL stages log,
:meth:`llmkit.align.rollout.RolloutBatch.sequence_kl`). The base's KL is not reported: its prompts
are not the chat prompts the SFT model answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.align.reward import RewardScorer
from llmkit.align.rollout import (
    Prompt,
    build_batch,
    chat_prompt,
    completion_tokens,
    generate_rollouts,
    score_rollouts,
)
from llmkit.chat import render_ids
from llmkit.errors import InputError
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import select_tools
from llmkit.io import atomic_write_jsonl
from llmkit.model.checkpoint import detached_copy, load_checkpoint
from llmkit.tasks import arithmetic
from llmkit.tokenizer import Tokenizer

MODES = {"calculator": True, "plain": False}  # the record name of each mode -> whether the calculator runs
DEMONSTRATION_POOL = 64  # training problems the shortest demonstrations are chosen from
ANSWER_END = "\n\n"  # a few-shot answer ends where the next "Question:" would start


@dataclass
class EvaluationSettings:
    problems: list[arithmetic.Problem]
    max_new_tokens: int
    shots: int
    seed: int
    device: torch.device
    records: Path  # folder of the per-answer records


def solution_ids(tokenizer: Tokenizer, problem: arithmetic.Problem, with_tools: bool) -> list[int]:
    """The token stream of the worked solution as the assistant writes it in the chat format (tool calls
    and their injected results included), without the ``<|end|>`` that closes the turn."""
    prompt = arithmetic.prompt_messages(problem, with_tools)
    full, _ = render_ids(tokenizer, arithmetic.to_conversation(problem, with_tools).messages)
    start = len(render_ids(tokenizer, prompt, add_generation_prompt=True)[0])
    return full[start:-1]


def few_shot_prompts(
    tokenizer: Tokenizer,
    problems: list[arithmetic.Problem],
    with_tools: bool,
    shots: int,
    context_length: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[list[int]], int]:
    """Plain-text few-shot prompt ids for every problem (module docstring) and the number of
    demonstrations, the same for all: as many of the shortest training problems as fit every prompt."""

    def question(problem: arithmetic.Problem) -> list[int]:
        return tokenizer.encode(f"Question: {problem.question}\nAnswer: ")

    pool = arithmetic.generate_problems(DEMONSTRATION_POOL, seed=seed, split="train")
    candidates = sorted(
        (
            question(problem) + solution_ids(tokenizer, problem, with_tools) + tokenizer.encode(ANSWER_END)
            for problem in pool
        ),
        key=len,
    )
    queries = [question(problem) for problem in problems]
    room = context_length - max_new_tokens - 1 - max(map(len, queries))  # 1: the leading <|endoftext|>
    demonstrations: list[int] = []
    used = 0
    for candidate in candidates[:shots]:
        if len(demonstrations) + len(candidate) > room:
            break
        demonstrations, used = demonstrations + candidate, used + 1
    return [[tokenizer.eot_id] + demonstrations + query for query in queries], used


def heldout_problems(
    tokenizer: Tokenizer, count: int, seed: int, context_length: int, max_new_tokens: int
) -> list[arithmetic.Problem]:
    """``count`` held-out problems whose chat prompts, in both modes, leave room for ``max_new_tokens``
    (the same problems for every stage, so the rows of the table compare)."""
    problems = [
        problem
        for problem in arithmetic.generate_problems(count, seed=seed, split="heldout")
        if all(
            len(chat_prompt(tokenizer, arithmetic.prompt_messages(problem, with_tools)).ids) + max_new_tokens
            <= context_length
            for with_tools in MODES.values()
        )
    ]
    if not problems:
        raise InputError(
            f"no held-out arithmetic prompt leaves room for max_new_tokens={max_new_tokens} in the context "
            f"of {context_length} tokens"
        )
    return problems


def evaluate_model(
    path: str | Path,
    stage: str,
    settings: EvaluationSettings,
    reward: RewardScorer | None,
    reference: torch.nn.Module | None,
) -> dict:
    """Accuracy with the calculator and without, the reward and KL(stage || reference) of the model at
    ``path`` (``stage == "base"``: the few-shot prompt); writes the per-answer records."""
    loaded = load_checkpoint(path)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(settings.device)
    # The engine decodes in the layout of its kernels. When a KL is scored, the engine decodes from a copy and the
    # model itself scores, in the reference's own layout, so that a model against itself gives exactly 0.
    scores_kl = reference is not None and stage != "base"
    engine = Engine(detached_copy(model) if scores_kl else model, tokenizer, decoding_layout=True, max_batch_size=64)
    end_id = tokenizer.stop_ids[0]
    context = model.config.context_length
    chat_prompts = {
        mode: [chat_prompt(tokenizer, arithmetic.prompt_messages(problem, with_tools)) for problem in settings.problems]
        for mode, with_tools in MODES.items()
    }
    metrics: dict = {"problems": len(settings.problems)}
    for mode, with_tools in MODES.items():
        if stage == "base":
            prompts, metrics["shots"] = few_shot_prompts(
                tokenizer,
                settings.problems,
                with_tools,
                settings.shots,
                context,
                settings.max_new_tokens,
                settings.seed,
            )
        else:
            prompts = [prompt.ids for prompt in chat_prompts[mode]]
        generation = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, temperature=0.0, stop=[ANSWER_END] if stage == "base" else []
        )
        completions = engine.generate_ids(prompts, generation, select_tools("calculator" if with_tools else "none"))
        records = [
            {
                "question": problem.question,
                "answer": problem.answer,
                "completion": completion.text,
                "parsed": _parsed(completion.text),
                "correct": arithmetic.check_answer(problem, completion.text),
            }
            for problem, completion in zip(settings.problems, completions)
        ]
        if with_tools and reward is not None:
            # A cut answer of the base can overrun the context behind the (longer) chat prompt: keep its start.
            sequences = [
                (prompt.ids + completion_tokens(completion, end_id)[0])[:context]
                for prompt, completion in zip(chat_prompts[mode], completions)
            ]
            for record, score in zip(records, reward.score_ids(sequences)):
                record["reward"] = score
            metrics["reward"] = sum(record["reward"] for record in records) / len(records)
        metrics[f"accuracy_{mode}"] = sum(record["correct"] for record in records) / len(records)
        atomic_write_jsonl(settings.records / f"{stage}_{mode}.jsonl", records)
    if scores_kl:
        metrics["kl"] = sampled_kl(engine, model, reference, chat_prompts["calculator"], settings)
    return metrics


def sampled_kl(
    engine: Engine,
    model: torch.nn.Module,
    reference: torch.nn.Module,
    prompts: list[Prompt],
    settings: EvaluationSettings,
) -> float:
    """Mean over one sampled completion per prompt of sum(log pi - log pi_ref) over its sampled tokens."""
    rollouts = generate_rollouts(
        engine,
        prompts,
        1,
        GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=1.0),
        select_tools("calculator"),
        settings.seed,
        0,
    )
    batch = build_batch(rollouts, [0.0] * len(rollouts), engine.tokenizer.pad_id).to(settings.device)
    return score_rollouts(batch, model, reference, None, 1.0, 16).sequence_kl()


def _parsed(text: str) -> str | None:
    answer = arithmetic.final_answer(text)
    return None if answer is None else str(answer)
