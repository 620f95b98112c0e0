"""Generative exact match on GSM8K-format problems (Cobbe et al. 2021), with the prompting ablations.

A problem is a ``question`` and a worked ``answer`` whose last line is ``#### <number>``. The model
writes a reply; :func:`llmkit.infer.answers.extract_number` reads its numeric answer (commas, dollar
signs and trailing zeros do not matter) and the example counts as correct when it equals the reference
number exactly. Prompts come from :class:`llmkit.infer.prompting.PromptBuilder`:

* zero-shot: ``Q: question\\nA:``, greedy, the first number of the reply is the answer;
* few-shot (Brown et al. 2020): k demonstrations ``Q: ...\\nA: 72`` from a training file before the query;
* chain of thought, few-shot (Wei et al. 2022): demonstrations carry GSM8K's worked solution as their
  rationale and end "The answer is 72."; the answer is read after the last "answer is";
* chain of thought, zero-shot (Kojima et al. 2022): "Let's think step by step." after the query, then a
  second, greedy prompt "... Therefore, the answer is" whose first number is the answer;
* self-consistency (Wang et al. 2023): k sampled reasoning paths, the majority answer wins;
* the calculator: generation runs with a :class:`~llmkit.infer.tools.ToolBox`; the model may emit
  ``<|tool_call|>calculator(48/2)<|end|>`` and the engine injects ``<|tool_result|>24<|end|>``. GSM8K's
  solutions mark every computation as ``<<48/2=24>>``, so with tools on the demonstrations show exactly
  that call and result in place of each annotation (the Toolformer idea, Schick et al. 2023, with the
  calls given by the data instead of sampled). With tools off the annotations are dropped.
"""

from __future__ import annotations

import itertools
import re
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.eval.choice import mean_stderr
from llmkit.eval.generation import EvaluationGenerator, seeded
from llmkit.infer import Engine, GenerationConfig
from llmkit.infer.answers import canonical_number, majority_vote
from llmkit.infer.prompting import Example, PromptBuilder, PromptConfig, reason
from llmkit.infer.tools import ToolSelection, format_tool_call, render_tool_exchange, select_tools
from llmkit.io import iter_jsonl

ANSWER_MAX_NEW_TOKENS = 32  # zero-shot CoT's answer step: the answer and a few words around it
# GSM8K's calculator annotation: <<expression=result>>.
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


@dataclass
class GenerativeExample:
    id: str
    question: str
    solution: str  # the worked solution, without the final "#### N" line
    target: str  # the reference answer as a canonical number


def load_gsm8k(path: str | Path) -> list[GenerativeExample]:
    """Problems of a GSM8K-format JSONL file; a record without a numeric ``#### N`` answer raises naming its line."""
    path = Path(path)
    examples = []
    for line, record in iter_jsonl(path):
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
            raise InputError(f"{path}:{line}: needs string fields 'question' and 'answer'")
        solution, marker, final = record["answer"].rpartition("####")
        target = canonical_number(final) if marker else None
        if target is None:
            raise InputError(f"{path}:{line}: the answer must end in '#### <number>' (got {record['answer'][-40:]!r})")
        examples.append(GenerativeExample(f"{path.name}:{line}", record["question"], solution.strip(), target))
    if not examples:
        raise InputError(f"{path}: no problems")
    return examples


def rationale(solution: str, calculator: bool) -> str:
    """A worked solution as a chain-of-thought rationale: every ``<<a*b=c>>`` annotation becomes the
    calculator call and its injected result (``calculator``) or is dropped; lines join into one paragraph."""

    def replace_annotation(match: re.Match) -> str:
        if not calculator:
            return ""
        return render_tool_exchange(format_tool_call("calculator", match.group(1).strip()), match.group(2).strip())

    return " ".join(line.strip() for line in _ANNOTATION.sub(replace_annotation, solution).splitlines() if line.strip())


def demonstrations(examples: list[GenerativeExample], calculator: bool) -> list[Example]:
    return [Example(example.question, example.target, rationale(example.solution, calculator)) for example in examples]


@dataclass
class GenerativeConfig:
    num_fewshot: int = field(default=0, metadata={"help": "demonstrations per prompt (drawn from the few-shot pool)"})
    chain_of_thought: bool = field(
        default=False,
        metadata={"help": "reason before answering: few-shot CoT with demonstrations, zero-shot CoT without"},
    )
    self_consistency: int = field(
        default=1, metadata={"help": "sampled reasoning paths per problem, majority vote (1 = one greedy path)"}
    )
    tools: ToolSelection = field(default="none", metadata={"help": "tools during generation: none, calculator, all"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of self-consistency paths"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per reply at most"})
    seed: int = field(default=0, metadata={"help": "seed of demonstration choice and sampling"})

    def __post_init__(self) -> None:
        check(self.num_fewshot >= 0, "num_fewshot", self.num_fewshot, "must be >= 0")
        tools = typing.get_args(ToolSelection)
        check(self.tools in tools, "tools", self.tools, f"must be one of {', '.join(tools)}")
        check(self.self_consistency >= 1, "self_consistency", self.self_consistency, "must be at least 1")
        check(
            self.self_consistency == 1 or self.temperature > 0,
            "temperature",
            self.temperature,
            "self-consistency needs sampling (temperature > 0): greedy paths would all agree",
        )
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")

    def label(self) -> str:
        parts = [f"{self.num_fewshot}-shot", "CoT" if self.chain_of_thought else "direct"]
        if self.self_consistency > 1:
            parts.append(f"SC@{self.self_consistency}")
        if self.tools != "none":
            parts.append(f"tools={self.tools}")
        return ", ".join(parts)


