"""``llmkit eval``: evaluate a checkpoint on task files and write a report card.

A task is ``kind:path[:option=value...]`` (on the command line, tasks are comma-separated) or, in a
YAML file, a mapping ``{kind: ..., path: ..., option: value}``. An option set on a task overrides the
command-wide field of the same name (``num_fewshot``, ``limit``, ...), so a YAML file can give defaults
once and vary one task. Kinds and their options (every kind also takes ``name`` and ``limit``):

=============  ==========================================================================================
perplexity     text, or JSONL with ``text_field``; ``stride`` (rolling windows)
choice         HellaSwag / ARC JSONL, MMLU CSV, plain JSONL; ``format``, ``num_fewshot``, ``fewshot_file``
generative     GSM8K JSONL; ``num_fewshot``, ``fewshot_file``, ``chain_of_thought``, ``self_consistency``,
               ``tools`` (none, calculator, all), ``temperature``, ``max_new_tokens``, ``ablations``
code           HumanEval JSONL(.gz); ``samples``, ``temperature``, ``max_new_tokens``, ``timeout_s``
bleu_rouge     JSONL prompt + reference; ``max_new_tokens``, ``single_line``
=============  ==========================================================================================

Before any model runs, every evaluated example is checked against the training data
(:mod:`llmkit.eval.contamination`); flagged examples are listed and every score is also reported on the
clean rest. Results: ``eval.json`` (all numbers), ``eval.md`` (the report card), ``eval.png`` (and
``ablations.png``), one ``samples/<task>.jsonl`` of per-example records per task, and an ``eval``
section in the directory's ``report.json``/``report.md``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.config import build, check
from llmkit.data.decontam import set_name
from llmkit.errors import ConfigError, InputError
from llmkit.eval.contamination import check_contamination
from llmkit.eval.kinds import KINDS as TASK_KINDS
from llmkit.eval.kinds import headline
from llmkit.eval.report import log_scores, write_report
from llmkit.infer import Engine
from llmkit.infer.engine import EngineConfig
from llmkit.model.checkpoint import read_config, resolve_checkpoint
from llmkit.token_data import MANIFEST_FILE
from llmkit.tracking import parse_report_to


@dataclass
class TaskOptions:
    """Per-task overrides; None means "the command-wide value" (or the kind's default)."""

    name: str | None = field(default=None, metadata={"help": "the task's name in the report (default: the file name)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N examples"})
    num_fewshot: int | None = field(default=None, metadata={"help": "demonstrations per prompt"})
    fewshot_file: str | None = field(
        default=None, metadata={"help": "file of demonstrations (same format as the task)"}
    )
    chain_of_thought: bool | None = field(default=None, metadata={"help": "generative: reason before answering"})
    self_consistency: int | None = field(default=None, metadata={"help": "generative: sampled paths, majority vote"})
    tools: str | None = field(default=None, metadata={"help": "generative: none, calculator or all"})
    ablations: bool | None = field(
        default=None, metadata={"help": "generative: run the shots x CoT x tools (x SC) grid"}
    )
    samples: int | None = field(default=None, metadata={"help": "code: completions per problem"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "tokens per completion at most"})
    timeout_s: float | None = field(default=None, metadata={"help": "code: seconds per test program"})
    format: str | None = field(default=None, metadata={"help": "choice: auto, hellaswag, arc, mmlu or jsonl"})
    stride: int | None = field(
        default=None, metadata={"help": "perplexity: tokens each rolling window adds (default context length - 1)"}
    )
    text_field: str | None = field(default=None, metadata={"help": "perplexity: JSONL field of the text"})
    single_line: bool | None = field(
        default=None, metadata={"help": "bleu_rouge: stop each completion at its first newline"}
    )


@dataclass
class TaskSpec:
    kind: str
    path: str
    options: TaskOptions

    @property
    def name(self) -> str:
        return self.options.name or set_name(self.path)


def parse_task(spec: str | dict) -> TaskSpec:
    """``kind:path[:option=value...]`` or ``{kind, path, option: value}`` -> a checked :class:`TaskSpec`."""
    if isinstance(spec, str):
        kind, _, rest = spec.partition(":")
        path, *pairs = rest.split(":")
        options = {}
        for pair in pairs:
            key, equals, value = pair.partition("=")
            if not equals:
                raise ConfigError("tasks", spec, f"option {pair!r} is not option=value")
            options[key.strip()] = value.strip()
    elif isinstance(spec, dict):
        options = dict(spec)
        kind, path = options.pop("kind", ""), options.pop("path", "")
    else:
        raise ConfigError("tasks", spec, "a task is 'kind:path[:option=value...]' or a mapping with kind and path")
    check(kind in TASK_KINDS, "tasks", spec, f"unknown kind {kind!r}; use one of {', '.join(TASK_KINDS)}")
    check(bool(path), "tasks", spec, "names no file (kind:path)")
    parsed = build(TaskOptions, options, source=f"task {spec!r}")
    given = {name for name, value in dataclasses.asdict(parsed).items() if value is not None}
    foreign = sorted(given - {"name", "limit"} - TASK_KINDS[kind].options)
    check(not foreign, "tasks", spec, f"option(s) {', '.join(foreign)} do not apply to {kind} tasks")
    return TaskSpec(kind, str(path), parsed)


@dataclass
class EvalConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(checkpoint="runs/base"))
    tasks: list[str | dict] = field(
        default_factory=list,
        metadata={
            "help": f"tasks as kind:path[:option=value...], comma-separated (YAML: a list of those or of mappings); "
            f"kinds: {', '.join(TASK_KINDS)}"
        },
    )
    out: str = field(default="runs/eval", metadata={"help": "directory for eval.json, eval.md, the plots and samples/"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N examples of every task"})
    num_fewshot: int = field(default=0, metadata={"help": "demonstrations per prompt (choice, generative)"})
    chain_of_thought: bool = field(
        default=False, metadata={"help": "generative: chain of thought (few-shot with demonstrations, else zero-shot)"}
    )
    self_consistency: int = field(
        default=1, metadata={"help": "generative: sampled reasoning paths per problem, majority vote"}
    )
    tools: str = field(default="none", metadata={"help": "generative: tools during generation (none, calculator, all)"})
    ablations: bool = field(
        default=False, metadata={"help": "generative: evaluate the 0/k-shot x CoT x tools (x self-consistency) grid"}
    )
    samples: int = field(default=1, metadata={"help": "code: completions per problem (pass@k needs k of them)"})
    temperature: float = field(
        default=0.7,
        metadata={"help": "temperature of sampled generations (self-consistency paths; code when samples > 1)"},
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens per completion at most (default: 256 generative, 300 code, 128 bleu_rouge)"},
    )
    timeout_s: float = field(default=5.0, metadata={"help": "code: wall-clock seconds per test program"})
    seed: int = field(default=0, metadata={"help": "seed of demonstration choice and sampling"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass / generation batch"})
    training_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "training data to check the tasks against: token data dirs or raw text/JSONL sources (default: "
            "the checkpoint's pretraining data)"
        },
    )
    decontamination: bool = field(
        default=True, metadata={"help": "check every evaluated example against the training data"}
    )
    ngram: int = field(default=13, metadata={"help": "decontamination: words per shared n-gram (GPT-3 used 13)"})
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers that also get the scores: comma-separated tensorboard, wandb (offline), "
            "mlflow (local), or all/none"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.tasks, (str, dict)):
            self.tasks = [self.tasks]
        check(bool(self.tasks), "tasks", self.tasks, "name at least one task, e.g. generative:data/gsm8k.jsonl")
        parse_report_to(self.report_to)
        self.task_specs = [parse_task(spec) for spec in self.tasks]
        for spec in self.task_specs:
            check(
                "/" not in spec.name and not spec.name.startswith("."),
                "tasks",
                spec.name,
                "a task name names its samples file: no '/' and no leading '.'",
            )
            settings = self.settings(spec)
            try:
                check(
                    settings["limit"] is None or settings["limit"] >= 1,
                    "limit",
                    settings["limit"],
                    "must be at least 1",
                )
                TASK_KINDS[spec.kind].check(settings)
            except ConfigError as error:
                raise ConfigError(error.field, error.value, f"{error.reason} (task {spec.name})") from None
        names = [spec.name for spec in self.task_specs]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        check(duplicate is None, "tasks", duplicate, "two tasks share this name; give one a name=... option")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        check(
            self.ngram >= 8, "ngram", self.ngram, "must be at least 8 (shorter n-grams match ordinary text by chance)"
        )
        if isinstance(self.training_data, str):
            self.training_data = [self.training_data]

    def settings(self, spec: TaskSpec) -> dict:
        """The task's options, each falling back to this config's field of the same name, then to the kind's
        default; with the command's seed and batch size."""
        defaults = TASK_KINDS[spec.kind].defaults
        values = {}
        for name in ("limit", *sorted(TASK_KINDS[spec.kind].options)):
            value = getattr(spec.options, name)
            if value is None:
                value = getattr(self, name, None)
            values[name] = defaults.get(name) if value is None else value
        return {**values, "seed": self.seed, "batch_size": self.batch_size}


def _training_sources(config: EvalConfig) -> tuple[list[str], str]:
    """The training data to check against, and where that choice came from."""
    if not config.decontamination:
        return [], "decontamination off"
    if config.training_data:
        return config.training_data, "training_data"
    stage_config = read_config(resolve_checkpoint(config.engine.checkpoint)).get("stage_config") or {}
    data = stage_config.get("data")
    if isinstance(data, str) and (Path(data) / MANIFEST_FILE).is_file():
        return [data], "the checkpoint's training data"
    return [], "none given, and the checkpoint names no training data directory that exists here"


def _load_tasks(config: EvalConfig) -> dict[str, tuple[TaskSpec, dict, list]]:
    """Task name -> (spec, settings, examples after ``limit``); every file is read before the model runs."""
    loaded = {}
    for spec in config.task_specs:
        settings = config.settings(spec)
        examples = TASK_KINDS[spec.kind].load(spec.path, settings)[: settings["limit"]]
        if not examples:
            raise InputError(f"{spec.path}: no examples to evaluate")
        loaded[spec.name] = (spec, settings, examples)
    return loaded


def _evaluate_task(
    engine: Engine, spec: TaskSpec, settings: dict, examples: list, contamination: dict | None
) -> tuple[dict, list[dict]]:
    """The task's report entry and its per-example records; with the scores of the clean examples
    when the decontamination check flagged some."""
    kind = TASK_KINDS[spec.kind]
    result = kind.evaluate(engine, examples, settings)
    records = result.pop("per_example")
    ablations = result.pop("ablations", None)
    entry = {"kind": spec.kind, "path": spec.path, "settings": settings, "metrics": result}
    if ablations is not None:
        entry["ablations"] = ablations
    if contamination is not None:
        entry["contamination"] = contamination
        flagged = set(contamination["contaminated_ids"])
        clean_examples = [example for example in examples if kind.texts(example)[0] not in flagged]
        if flagged and clean_examples:
            clean_records = [record for record in records if record["id"] not in flagged]
            entry["clean_metrics"] = kind.rescore(engine, clean_examples, clean_records, settings)
    return entry, records


def checkpoint_step(path: str) -> int:
    """The training step of a checkpoint folder (``step_00000500``), else 0: where trackers plot its scores."""
    match = re.fullmatch(r"step_(\d+)", resolve_checkpoint(path).name)
    return int(match.group(1)) if match else 0


def run_eval(config: EvalConfig) -> dict:
    """Evaluate ``config.engine.checkpoint`` on every task; write the results into ``config.out``; return a summary."""
    started = time.perf_counter()
    loaded = _load_tasks(config)
    sources, origin = _training_sources(config)
    contamination = {}
    if sources:
        evaluation_sets = {
            name: [TASK_KINDS[spec.kind].texts(example) for example in examples]
            for name, (spec, _, examples) in loaded.items()
        }
        contamination = check_contamination(evaluation_sets, sources, ngram=config.ngram)

    engine = Engine.from_config(config.engine)
    tasks, samples = {}, {}
    for name, (spec, settings, examples) in loaded.items():
        tasks[name], samples[name] = _evaluate_task(engine, spec, settings, examples, contamination.get(name))
    summary = {
        "checkpoint": config.engine.checkpoint,
        "device": config.engine.device,
        "dtype": config.engine.dtype,
        "seconds": time.perf_counter() - started,
        "decontamination": {
            "checked": bool(sources),
            "training_data": sources,
            "source": origin,
            "ngram": config.ngram,
        },
        "tasks": tasks,
        "config": dataclasses.asdict(config),
    }
    write_report(Path(config.out), summary, samples)
    log_scores(config.report_to, Path(config.out), tasks, checkpoint_step(config.engine.checkpoint))
    return {
        "out": config.out,
        "tasks": {name: headline(entry["kind"], entry["metrics"]) for name, entry in tasks.items()},
        "contaminated": {
            name: entry["contamination"]["contaminated"] for name, entry in tasks.items() if "contamination" in entry
        },
    }
