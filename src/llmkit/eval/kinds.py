"""The task kinds of ``llmkit eval``: for each, how its file is read, which text of an example the
decontamination check compares, how it is evaluated, and how its scores are recomputed on a subset
(the examples not found in the training data).

``settings`` are a task's options resolved against the command's fields (see
:meth:`llmkit.eval.run.EvalConfig.settings`), plus ``seed`` and ``batch_size``. A kind's ``evaluate``
returns the evaluation function's result dict: headline numbers plus ``per_example`` records, each
with the example's ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmkit.config import check
from llmkit.eval.choice import evaluate_choice, mean_stderr
from llmkit.eval.choice_tasks import FORMATS, load_choice_task
from llmkit.eval.code import evaluate_code, load_code_problems
from llmkit.eval.generative import GenerativeConfig, evaluate_generative, load_gsm8k, run_ablations
from llmkit.eval.perplexity import evaluate_perplexity, load_texts
from llmkit.eval.text_metrics import evaluate_bleu_rouge, load_reference_pairs, score_texts
from llmkit.infer import Engine


@dataclass(frozen=True)
class TaskKind:
    options: frozenset[str]  # the per-task options it takes (besides name and limit)
    defaults: dict  # values of options that have no command-wide field, or whose default differs per kind
    load: Callable[[str, dict], list]  # (path, settings) -> examples
    texts: Callable[[Any], tuple[str, list[str]]]  # example -> (id, strings to check for contamination)
    evaluate: Callable[[Engine, list, dict], dict]  # (engine, examples, settings) -> result
    rescore: Callable[[Engine, list, list[dict], dict], dict]  # (engine, examples, their records, settings) -> metrics
    scores: tuple[tuple[str, str | None], ...]  # (metric, its standard error's key) in report order
    check: Callable[[dict], Any]  # settings -> raises ConfigError when they are invalid (before anything runs)
    lower_is_better: bool = False


def _mean(values: list[float]) -> tuple[float, float | None]:
    return sum(values) / len(values), mean_stderr(values)


def _check_generation(settings: dict) -> None:
    check(settings["max_new_tokens"] >= 1, "max_new_tokens", settings["max_new_tokens"], "must be at least 1")


# ----------------------------------------------------------------------------- perplexity
def _load_documents(path: str, settings: dict) -> list[tuple[str, str]]:
    return [
        (f"{Path(path).name}:{index}", text)
        for index, text in enumerate(load_texts(path, settings["text_field"]), start=1)
    ]


def _evaluate_perplexity(engine: Engine, documents: list[tuple[str, str]], settings: dict) -> dict:
    result = evaluate_perplexity(
        engine.model, engine.tokenizer, [text for _, text in documents], settings["stride"], settings["batch_size"]
    )
    return {
        **result,
        "per_example": [{"id": identifier, "bytes": len(text.encode("utf-8"))} for identifier, text in documents],
    }


def _check_perplexity(settings: dict) -> None:
    check(settings["stride"] is None or settings["stride"] >= 1, "stride", settings["stride"], "must be at least 1")


def _rescore_perplexity(engine: Engine, documents: list[tuple[str, str]], records: list[dict], settings: dict) -> dict:
    # Perplexity is a ratio of totals over documents, not a mean of per-document scores: score the clean ones again.
    return evaluate_perplexity(
        engine.model, engine.tokenizer, [text for _, text in documents], settings["stride"], settings["batch_size"]
    )


# ----------------------------------------------------------------------------- multiple choice
def _evaluate_choice(engine: Engine, examples: list, settings: dict) -> dict:
    pool = load_choice_task(settings["fewshot_file"], settings["format"]) if settings["fewshot_file"] else None
    return evaluate_choice(
        engine.model,
        engine.tokenizer,
        examples,
        settings["num_fewshot"],
        pool,
        settings["seed"],
        batch_size=settings["batch_size"],
    )


def _check_choice(settings: dict) -> None:
    check(
        settings["format"] in ("auto", *FORMATS),
        "format",
        settings["format"],
        f"must be auto or one of {', '.join(FORMATS)}",
    )
    check(settings["num_fewshot"] >= 0, "num_fewshot", settings["num_fewshot"], "must be >= 0")


def _rescore_choice(engine, examples, records: list[dict], settings) -> dict:
    accuracy, stderr = _mean([float(record["prediction"] == record["answer"]) for record in records])
    accuracy_norm, stderr_norm = _mean([float(record["prediction_norm"] == record["answer"]) for record in records])
    return {
        "accuracy": accuracy,
        "accuracy_norm": accuracy_norm,
        "stderr": stderr,
        "stderr_norm": stderr_norm,
        "count": len(records),
    }


# ----------------------------------------------------------------------------- generative
def _generative_config(settings: dict) -> GenerativeConfig:
    return GenerativeConfig(
        num_fewshot=settings["num_fewshot"],
        chain_of_thought=settings["chain_of_thought"],
        self_consistency=settings["self_consistency"],
        tools=settings["tools"],
        temperature=settings["temperature"],
        max_new_tokens=settings["max_new_tokens"],
        seed=settings["seed"],
    )


def _evaluate_generative(engine: Engine, examples: list, settings: dict) -> dict:
    generative = _generative_config(settings)
    pool = load_gsm8k(settings["fewshot_file"]) if settings["fewshot_file"] else None
    if settings["ablations"]:
        result, rows = run_ablations(engine, examples, generative, pool, settings["batch_size"])
        result["ablations"] = rows
    else:
        result = evaluate_generative(engine, examples, generative, pool, settings["batch_size"])
    result.pop("settings")  # the runner records the settings itself
    return result


def _rescore_generative(engine, examples, records: list[dict], settings) -> dict:
    accuracy, stderr = _mean([float(record["correct"]) for record in records])
    return {"accuracy": accuracy, "stderr": stderr, "count": len(records)}


# ----------------------------------------------------------------------------- code
def _evaluate_code(engine: Engine, problems: list, settings: dict) -> dict:
    samples = settings["samples"]
    # One sample is greedy pass@1; several are a sample of the model's distribution at the temperature.
    return evaluate_code(
        engine,
        problems,
        samples=samples,
        temperature=settings["temperature"] if samples > 1 else 0.0,
        max_new_tokens=settings["max_new_tokens"],
        seed=settings["seed"],
        timeout_s=settings["timeout_s"],
        batch_size=settings["batch_size"],
    )


def _check_code(settings: dict) -> None:
    _check_generation(settings)
    check(settings["samples"] >= 1, "samples", settings["samples"], "must be at least 1")
    check(
        settings["samples"] == 1 or settings["temperature"] > 0,
        "temperature",
        settings["temperature"],
        f"{settings['samples']} samples need temperature > 0 (greedy samples would all be the same)",
    )
    check(settings["timeout_s"] > 0, "timeout_s", settings["timeout_s"], "must be positive")


def _rescore_code(engine, problems, records: list[dict], settings) -> dict:
    keys = [key for key in records[0] if key.startswith("pass@")]
    return {**{key: sum(record[key] for record in records) / len(records) for key in keys}, "count": len(records)}


# ----------------------------------------------------------------------------- BLEU / ROUGE
def _evaluate_bleu_rouge(engine: Engine, examples: list, settings: dict) -> dict:
    return evaluate_bleu_rouge(
        engine, examples, settings["max_new_tokens"], settings["single_line"], settings["batch_size"]
    )


def _rescore_bleu_rouge(engine, examples, records: list[dict], settings) -> dict:
    result = score_texts([record["output"] for record in records], [record["reference"] for record in records])
    result.pop("per_example_rouge")
    return result


GENERATION = frozenset({"temperature", "max_new_tokens"})
KINDS: dict[str, TaskKind] = {
    "perplexity": TaskKind(
        frozenset({"stride", "text_field"}),
        {"text_field": "text"},
        _load_documents,
        lambda document: (document[0], [document[1]]),
        _evaluate_perplexity,
        _rescore_perplexity,
        (("bits_per_byte", None), ("perplexity", None)),
        _check_perplexity,
        lower_is_better=True,
    ),
    "choice": TaskKind(
        frozenset({"num_fewshot", "fewshot_file", "format"}),
        {"format": "auto"},
        lambda path, settings: load_choice_task(path, settings["format"]),
        lambda example: (example.id, [example.context, *example.choices]),
        _evaluate_choice,
        _rescore_choice,
        (("accuracy", "stderr"), ("accuracy_norm", "stderr_norm")),
        _check_choice,
    ),
    "generative": TaskKind(
        frozenset({"num_fewshot", "fewshot_file", "chain_of_thought", "self_consistency", "tools", "ablations"})
        | GENERATION,
        {"max_new_tokens": 256},
        lambda path, settings: load_gsm8k(path),
        lambda example: (example.id, [example.question, example.solution]),
        _evaluate_generative,
        _rescore_generative,
        (("accuracy", "stderr"),),
        _generative_config,
    ),
    "code": TaskKind(
        frozenset({"samples", "timeout_s"}) | GENERATION,
        {"max_new_tokens": 300},
        lambda path, settings: load_code_problems(path),
        lambda problem: (problem.task_id, [problem.prompt, problem.canonical_solution]),
        _evaluate_code,
        _rescore_code,
        (("pass@1", None), ("pass@10", None), ("pass@100", None)),
        _check_code,
    ),
    "bleu_rouge": TaskKind(
        frozenset({"single_line", "max_new_tokens"}),
        {"max_new_tokens": 128, "single_line": True},
        lambda path, settings: load_reference_pairs(path),
        lambda example: (example.id, [example.prompt, example.reference]),
        _evaluate_bleu_rouge,
        _rescore_bleu_rouge,
        (("bleu", None), ("rouge1", "rouge1_stderr"), ("rouge2", "rouge2_stderr"), ("rougeL", "rougeL_stderr")),
        _check_generation,
    ),
}


def headline(kind: str, metrics: dict) -> dict:
    """The kind's main scores that ``metrics`` holds, in report order."""
    return {name: metrics[name] for name, _ in KINDS[kind].scores if name in metrics}