def _prompt_builder(config: GenerativeConfig, pool: list[GenerativeExample]) -> PromptBuilder:
    if config.chain_of_thought:
        style = "few_shot" if config.num_fewshot else "zero_shot"
    else:
        style = "none"
    prompt_config = PromptConfig(shots=config.num_fewshot, chain_of_thought=style, seed=config.seed)
    return PromptBuilder(
        prompt_config, demonstrations(pool, calculator=config.tools != "none") if config.num_fewshot else []
    )


def evaluate_generative(
    engine: Engine,
    examples: list[GenerativeExample],
    config: GenerativeConfig,
    fewshot_pool: list[GenerativeExample] | None = None,
    batch_size: int = 16,
) -> dict:
    """Accuracy (exact match of the extracted number), its standard error, and one record per problem.

    Demonstrations come from ``fewshot_pool`` (a training file), else from the evaluated problems
    themselves, never the one being asked (lm-evaluation-harness's rule for sets without a training
    split). Paths are generated and their answers extracted by :func:`llmkit.infer.prompting.reason`.
    Each record holds the prompt, the text of every path (``outputs``; for zero-shot CoT the reasoning,
    the answer trigger and the answer), the number ``extracted`` from each, the voted ``prediction``
    with its vote share ``agreement``, ``expected`` and ``correct``."""
    builder = _prompt_builder(config, examples if fewshot_pool is None else fewshot_pool)
    paths_per_problem = config.self_consistency
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        temperature=config.temperature if paths_per_problem > 1 else 0,
    )
    generator = EvaluationGenerator(engine, select_tools(config.tools), batch_size, f"generative: {config.label()}")
    paths = reason(
        generator,
        builder,
        [example.question for example in examples for _ in range(paths_per_problem)],
        seeded(generation, paths_per_problem) * len(examples),
        "number",
        ANSWER_MAX_NEW_TOKENS,
    )
    records = []
    for index, example in enumerate(examples):
        own = paths[index * paths_per_problem : (index + 1) * paths_per_problem]
        prediction, agreement = majority_vote([path.answer for path in own])
        records.append(
            {
                "id": example.id,
                "prompt": builder.prompt(example.question),
                "outputs": [path.text for path in own],
                "extracted": [path.answer for path in own],
                "prediction": prediction,
                "agreement": agreement,
                "expected": example.target,
                "correct": prediction == example.target,
            }
        )
    correct = [float(record["correct"]) for record in records]
    return {
        "accuracy": sum(correct) / len(correct),
        "stderr": mean_stderr(correct),
        "count": len(records),
        "truncated_prompts": generator.truncated_prompts,
        "settings": asdict(config),
        "per_example": records,
    }


def ablation_grid(config: GenerativeConfig) -> list[GenerativeConfig]:
    """Every combination of {0, k}-shot x {direct, CoT} x {no tools, tools} x {1 path, SC paths}: k and
    the number of paths are the ones ``config`` asks for (with k = 0 or one path that axis has one value),
    the tools are ``config.tools``, or the calculator when it names none."""
    shots = sorted({0, config.num_fewshot})
    tools = sorted(
        {"none", config.tools if config.tools != "none" else "calculator"}, key=typing.get_args(ToolSelection).index
    )
    paths = sorted({1, config.self_consistency})
    return [
        replace(config, num_fewshot=k, chain_of_thought=cot, tools=tool, self_consistency=n)
        for k, cot, tool, n in itertools.product(shots, (False, True), tools, paths)
    ]


def run_ablations(
    engine: Engine,
    examples: list[GenerativeExample],
    config: GenerativeConfig,
    fewshot_pool: list[GenerativeExample] | None = None,
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    """:func:`evaluate_generative` for every setting of :func:`ablation_grid`: the full result of ``config``
    itself (one point of the grid) and one row per setting with its accuracy, for the table."""
    rows, own_result = [], None
    for setting in ablation_grid(config):
        result = evaluate_generative(engine, examples, setting, fewshot_pool, batch_size)
        if setting == config:
            own_result = result
        rows.append(
            {
                "setting": setting.label(),
                **asdict(setting),
                "accuracy": result["accuracy"],
                "stderr": result["stderr"],
                "count": result["count"],
            }
        )
    return own_result, rows
