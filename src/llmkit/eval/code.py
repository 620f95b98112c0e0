"""Code generation scored by running it: HumanEval format, pass@k (Chen et al. 2021).

A problem is a function signature with its docstring (``prompt``); the model writes the body. Sampling
stops where a new top-level statement would begin (the Codex paper's stop sequences), the program
``prompt + completion + test + check(entry_point)`` runs in :func:`llmkit.infer.sandbox.run_python`
(separate process, time and memory limits, no network), and a sample passes when it exits cleanly.

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
from llmkit.infer.sandbox import run_python
from llmkit.io import iter_jsonl

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


def program(problem: CodeProblem, completion: str) -> str:
    """The script that tests one completion, assembled as OpenAI's human-eval ``check_correctness`` does."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, figure 3)."""
    if not 0 <= c <= n:
        raise ValueError(f"passed samples c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples (k={k}, n={n})")
    if n - c < k:
        return 1.0  # every set of k samples contains a passing one
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def run_programs(programs: list[str], timeout_s: float, memory_mb: int, workers: int | None = None) -> list[dict]:
    """Run each program in the sandbox, several at a time (each is its own process, so threads suffice)."""
    def run(source: str) -> dict:
        result = run_python(source, timeout_s=timeout_s, memory_mb=memory_mb)
        return {"passed": result.status == "ok" and result.returncode == 0, "status": result.status,
                "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""}

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(run, programs), total=len(programs), desc="code: running tests", unit="program"))


def score_completions(problems: list[CodeProblem], completions: list[list[str]], ks: list[int], timeout_s: float = 5.0,
                      memory_mb: int = 512, workers: int | None = None) -> dict:
    """pass@k for each k (mean over problems) of ``completions[problem][sample]``, with per-problem records."""
    samples = {len(row) for row in completions}
    if len(completions) != len(problems) or len(samples) != 1:
        raise ValueError("need the same number of completions for every problem")
    n = samples.pop()
    for k in ks:
        if not 1 <= k <= n:
            raise ConfigError("k", k, f"pass@{k} needs at least {k} samples per problem, but only {n} were drawn (raise 'samples')")
    flat = [program(problem, completion) for problem, row in zip(problems, completions) for completion in row]
    outcomes = run_programs(flat, timeout_s, memory_mb, workers)
    per_problem = []
    for index, (problem, row) in enumerate(zip(problems, completions)):
        results = outcomes[index * n:(index + 1) * n]
        passed = sum(result["passed"] for result in results)
        per_problem.append({"id": problem.task_id, "samples": n, "passed": passed,
                            **{f"pass@{k}": pass_at_k(n, passed, k) for k in ks},
                            "completions": [{"completion": completion, **result} for completion, result in zip(row, results)]})
    metrics = {f"pass@{k}": float(np.mean([record[f"pass@{k}"] for record in per_problem])) for k in ks}
    return {**metrics, "count": len(problems), "samples": n, "per_example": per_problem}


def evaluate_code(engine: Engine, problems: list[CodeProblem], samples: int = 1, ks: list[int] | None = None,
                  temperature: float = 0.2, max_new_tokens: int = 300, seed: int = 0, timeout_s: float = 5.0,
                  memory_mb: int = 512, batch_size: int = 16, workers: int | None = None) -> dict:
    """Draw ``samples`` completions per problem, run them, and report pass@k for each k in ``ks``
    (default: those of 1, 10, 100 that do not exceed ``samples``). Codex reported pass@1 at temperature
    0.2 and pass@100 at 0.8; temperature 0 with one sample is greedy pass@1."""
    ks = ks or [k for k in (1, 10, 100) if k <= samples]
    if temperature == 0 and samples > 1:
        raise ConfigError("temperature", temperature, f"{samples} samples at temperature 0 would all be the same greedy completion")
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=STOP_SEQUENCES, seed=seed)
    generator = EvaluationGenerator(engine, batch_size=batch_size, description="code: sampling")
    texts = [completion.text for completion in generator.generate(
        [problem.prompt for problem in problems for _ in range(samples)], seeded(config, samples) * len(problems))]
    result = score_completions(problems, [texts[index:index + samples] for index in range(0, len(texts), samples)], ks,
                               timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    result["truncated_prompts"] = generator.truncated_prompts
    return result
