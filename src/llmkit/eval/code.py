"""Code generation scored by running it: HumanEval format, pass@k (Chen et al. 2021).

A problem is a function signature with its docstring (``prompt``); the model writes the body. Sampling
stops where a new top-level statement would begin (the Codex paper's stop sequences). The completion
and the test never share a process (:func:`llmkit.sandbox.run_checked`): ``prompt + completion``
runs in one sandbox, and ``prompt + test + check(entry_point)`` in another, where the entry point is
a proxy that calls the completion's function and gets plain data back. A sample passes when the test
process ran to its end and exited cleanly: the completion's ``sys.exit(0)``, ``os._exit(0)``, an
object whose ``__eq__`` always agrees, or anything it prints cannot make a failing test pass, and it
cannot read the test's expected values (they are in the other process). The price: arguments and
results must be plain data (numbers, strings, bytes, lists, tuples, dicts, sets, None), as they are
in HumanEval, and a test cannot see the completion mutate an argument in place.

pass@k is the probability that at least one of k samples passes. Drawing exactly k samples per problem
gives a high-variance estimate; Chen et al. draw n >= k, count the c that pass and use the unbiased
estimator 1 - C(n-c, k) / C(n, k), computed as a product so that no huge binomial is formed:
1 - prod_{i=n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmkit.errors import ConfigError, InputError
from llmkit.eval.generation import EvaluationGenerator, seeded
from llmkit.infer import Engine, GenerationConfig
from llmkit.io import iter_jsonl
from llmkit.sandbox import run_checked

# Codex (Chen et al. 2021, section 2.3): a completion ends where the next top-level block would start.
STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass
class CodeProblem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_code_problems(path: str | Path) -> list[CodeProblem]:
    """Problems of a HumanEval-format JSONL file (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    problems = []
    for line, record in iter_jsonl(path):
        missing = [name for name in PROBLEM_FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise InputError(f"{path}:{line}: HumanEval record lacks the string field(s) {', '.join(missing)}")
        problems.append(CodeProblem(*(record[name] for name in PROBLEM_FIELDS)))
    if not problems:
        raise InputError(f"{path}: no problems")
    return problems


def candidate_program(problem: CodeProblem, completion: str) -> str:
    """The completion where it was written: after its prompt (as OpenAI's human-eval assembles it)."""
    return f"{problem.prompt}{completion}\n"


def checker_program(problem: CodeProblem) -> str:
    """The prompt (its imports and helpers, which tests call), the entry point bound to the proxy,
    the test, and the call of ``check``."""
    return f"{problem.prompt}\n{problem.entry_point} = __candidate__\n{problem.test}\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, figure 3)."""
    if not 0 <= c <= n:
        raise ValueError(f"passed samples c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples (k={k}, n={n})")
    if n - c < k:
        return 1.0  # every set of k samples contains a passing one
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def run_tests(
    runs: list[tuple[CodeProblem, str]], timeout_s: float, memory_mb: int, workers: int | None = None
) -> list[dict]:
    """Test each (problem, completion), several at a time (each is its own processes, so threads suffice)."""

    def run(item: tuple[CodeProblem, str]) -> dict:
        problem, completion = item
        result = run_checked(
            candidate_program(problem, completion),
            checker_program(problem),
            problem.entry_point,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
        )
        verdict = result.checker
        return {"passed": verdict.status == "ok", "status": verdict.status, "error": _last_line(verdict.stderr)}

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(run, runs), total=len(runs), desc="code: running tests", unit="program"))


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def score_completions(
    problems: list[CodeProblem],
    completions: list[list[str]],
    ks: list[int],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int | None = None,
) -> dict:
    """pass@k for each k (mean over problems) of ``completions[problem][sample]``, with per-problem records."""
    samples = {len(row) for row in completions}
    if len(completions) != len(problems) or len(samples) != 1:
        raise ValueError("need the same number of completions for every problem")
    n = samples.pop()
    for k in ks:
        if not 1 <= k <= n:
            raise ConfigError(
                "k", k, f"pass@{k} needs at least {k} samples per problem, but only {n} were drawn (raise 'samples')"
            )
    flat = [(problem, completion) for problem, row in zip(problems, completions) for completion in row]
    outcomes = run_tests(flat, timeout_s, memory_mb, workers)
    per_problem = []
    for index, (problem, row) in enumerate(zip(problems, completions)):
        results = outcomes[index * n : (index + 1) * n]
        passed = sum(result["passed"] for result in results)
        per_problem.append(
            {
                "id": problem.task_id,
                "samples": n,
                "passed": passed,
                **{f"pass@{k}": pass_at_k(n, passed, k) for k in ks},
                "completions": [{"completion": completion, **result} for completion, result in zip(row, results)],
            }
        )
    metrics = {f"pass@{k}": float(np.mean([record[f"pass@{k}"] for record in per_problem])) for k in ks}
    return {**metrics, "count": len(problems), "samples": n, "per_example": per_problem}


def evaluate_code(
    engine: Engine,
    problems: list[CodeProblem],
    samples: int = 1,
    ks: list[int] | None = None,
    temperature: float = 0.2,
    max_new_tokens: int = 300,
    seed: int = 0,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    batch_size: int = 16,
    workers: int | None = None,
) -> dict:
    """Draw ``samples`` completions per problem, run them, and report pass@k for each k in ``ks``
    (default: those of 1, 10, 100 that do not exceed ``samples``). Codex reported pass@1 at temperature
    0.2 and pass@100 at 0.8; temperature 0 with one sample is greedy pass@1."""
    ks = ks or [k for k in (1, 10, 100) if k <= samples]
    if temperature == 0 and samples > 1:
        raise ConfigError(
            "temperature", temperature, f"{samples} samples at temperature 0 would all be the same greedy completion"
        )
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=STOP_SEQUENCES, seed=seed)
    generator = EvaluationGenerator(engine, batch_size=batch_size, description="code: sampling")
    texts = [
        completion.text
        for completion in generator.generate(
            [problem.prompt for problem in problems for _ in range(samples)], seeded(config, samples) * len(problems)
        )
    ]
    result = score_completions(
        problems,
        [texts[index : index + samples] for index in range(0, len(texts), samples)],
        ks,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        workers=workers,
    )
    result["truncated_prompts"] = generator.truncated_prompts
    return result
