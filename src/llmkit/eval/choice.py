"""Multiple choice by log-likelihood (the "cloze" formulation of GPT-3, Brown et al. 2020).

Each choice is scored as a continuation of the prompt, ``prompt + " " + choice``; the prediction is the
choice with the highest log-likelihood (``accuracy``) or with the highest log-likelihood per character
of the choice (``accuracy_norm``: lm-evaluation-harness's ``acc_norm``, which stops long answers from
losing merely for being long). Ties go to the first choice, as ``numpy.argmax`` gives them in lm-eval.

Prompts follow lm-eval's task configs so scores are comparable: the template of the example's format
(``"Question: {context}\\nAnswer:"`` for ARC, MMLU and plain JSONL, the bare context for HellaSwag),
few-shot demonstrations first, each rendered as its prompt, the delimiter and its correct choice,
followed by a blank line. Demonstrations come from ``fewshot_examples`` (a separate split, e.g. a train
file) or, when none are given, from the evaluated examples themselves minus the one being asked.

``stderr`` is the standard error of the mean accuracy, sample standard deviation / sqrt(n), lm-eval's
``acc_stderr``.
"""

from __future__ import annotations

import math
import random

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.eval.choice_tasks import ChoiceExample
from llmkit.eval.loglikelihood import loglikelihoods
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer

QUESTION_TEMPLATE = "Question: {context}\nAnswer:"
PROMPT_TEMPLATES = {
    "hellaswag": "{context}",
    "arc": QUESTION_TEMPLATE,
    "mmlu": QUESTION_TEMPLATE,
    "jsonl": QUESTION_TEMPLATE,
}
TARGET_DELIMITER = " "  # between the prompt and a choice (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # after each demonstration (lm-eval's fewshot_delimiter)


def render_prompt(example: ChoiceExample, template: str | None = None) -> str:
    """The example's question in ``template`` (``{context}`` marks where it goes), by default the one of
    its format."""
    template = template if template is not None else PROMPT_TEMPLATES.get(example.task, QUESTION_TEMPLATE)
    # str.replace, not str.format: contexts and templates may contain braces of their own.
    return template.replace("{context}", example.context)


def fewshot_prefix(demonstrations: list[ChoiceExample], template: str | None = None) -> str:
    return "".join(
        render_prompt(demo, template) + TARGET_DELIMITER + demo.choices[demo.answer] + FEWSHOT_DELIMITER
        for demo in demonstrations
    )


def _first_best(values: list[float]) -> int:
    return max(range(len(values)), key=lambda index: values[index])


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of the mean: sample standard deviation / sqrt(n); None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def evaluate_choice(
    model: Transformer,
    tokenizer: Tokenizer,
    examples: list[ChoiceExample],
    num_fewshot: int = 0,
    fewshot_examples: list[ChoiceExample] | None = None,
    seed: int = 0,
    template: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Accuracy and length-normalised accuracy of ``examples``, with per-example log-likelihoods."""
    check(num_fewshot >= 0, "num_fewshot", num_fewshot, "must be >= 0")
    check(template is None or "{context}" in template, "template", template, "must contain {context}")
    if not examples:
        raise InputError("evaluate_choice: no examples")
    for example in examples:
        if not 0 <= example.answer < len(example.choices):
            raise InputError(
                f"example {example.id}: answer {example.answer} is out of range for {len(example.choices)} choices"
            )
        if not all(example.choices):
            raise InputError(f"example {example.id}: an empty choice cannot be length-normalised ({example.choices!r})")
    pool = examples if fewshot_examples is None else fewshot_examples
    # Drawing from the evaluated set itself excludes the example being asked.
    available = len(pool) - (1 if fewshot_examples is None else 0)
    check(num_fewshot <= available, "num_fewshot", num_fewshot, f"only {available} demonstrations are available")

    generator = random.Random(seed)
    requests, prompts = [], []
    for index, example in enumerate(examples):
        candidates = pool if fewshot_examples is not None else pool[:index] + pool[index + 1 :]
        demonstrations = generator.sample(candidates, num_fewshot) if num_fewshot else []
        prompt = fewshot_prefix(demonstrations, template) + render_prompt(example, template)
        prompts.append(prompt)
        requests.extend((prompt, TARGET_DELIMITER + choice) for choice in example.choices)
    scores = loglikelihoods(model, tokenizer, requests, batch_size)

    per_example, correct, correct_norm = [], [], []
    position = 0
    for example, prompt in zip(examples, prompts):
        logprobs = [logprob for logprob, _ in scores[position : position + len(example.choices)]]
        position += len(example.choices)
        prediction = _first_best(logprobs)
        prediction_norm = _first_best([logprob / len(choice) for logprob, choice in zip(logprobs, example.choices)])
        correct.append(float(prediction == example.answer))
        correct_norm.append(float(prediction_norm == example.answer))
        per_example.append(
            {
                "id": example.id,
                "answer": example.answer,
                "prediction": prediction,
                "prediction_norm": prediction_norm,
                "logprobs": logprobs,
                "prompt": prompt,
            }
        )
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_norm": sum(correct_norm) / len(correct_norm),
        "stderr": mean_stderr(correct),
        "stderr_norm": mean_stderr(correct_norm),
        "count": len(examples),
        "num_fewshot": num_fewshot,
        "per_example": per_example,
    }
